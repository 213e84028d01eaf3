//! The error of a configuration value that cannot work: a leaf every part of `config` reports with.

/// A configuration value that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);
