//! Kernel images: which languages exist and which image each runs in ([`catalog`]), the build contexts and
//! their content hashes ([`context`]), building them through the runtime ([`builder`]), the
//! `kernelbox images` subcommand and the build at `serve` start-up, and each image's runtime tree: its
//! `/usr` and `/opt` copied out once and mounted read-only into its sessions ([`runtime_tree`]).
//!
//! Architecture invariant: images are built through [`crate::runtime::ContainerRuntime`], never by
//! shelling out to the docker CLI.

pub mod builder;
pub mod catalog;
pub mod context;
pub mod runtime_tree;

pub use builder::{ImageBuilder, ImageError};
pub use catalog::{Catalog, FILES_TOOL, HOME, LABEL_INTERRUPT_MODE, START_KERNEL};
