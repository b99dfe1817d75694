//! Integration tests against one in-process paddock server, over HTTP, with the real model.

#[path = "../common/mod.rs"]
mod common;

mod generation;
mod llama_routes;
mod management;
mod models;
mod node;
mod openapi;
mod supervision;
mod web;
