//! The model store.
//!
//! - [`gguf`]: paddock's own GGUF reader; every model file is checked by it before llama.cpp
//!   sees it, and a model's metadata is served from the same parse.
//! - [`registry`]: the local models (data dir `models/` and `model_dirs`), split parts, memory
//!   estimates, and where each came from.
//! - [`metadata`]: a model's header in the shape of `GET /api/admin/models/{id}/metadata`.
//! - [`arch`]: the architectures the linked llama.cpp loads.

pub mod arch;
pub mod gguf;
pub mod metadata;
pub mod registry;

pub use registry::{Model, ModelStore};
