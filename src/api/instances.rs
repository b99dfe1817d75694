//! Instance management routes (llamactl's API reference shapes).

use std::path::PathBuf;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::json;
use tracing::Level;

use super::error::{ApiError, Json};
use super::AppState;
use crate::instance::{InstanceOptions, InstanceSpec};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/instances", get(list).post(create))
        .route("/instances/{name}", get(show).delete(remove))
        .route("/instances/{name}/start", post(start))
        .route("/instances/{name}/stop", post(stop))
        .route("/instances/{name}/logs", get(logs))
        .route("/instances/{name}/health", get(health))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateInstance {
    name: String,
    model_path: PathBuf,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    options: InstanceOptions,
}

async fn create(State(state): State<AppState>, Json(body): Json<CreateInstance>) -> Result<impl IntoResponse, ApiError> {
    let spec = InstanceSpec { name: body.name, model_path: body.model_path, port: body.port, options: body.options };
    let instance = state.registry.create(spec)?;
    Ok((StatusCode::CREATED, axum::Json(json!({ "message": "Instance created successfully", "instance": instance }))))
}

async fn list(State(state): State<AppState>) -> impl IntoResponse {
    axum::Json(json!({ "instances": state.registry.list() }))
}

async fn show(State(state): State<AppState>, Path(name): Path<String>) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(state.registry.get(&name)?))
}

async fn remove(State(state): State<AppState>, Path(name): Path<String>) -> Result<impl IntoResponse, ApiError> {
    state.registry.delete(&name)?;
    Ok(axum::Json(json!({ "message": "Instance deleted successfully" })))
}

async fn start(State(state): State<AppState>, Path(name): Path<String>) -> Result<impl IntoResponse, ApiError> {
    let status = state.registry.start(&name)?;
    Ok(axum::Json(json!({ "message": "Instance start initiated", "status": status })))
}

async fn stop(State(state): State<AppState>, Path(name): Path<String>) -> Result<impl IntoResponse, ApiError> {
    let status = state.registry.stop(&name).await?;
    let message = if status == crate::instance::Status::Stopped { "Instance stopped" } else { "Instance stop initiated" };
    Ok(axum::Json(json!({ "message": message, "status": status })))
}

#[derive(Debug, Deserialize)]
struct LogQuery {
    lines: Option<usize>,
    level: Option<String>,
}

async fn logs(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let level = match q.level.as_deref() {
        None => None,
        Some(l) => Some(l.parse::<Level>().map_err(|_| {
            ApiError::bad_request("Invalid log level").with_details(format!("level must be debug, info, warn or error, got '{l}'"))
        })?),
    };
    let logs = state.registry.logs(&name, q.lines.unwrap_or(100), level)?;
    Ok(axum::Json(json!({ "logs": logs })))
}

async fn health(State(state): State<AppState>, Path(name): Path<String>) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(state.registry.health(&name).await?))
}
