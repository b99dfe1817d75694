//! The model store.
//!
//! For now this holds the GGUF reader ([`gguf`]): paddock checks every model file itself
//! before handing it to llama.cpp, and serves a model's metadata from the same parse.
//! The local model registry and model downloads will live here too.

pub mod gguf;
