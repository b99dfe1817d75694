//! The model store.
//!
//! - [`gguf`]: paddock's own GGUF reader; every model file is checked by it before llama.cpp
//!   sees it, and a model's metadata is served from the same parse.
//! - [`registry`]: the local models (data dir `models/` and `model_dirs`), split parts, memory
//!   estimates, and where each came from.
//! - [`metadata`]: a model's header in the shape of `GET /api/admin/models/{id}/metadata`.
//! - [`memory`]: what a model costs in memory at a context layout, from its header.
//! - [`adapters`]: registered LoRA adapters, attached to instances by id.
//! - [`arch`]: the architectures the linked llama.cpp loads.
//! - [`hub`]: the Hugging Face hub's HTTP API (search, a repository's files).
//! - [`download`]: resumable, verified downloads from the hub into `models/`.

pub mod adapters;
pub mod arch;
pub mod download;
pub mod gguf;
pub mod hub;
pub mod memory;
pub mod metadata;
pub mod registry;

pub use download::Downloads;
pub use hub::Hub;
pub use registry::{Model, ModelStore};
