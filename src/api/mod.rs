//! The HTTP API. Handlers only translate: they parse a request, call the session manager, and turn its
//! answer or error into a response.
//!
//! Architecture invariant: only `api/` (and `error.rs`) know about HTTP; nothing here talks to Docker or a
//! kernel directly.
//!
//! The handlers are one module per resource (`sessions`, `execute`, `files`, `packages`, `system`) and
//! one adapter module per other protocol (`session_compat`, `jupyter_compat`, `gateway` with `kernel_ws`,
//! `mcp`). What they reach is in [`state`] (`AppState`, and `Caller`: the same for the request's owner);
//! the routes and the middleware in front of them are in [`router`](mod@router), the OpenAPI document in
//! [`openapi`], the interactive docs in [`docs`], signed file links (their URLs and their check) in
//! [`signed`].

pub mod auth;
pub mod body;
pub mod compat;
pub mod docs;
pub mod execute;
pub mod extract;
pub mod files;
pub mod gateway;
pub mod internal;
pub mod json_errors;
pub mod jupyter_compat;
pub mod kernel_ws;
pub mod kernel_ws_codec;
pub mod mcp;
pub mod network;
pub mod openapi;
pub mod packages;
pub mod rate_limit;
pub mod router;
pub mod serve;
pub mod session_compat;
pub mod sessions;
pub mod signed;
pub mod state;
pub mod system;

pub use router::router;
pub use state::AppState;
