//! The node part of the admin API (seed 003): LoRA adapters, the configuration at the seed's
//! paths with a reload from the file, and a graceful shutdown.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::doc::ErrorBody;
use super::error::{ApiError, Json};
use super::AppState;
use crate::config::ConfigPatch;
use crate::models::adapters::{Adapter, AdapterError, NewAdapter};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_adapters, register_adapter))
        .routes(routes!(delete_adapter))
        .routes(routes!(get_config, put_config))
        .routes(routes!(reload_config))
        .routes(routes!(shutdown))
}

impl From<AdapterError> for ApiError {
    fn from(e: AdapterError) -> Self {
        let (status, code, message) = match &e {
            AdapterError::Invalid(_) => (StatusCode::BAD_REQUEST, "INVALID_ADAPTER", "Invalid adapter"),
            AdapterError::Exists(_) => (StatusCode::CONFLICT, "ADAPTER_EXISTS", "The adapter exists"),
            AdapterError::NotFound(_) => (StatusCode::NOT_FOUND, "ADAPTER_NOT_FOUND", "Adapter not found"),
            AdapterError::Io(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "ADAPTER_SAVE_FAILED", "The adapter list could not be saved")
            }
        };
        ApiError::new(status, code, message).with_details(e.to_string())
    }
}

#[derive(Serialize, ToSchema)]
pub struct AdapterList {
    adapters: Vec<Adapter>,
}

#[derive(Serialize, ToSchema)]
pub struct AdapterRegistered {
    /// `ok`
    status: &'static str,
    adapter: Adapter,
}

/// The registered LoRA adapters. Instances attach one with
/// `"lora": [{"adapter": "<id>", "scale": 1.0}]` in their options.
#[utoipa::path(get, path = "/admin/adapters", operation_id = "list_adapters", tag = "models",
    responses((status = 200, description = "The adapters", body = AdapterList)))]
async fn list_adapters(State(state): State<AppState>) -> impl IntoResponse {
    axum::Json(AdapterList { adapters: state.adapters.list() })
}

/// Registers a GGUF LoRA adapter: `path` absolute or relative to the data dir's `adapters/`,
/// inside that directory, `models/` or a `model_dirs` entry. Rank, alpha and base model come
/// from the file unless given.
#[utoipa::path(post, path = "/admin/adapters", operation_id = "register_adapter", tag = "models",
    request_body = NewAdapter,
    responses((status = 200, description = "Registered", body = AdapterRegistered),
        (status = 400, description = "Bad id or path, outside the allowed directories, not a GGUF LoRA (`INVALID_ADAPTER`)", body = ErrorBody),
        (status = 409, description = "The id is taken (`ADAPTER_EXISTS`)", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 422, description = "A field is missing, unknown or of the wrong type (`INVALID_JSON`)", body = ErrorBody),
        (status = 500, description = "The list could not be saved (`ADAPTER_SAVE_FAILED`)", body = ErrorBody)))]
async fn register_adapter(
    State(state): State<AppState>,
    Json(new): Json<NewAdapter>,
) -> Result<impl IntoResponse, ApiError> {
    let store = state.adapters.clone();
    let adapter = tokio::task::spawn_blocking(move || store.register(new)).await.map_err(|e| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "registration failed").with_details(e.to_string())
    })??;
    Ok(axum::Json(AdapterRegistered { status: "ok", adapter }))
}

/// Unregisters an adapter; its file stays on disk, and instances that loaded it keep it until
/// they restart.
#[utoipa::path(delete, path = "/admin/adapters/{id}", operation_id = "delete_adapter", tag = "models",
    params(("id" = String, Path, description = "The adapter's id")),
    responses((status = 200, description = "Removed", body = Object),
        (status = 404, description = "No such adapter (`ADAPTER_NOT_FOUND`)", body = ErrorBody),
        (status = 500, description = "The list could not be saved (`ADAPTER_SAVE_FAILED`)", body = ErrorBody)))]
async fn delete_adapter(State(state): State<AppState>, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    state.adapters.remove(&id)?;
    Ok(axum::Json(json!({ "status": "ok", "message": format!("Adapter '{id}' removed") })))
}

/// The configuration in effect (secrets masked); the same as `GET /api/config`.
#[utoipa::path(get, path = "/admin/config", operation_id = "admin_get_config", tag = "models",
    responses((status = 200, description = "The configuration in effect", body = crate::config::Config)))]
async fn get_config(state: State<AppState>) -> impl IntoResponse {
    super::system::config(state).await
}

/// Changes the configuration; the same as `PUT /api/config`.
#[utoipa::path(put, path = "/admin/config", operation_id = "admin_update_config", tag = "models",
    request_body = ConfigPatch,
    responses((status = 200, description = "Saved; `applied` and `restart_required` say when each change takes effect", body = super::doc::ConfigUpdated),
        (status = 400, description = "Invalid configuration (`INVALID_CONFIG`)", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 422, description = "A field has the wrong type or is unknown (`INVALID_JSON`)", body = ErrorBody),
        (status = 500, description = "The file could not be written (`CONFIG_SAVE_FAILED`)", body = ErrorBody)))]
async fn put_config(state: State<AppState>, patch: Json<ConfigPatch>) -> Result<impl IntoResponse, ApiError> {
    super::system::update_config(state, patch).await
}

/// Re-reads the config file and applies its operational settings at once
/// (`max_running_instances`, `on_demand_start_timeout`, `model_dirs`); other changed keys are
/// listed in `restart_required`. A file that does not parse or validate changes nothing.
#[utoipa::path(post, path = "/admin/config/reload", operation_id = "reload_config", tag = "models",
    responses((status = 200, description = "Reloaded", body = Object),
        (status = 400, description = "The file is missing, does not parse or is invalid (`INVALID_CONFIG`)", body = ErrorBody)))]
async fn reload_config(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let path = state.config_path.as_ref().clone();
    let text = tokio::fs::read_to_string(&path).await.map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "INVALID_CONFIG", "The config file cannot be read")
            .with_details(format!("{}: {e}", path.display()))
    })?;
    let current = state.config.read().clone();
    let (next, report) = current.reloaded(&text).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "INVALID_CONFIG", "Invalid configuration")
            .with_details(format!("{}: {e}", path.display()))
    })?;
    super::apply_limits(&state.registry, &next);
    *state.config.write() = next;
    Ok(axum::Json(json!({
        "status": "ok",
        "file": path.display().to_string(),
        "applied": report.applied,
        "restart_required": report.restart_required,
    })))
}

/// Shuts paddock down gracefully: instances drain their requests and stop, then the process
/// exits. Only from the machine itself (a loopback address), and with credentials when auth is on.
#[utoipa::path(post, path = "/admin/shutdown", operation_id = "shutdown", tag = "models",
    responses((status = 200, description = "Shutting down", body = Object),
        (status = 403, description = "Not from a loopback address (`LOOPBACK_ONLY`)", body = ErrorBody)))]
async fn shutdown(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Result<impl IntoResponse, ApiError> {
    if !peer.ip().is_loopback() {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "LOOPBACK_ONLY", "Shutdown is only allowed locally")
            .with_details(format!("{} is not a loopback address; run the request on the machine itself", peer.ip())));
    }
    tracing::info!("shutdown asked by {peer}");
    state.stop.cancel();
    Ok(axum::Json(json!({ "status": "shutting_down", "message": "instances drain, then paddock exits" })))
}
