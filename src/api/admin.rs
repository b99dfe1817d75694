//! The model-management part of the admin API (`/api/admin/…`, after seed 003): the local
//! model registry, GGUF metadata, rescans, deletes, unloads, storage, node stats and version.

use std::collections::HashSet;
use std::path::PathBuf;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::doc::ErrorBody;
use super::error::{ApiError, Query};
use super::AppState;
use crate::instance::{InstanceView, ModelSource, Status, StopMode};
use crate::models::registry::{MemoryEstimate, Model};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_models))
        .routes(routes!(get_model, delete_model))
        .routes(routes!(model_metadata))
        .routes(routes!(unload_model))
        .routes(routes!(rescan))
        .routes(routes!(shard_storage))
        .routes(routes!(stats))
        .routes(routes!(version))
}

/// Context size of the memory estimates when the query names none.
const DEFAULT_CONTEXT: u64 = 4096;

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EstimateQuery {
    /// Context size (tokens) for `memory_estimate` [default: 4096].
    context: Option<u64>,
}

/// A registry entry with what the server knows about it now.
#[derive(Serialize, ToSchema)]
pub struct LocalModelView {
    #[serde(flatten)]
    model: Model,
    /// Weights, KV cache and compute buffers at `context`; null when the header lacks the
    /// figures it needs (or cannot be read).
    memory_estimate: Option<MemoryEstimate>,
    /// Instances whose model is one of this model's files.
    used_by: Vec<String>,
    /// Whether one of those instances has it loaded now.
    loaded: bool,
}

#[derive(Serialize, ToSchema)]
pub struct LocalModelList {
    models: Vec<LocalModelView>,
}

fn uses(instance: &InstanceView, model: &Model) -> bool {
    match &instance.source {
        ModelSource::Path { model_path } => model.has_file(model_path),
        ModelSource::HuggingFace { hf_repo, hf_file } => {
            model.source.repo_id.as_deref() == Some(hf_repo.as_str())
                && hf_file.as_ref().is_none_or(|f| model.source.filename.as_deref() == Some(f.as_str()))
        }
    }
}

fn holds_model(status: Status) -> bool {
    matches!(status, Status::Running | Status::Starting | Status::Restarting | Status::Stopping)
}

fn view(model: Model, instances: &[InstanceView], context: u64) -> LocalModelView {
    let users: Vec<&InstanceView> = instances.iter().filter(|i| uses(i, &model)).collect();
    LocalModelView {
        memory_estimate: model.estimate(context),
        used_by: users.iter().map(|i| i.name.clone()).collect(),
        loaded: users.iter().any(|i| holds_model(i.status)),
        model,
    }
}

/// Rescans the model directories (cheap: only changed files are read again) off the runtime.
pub(super) async fn rescanned(state: &AppState) -> Result<crate::models::registry::Rescan, ApiError> {
    let dirs = state.config.read().model_search_dirs();
    let store = state.models.clone();
    tokio::task::spawn_blocking(move || store.rescan(&dirs)).await.map_err(|e| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "the model scan failed")
            .with_details(e.to_string())
    })
}

pub(super) fn model_or_404(state: &AppState, id: &str) -> Result<Model, ApiError> {
    state.models.get(id).ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "MODEL_NOT_FOUND", "Model not found")
            .with_details(format!("no model with id '{id}'; GET /api/admin/models lists them"))
    })
}

/// The local models: the data dir's `models/` and `model_dirs`, each with its size, header
/// figures, split parts, memory estimate, source and the instances that use it.
#[utoipa::path(get, path = "/admin/models", operation_id = "list_local_models", tag = "models",
    params(EstimateQuery),
    responses((status = 200, description = "The models", body = LocalModelList),
        (status = 400, description = "Invalid query (`INVALID_QUERY`)", body = ErrorBody)))]
async fn list_models(
    State(state): State<AppState>,
    Query(q): Query<EstimateQuery>,
) -> Result<impl IntoResponse, ApiError> {
    rescanned(&state).await?;
    let instances = state.registry.list();
    let context = q.context.unwrap_or(DEFAULT_CONTEXT);
    let models = state.models.list().into_iter().map(|m| view(m, &instances, context)).collect();
    Ok(axum::Json(LocalModelList { models }))
}

/// One model, as the list shows it.
#[utoipa::path(get, path = "/admin/models/{id}", operation_id = "get_local_model", tag = "models",
    params(("id" = String, Path, description = "The model's id"), EstimateQuery),
    responses((status = 200, description = "The model", body = LocalModelView),
        (status = 400, description = "Invalid query (`INVALID_QUERY`)", body = ErrorBody),
        (status = 404, description = "No such model (`MODEL_NOT_FOUND`)", body = ErrorBody)))]
async fn get_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<EstimateQuery>,
) -> Result<impl IntoResponse, ApiError> {
    rescanned(&state).await?;
    let model = model_or_404(&state, &id)?;
    Ok(axum::Json(view(model, &state.registry.list(), q.context.unwrap_or(DEFAULT_CONTEXT))))
}

