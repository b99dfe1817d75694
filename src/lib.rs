//! Paddock: one binary that serves local LLMs with llama.cpp linked in-process, and manages
//! many model instances behind one HTTP port.
//!
//! # Layout
//! - [`engine`]: everything that touches llama.cpp; one thread per instance owns its model.
//! - [`instance`]: instances (options, status state machine) and the [`instance::Registry`].
//! - [`api`]: the HTTP surface (management API, OpenAI-compatible routes), [`api::app`] and
//!   [`api::serve`].
//! - [`auth`]: users, API keys, login tokens, and who may call what.
//! - [`config`]: configuration layering.
//! - [`logs`]: per-instance log buffers fed by llama.cpp's log callback.
//! - [`nodes`]: remote nodes (llamactl's multi-node): instances placed on other servers.
//! - [`models`]: the model store; for now paddock's own GGUF reader, which checks a file before llama.cpp sees it.
//! - [`build`]: build information.
//! - [`bench`]: `paddock bench`, the load generator that compares OpenAI-compatible servers.
//!
//! A request flows: axum router → handler → registry lookup → engine handle → engine thread,
//! and tokens flow back over a per-request channel.

pub mod api;
pub mod auth;
pub mod bench;
pub mod build;
pub mod config;
pub mod engine;
pub mod instance;
pub mod logs;
pub mod models;
pub mod nodes;

pub use api::{app, serve, AppState};
pub use config::Config;