/// The model's GGUF header, read without loading it: general, architecture and tokenizer
/// fields, tensor counts, and every key/value pair but the vocabulary arrays.
#[utoipa::path(get, path = "/admin/models/{id}/metadata", operation_id = "get_model_metadata", tag = "models",
    params(("id" = String, Path, description = "The model's id")),
    responses((status = 200, description = "The header's metadata", body = Object),
        (status = 400, description = "The file is missing, corrupt or truncated (`INVALID_MODEL`)", body = ErrorBody),
        (status = 404, description = "No such model (`MODEL_NOT_FOUND`)", body = ErrorBody)))]
async fn model_metadata(State(state): State<AppState>, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    rescanned(&state).await?;
    let model = model_or_404(&state, &id)?;
    let path = model.path.clone();
    let parsed = tokio::task::spawn_blocking(move || crate::models::gguf::GgufFile::read(&path))
        .await
        .map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "read failed").with_details(e.to_string())
        })?
        .map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, "INVALID_MODEL", "The model's header cannot be read")
                .with_details(format!("{}: {e}", model.path.display()))
        })?;
    Ok(axum::Json(crate::models::metadata::describe(&model.id, &parsed)))
}

/// Deletes the model's files (every part present, and its source record). Refused while an
/// instance uses the model: delete or change the instance first.
#[utoipa::path(delete, path = "/admin/models/{id}", operation_id = "delete_local_model", tag = "models",
    params(("id" = String, Path, description = "The model's id")),
    responses((status = 200, description = "Deleted", body = Object),
        (status = 404, description = "No such model (`MODEL_NOT_FOUND`)", body = ErrorBody),
        (status = 409, description = "Instances use the model (`MODEL_IN_USE`)", body = ErrorBody),
        (status = 500, description = "A file could not be removed (`DELETE_FAILED`)", body = ErrorBody)))]
async fn delete_model(State(state): State<AppState>, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    rescanned(&state).await?;
    let model = model_or_404(&state, &id)?;
    let users: Vec<String> = state.registry.list().iter().filter(|i| uses(i, &model)).map(|i| i.name.clone()).collect();
    if !users.is_empty() {
        return Err(ApiError::new(StatusCode::CONFLICT, "MODEL_IN_USE", "The model is in use").with_details(format!(
            "used by the instances {}; delete them or point them at another model",
            users.join(", ")
        )));
    }
    let files: Vec<PathBuf> = model.present_files().collect();
    let sidecar = crate::models::registry::source_file(&model.path);
    let removed = tokio::task::spawn_blocking(move || {
        let mut removed = Vec::new();
        for f in &files {
            std::fs::remove_file(f).map_err(|e| format!("{}: {e}", f.display()))?;
            removed.push(f.display().to_string());
        }
        let _ = std::fs::remove_file(sidecar);
        Ok::<_, String>(removed)
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r)
    .map_err(|e| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "DELETE_FAILED", "The model could not be deleted")
            .with_details(e)
    })?;
    rescanned(&state).await?;
    Ok(axum::Json(json!({
        "status": "ok",
        "model_id": model.id,
        "deleted_files": removed,
        "freed_bytes": model.size_bytes,
    })))
}

/// Frees the model's memory without touching its files: drains and stops every instance that
/// has it loaded (their in-flight requests finish first, for up to 30 s).
#[utoipa::path(post, path = "/admin/models/{id}/unload", operation_id = "unload_model", tag = "models",
    params(("id" = String, Path, description = "The model's id")),
    responses((status = 200, description = "Unloaded; `segments_removed` counts the instances stopped", body = Object),
        (status = 404, description = "No such model (`MODEL_NOT_FOUND`)", body = ErrorBody)))]
async fn unload_model(State(state): State<AppState>, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    rescanned(&state).await?;
    let model = model_or_404(&state, &id)?;
    let loaded: Vec<InstanceView> =
        state.registry.list().into_iter().filter(|i| uses(i, &model) && holds_model(i.status)).collect();
    let freed: u64 = loaded.iter().filter_map(|i| i.stats.as_ref()).map(|s| s.memory_usage).sum();
    let mut stopped = Vec::new();
    let mut failed = Vec::new();
    for i in &loaded {
        match state.registry.stop(&i.name, StopMode::default()).await {
            Ok(_) => stopped.push(i.name.clone()),
            Err(e) => failed.push(json!({ "instance": i.name, "error": e.to_string() })),
        }
    }
    Ok(axum::Json(json!({
        "status": if failed.is_empty() { "unloaded" } else { "partial" },
        "model_id": model.id,
        "model_name": model.name,
        "segments_removed": stopped.len(),
        "instances_stopped": stopped,
        "errors": failed,
        "estimated_freed_mb": freed.div_ceil(1 << 20),
    })))
}

#[derive(Serialize, ToSchema)]
pub struct RescanAnswer {
    /// Always `ok`.
    status: &'static str,
    /// Models added, removed or changed since the previous scan.
    models_updated: Vec<String>,
    count: usize,
}

/// Rescans the model directories now, e.g. after copying files into them.
#[utoipa::path(post, path = "/admin/rescan-shards", operation_id = "rescan_models", tag = "models",
    responses((status = 200, description = "What changed", body = RescanAnswer)))]
async fn rescan(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let r = rescanned(&state).await?;
    Ok(axum::Json(RescanAnswer { status: "ok", models_updated: r.models_updated, count: r.count }))
}

/// Disk used by each model and memory used by the instances that have it loaded.
#[utoipa::path(get, path = "/admin/shard-storage", operation_id = "get_model_storage", tag = "models",
    responses((status = 200, description = "Per-model storage", body = Object)))]
async fn shard_storage(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    rescanned(&state).await?;
    let instances = state.registry.list();
    let mut total_disk = 0;
    let mut total_memory = 0;
    let models: Vec<Value> = state
        .models
        .list()
        .into_iter()
        .map(|m| {
            let loaded: Vec<&InstanceView> =
                instances.iter().filter(|i| uses(i, &m) && i.status == Status::Running).collect();
            let memory: u64 = loaded.iter().filter_map(|i| i.stats.as_ref()).map(|s| s.memory_usage).sum();
            total_disk += m.size_bytes;
            total_memory += memory;
            json!({
                "id": m.id,
                "name": m.name,
                "disk_bytes": m.size_bytes,
                "shards_present": m.shards.iter().filter(|s| s.present).count(),
                "shards_total": m.shards.len(),
                "loaded": !loaded.is_empty(),
                "memory_bytes": memory,
                "instances": loaded.iter().map(|i| i.name.clone()).collect::<Vec<_>>(),
            })
        })
        .collect();
    let dirs: Vec<String> = state.config.read().model_search_dirs().iter().map(|d| d.display().to_string()).collect();
    Ok(axum::Json(json!({
        "models": models,
        "total_disk_bytes": total_disk,
        "total_memory_bytes": total_memory,
        "dirs": dirs,
    })))
}

/// The node: host, CPU and memory use, instances, models, and the devices llama.cpp sees.
#[utoipa::path(get, path = "/admin/stats", operation_id = "get_node_stats", tag = "models",
    responses((status = 200, description = "Node statistics", body = Object),
        (status = 500, description = "The resource probe failed (`INTERNAL`)", body = ErrorBody)))]
async fn stats(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    rescanned(&state).await?;
    let probe = state.system.clone();
    let data_dir = state.config.read().data_dir.clone();
    let (r, devices) =
        tokio::task::spawn_blocking(move || (probe.sample(&data_dir), devices())).await.map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "probe failed").with_details(e.to_string())
        })?;
    let instances = state.registry.list();
    let running: HashSet<&str> =
        instances.iter().filter(|i| i.status == Status::Running).map(|i| i.name.as_str()).collect();
    Ok(axum::Json(json!({
        "hostname": sysinfo::System::host_name().unwrap_or_default(),
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "cpu_count": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu_usage": r.cpu_usage,
        "memory_total": r.memory_total,
        "memory_used": r.memory_used,
        "process_memory": r.process_memory,
        "disk_usage": r.disk_usage,
        "uptime": state.started.elapsed().as_secs(),
        "instances": { "total": instances.len(), "running": running.len() },
        "models": state.models.list().len(),
        "devices": devices,
    })))
}

/// The devices the linked llama.cpp can place layers on (CPU, and GPUs in GPU builds). RPC
/// workers' devices are left out: listing them would ask the workers over the network.
fn devices() -> Vec<Value> {
    use llama_cpp_2::LlamaBackendDeviceType;
    crate::engine::rpc::local_devices()
        .into_iter()
        .map(|d| {
            json!({
                "index": d.index,
                "name": d.name,
                "description": d.description,
                "backend": d.backend,
                "type": match d.device_type {
                    LlamaBackendDeviceType::Cpu => "cpu",
                    LlamaBackendDeviceType::Accelerator => "accelerator",
                    LlamaBackendDeviceType::Gpu => "gpu",
                    LlamaBackendDeviceType::IntegratedGpu => "igpu",
                    LlamaBackendDeviceType::Unknown => "unknown",
                },
                "memory_total": d.memory_total,
                "memory_free": d.memory_free,
            })
        })
        .collect()
}

/// This build: paddock's version and revision, and the llama.cpp bindings it links.
#[utoipa::path(get, path = "/admin/version", operation_id = "get_version", tag = "models",
    responses((status = 200, description = "Version information", body = Object)))]
async fn version() -> impl IntoResponse {
    axum::Json(json!({
        "version": crate::build::VERSION,
        "git_revision": crate::build::GIT_REVISION,
        "build_time": crate::build::build_time(),
        "llama_cpp_2": crate::build::LLAMA_CPP_2,
        "features": crate::build::FEATURES,
    }))
}
