//! Hugging Face routes of the admin API (seed 003): search, probe, downloads and their queue.
//!
//! Admission happens before a download starts: the repository's tree is read and the request
//! checked against it, so a missing file or a bad part index is a 4xx, not a failed download.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::doc::ErrorBody;
use super::error::{ApiError, Json, Query};
use super::AppState;
use crate::models::download::{DownloadRequest, DownloadView};
use crate::models::hub::{
    memory_available, model_id, recommended, variants, HubError, RemoteFile, RepoFile, RepoId, Variant,
};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(search))
        .routes(routes!(probe))
        .routes(routes!(download_shards))
        .routes(routes!(list_downloads))
        .routes(routes!(cancel_download))
        .routes(routes!(model_source))
}

impl From<HubError> for ApiError {
    fn from(e: HubError) -> Self {
        let (status, code) = match &e {
            HubError::Invalid(_) => (StatusCode::BAD_REQUEST, "INVALID_REQUEST"),
            HubError::NotFound(_) => (StatusCode::NOT_FOUND, "HUB_NOT_FOUND"),
            HubError::Unreachable { .. } => (StatusCode::BAD_GATEWAY, "HUB_UNREACHABLE"),
            HubError::Denied { .. } => (StatusCode::BAD_GATEWAY, "HUB_DENIED"),
            HubError::Status { .. } | HubError::Malformed { .. } => (StatusCode::BAD_GATEWAY, "HUB_ERROR"),
        };
        let message = match status {
            StatusCode::BAD_REQUEST => "Invalid request",
            StatusCode::NOT_FOUND => "Not found on the hub",
            _ => "The hub failed",
        };
        ApiError::new(status, code, message).with_details(e.to_string())
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SearchQuery {
    /// Words of the repository name, e.g. `gemma 270m`.
    query: String,
    /// Repositories to return, 1 to 50 [default: 10].
    limit: Option<usize>,
}

/// A repository with its GGUF variants.
#[derive(Serialize, ToSchema)]
pub struct SearchHit {
    repo_id: String,
    downloads: u64,
    likes: u64,
    variants: Vec<Variant>,
    /// The quantization of the variant to take (Q4_K_M when there is one that fits).
    recommended_variant: Option<String>,
    /// The file of that variant.
    recommended_filename: Option<String>,
    /// Whether the recommended variant fits the GPU memory llama.cpp reports (false without a GPU).
    fits_vram: bool,
    /// Whether it fits this machine's available RAM.
    fits_memory: bool,
}

/// Room a model needs beyond its file: KV cache and compute buffers at a modest context.
const HEADROOM: f64 = 1.2;

/// GGUF repositories on the hub matching the query, most downloaded first, each with its
/// quantization variants and sizes.
#[utoipa::path(get, path = "/admin/hf/search", operation_id = "hf_search", tag = "models",
    params(SearchQuery),
    responses((status = 200, description = "Matching repositories", body = Vec<SearchHit>),
        (status = 400, description = "Invalid query (`INVALID_QUERY`)", body = ErrorBody),
        (status = 502, description = "The hub cannot be reached or failed (`HUB_UNREACHABLE`, `HUB_ERROR`)", body = ErrorBody)))]
async fn search(State(state): State<AppState>, Query(q): Query<SearchQuery>) -> Result<impl IntoResponse, ApiError> {
    let limit = q.limit.unwrap_or(10);
    if !(1..=50).contains(&limit) {
        return Err(ApiError::bad_request("limit must be between 1 and 50").with_param("limit"));
    }
    let query = q.query.trim();
    if query.is_empty() {
        return Err(ApiError::bad_request("query must not be empty").with_param("query"));
    }
    let hub = state.downloads.hub().clone();
    let hits = hub.search(query, limit).await?;
    let (ram, vram) = tokio::task::spawn_blocking(memory_available).await.unwrap_or((0, 0));
    let trees = futures::future::join_all(hits.iter().map(|h| {
        let hub = hub.clone();
        async move {
            let repo = RepoId::parse(&h.id)?;
            hub.files(&repo).await
        }
    }))
    .await;
    let mut out = Vec::new();
    for (hit, files) in hits.into_iter().zip(trees) {
        // One repository the hub lists but cannot describe does not spoil the search.
        let Ok(files) = files else { continue };
        let variants = variants(&files);
        if variants.is_empty() {
            continue;
        }
        let best = recommended(&variants, ram).cloned();
        let need = |v: &Variant| (v.size_bytes as f64 * HEADROOM) as u64;
        out.push(SearchHit {
            repo_id: hit.id,
            downloads: hit.downloads,
            likes: hit.likes,
            recommended_variant: best.as_ref().and_then(|v| v.quant.clone()),
            recommended_filename: best.as_ref().map(|v| v.filename.clone()),
            fits_vram: best.as_ref().is_some_and(|v| need(v) <= vram),
            fits_memory: best.as_ref().is_some_and(|v| need(v) <= ram),
            variants,
        });
    }
    Ok(axum::Json(out))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ProbeQuery {
    repo_id: String,
    /// The GGUF file (any part of a split model).
    filename: String,
}

#[derive(Serialize, ToSchema)]
pub struct ProbedPart {
    index: u32,
    filename: String,
    size_bytes: u64,
    sha256: Option<String>,
    /// Already in the data dir's `models/`, complete.
    present: bool,
}

/// A remote model: its parts and sizes.
#[derive(Serialize, ToSchema)]
pub struct Probe {
    repo_id: String,
    filename: String,
    /// The model id it lands as.
    model_id: String,
    quant: Option<String>,
    size_bytes: u64,
    split: bool,
    shard_count: usize,
    parts: Vec<ProbedPart>,
}

/// Finds the variant `file` belongs to.
async fn resolve(state: &AppState, repo: &RepoId, file: &RepoFile) -> Result<(Variant, String), ApiError> {
    let files: Vec<RemoteFile> = state.downloads.hub().files(repo).await?;
    let variant = variants(&files)
        .into_iter()
        .find(|v| v.parts.iter().any(|p| p.path == file.as_str()))
        .ok_or_else(|| HubError::NotFound(format!("file '{}' in '{}'", file.as_str(), repo.as_str())))?;
    let id = model_id(&variant.filename);
    Ok((variant, id))
}

fn present(state: &AppState, repo: &RepoId, part: &RemoteFile) -> bool {
    crate::models::download::is_landed(state.downloads.dir(), repo, part)
}

fn parse_target(repo_id: &str, filename: &str) -> Result<(RepoId, RepoFile), ApiError> {
    let repo = RepoId::parse(repo_id).map_err(|e| ApiError::from(e).with_param("repo_id"))?;
    let file = RepoFile::parse(filename).map_err(|e| ApiError::from(e).with_param("filename"))?;
    Ok((repo, file))
}

/// Size and split layout of a GGUF on the hub, and which parts are here already.
#[utoipa::path(get, path = "/admin/hf/probe", operation_id = "hf_probe", tag = "models",
    params(ProbeQuery),
    responses((status = 200, description = "The remote model", body = Probe),
        (status = 400, description = "Invalid repo_id or filename (`INVALID_REQUEST`, `INVALID_QUERY`)", body = ErrorBody),
        (status = 404, description = "No such repository or file (`HUB_NOT_FOUND`)", body = ErrorBody),
        (status = 502, description = "The hub cannot be reached or failed", body = ErrorBody)))]
async fn probe(State(state): State<AppState>, Query(q): Query<ProbeQuery>) -> Result<impl IntoResponse, ApiError> {
    let (repo, file) = parse_target(&q.repo_id, &q.filename)?;
    let (variant, model_id) = resolve(&state, &repo, &file).await?;
    let parts = variant
        .parts
        .iter()
        .enumerate()
        .map(|(i, p)| ProbedPart {
            index: i as u32,
            filename: p.path.clone(),
            size_bytes: p.size_bytes,
            sha256: p.sha256.clone(),
            present: present(&state, &repo, p),
        })
        .collect::<Vec<_>>();
    Ok(axum::Json(Probe {
        repo_id: repo.as_str().to_string(),
        filename: variant.filename.clone(),
        model_id,
        quant: variant.quant.clone(),
        size_bytes: variant.size_bytes,
        split: parts.len() > 1,
        shard_count: parts.len(),
        parts,
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DownloadBody {
    repo_id: String,
    /// The GGUF file (any part of a split model).
    filename: String,
    /// 0-based parts of a split model to fetch [default: every part].
    #[serde(default)]
    shards: Option<Vec<u32>>,
}

#[derive(Serialize, ToSchema)]
pub struct DownloadStarted {
    /// `downloading`, or `already_local` when every asked part is here.
    status: &'static str,
    download: Option<DownloadView>,
    model_id: String,
}

/// Downloads a model (or chosen parts of a split one) into the data dir's `models/`. Returns at
/// once; `GET /api/admin/downloads` and the WebSocket follow it. A cancelled or interrupted
/// download resumes where it stopped when asked again.
#[utoipa::path(post, path = "/admin/hf/download-shards", operation_id = "hf_download", tag = "models",
    request_body = DownloadBody,
    responses((status = 202, description = "Downloading", body = DownloadStarted),
        (status = 200, description = "Every asked part is here already", body = DownloadStarted),
        (status = 400, description = "Invalid repo_id, filename or shards (`INVALID_REQUEST`)", body = ErrorBody),
        (status = 404, description = "No such repository or file (`HUB_NOT_FOUND`)", body = ErrorBody),
        (status = 409, description = "Another download of the model is running or stopping, or a file of the same name from elsewhere is in the way (`DOWNLOAD_CONFLICT`)", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 422, description = "A field is missing, unknown or of the wrong type (`INVALID_JSON`)", body = ErrorBody),
        (status = 502, description = "The hub cannot be reached or failed", body = ErrorBody)))]
async fn download_shards(
    State(state): State<AppState>,
    Json(body): Json<DownloadBody>,
) -> Result<impl IntoResponse, ApiError> {
    let (repo, file) = parse_target(&body.repo_id, &body.filename)?;
    let (variant, model_id) = resolve(&state, &repo, &file).await?;
    let wanted: Vec<RemoteFile> = match &body.shards {
        None => variant.parts.clone(),
        Some(indices) if indices.is_empty() => {
            return Err(ApiError::bad_request("shards must name at least one part").with_param("shards"))
        }
        Some(indices) => {
            let mut picked = Vec::new();
            for &i in indices {
                let part = variant.parts.get(i as usize).ok_or_else(|| {
                    ApiError::bad_request(format!("shard {i} does not exist"))
                        .with_details(format!(
                            "'{}' has {} parts, numbered from 0",
                            variant.filename,
                            variant.parts.len()
                        ))
                        .with_param("shards")
                })?;
                if !picked.iter().any(|p: &RemoteFile| p.path == part.path) {
                    picked.push(part.clone());
                }
            }
            picked
        }
    };
    if wanted.iter().all(|p| present(&state, &repo, p)) {
        return Ok((StatusCode::OK, axum::Json(DownloadStarted { status: "already_local", download: None, model_id })));
    }
    let view = state.downloads.start(DownloadRequest { id: model_id.clone(), repo, files: wanted }).map_err(|e| {
        ApiError::new(StatusCode::CONFLICT, "DOWNLOAD_CONFLICT", "The download cannot start now").with_details(e.0)
    })?;
    Ok((StatusCode::ACCEPTED, axum::Json(DownloadStarted { status: "downloading", download: Some(view), model_id })))
}

#[derive(Serialize, ToSchema)]
pub struct DownloadList {
    downloads: Vec<DownloadView>,
}

/// Downloads of this run of paddock (and the interrupted ones it resumed), with per-file
/// progress, speed and ETA.
#[utoipa::path(get, path = "/admin/downloads", operation_id = "list_downloads", tag = "models",
    responses((status = 200, description = "The queue", body = DownloadList)))]
async fn list_downloads(State(state): State<AppState>) -> impl IntoResponse {
    axum::Json(DownloadList { downloads: state.downloads.list() })
}

/// Stops a download; the bytes fetched so far stay, and asking for the model again resumes.
#[utoipa::path(post, path = "/admin/downloads/{id}/cancel", operation_id = "cancel_download", tag = "models",
    params(("id" = String, Path, description = "The download's model id")),
    responses((status = 200, description = "Cancelling", body = DownloadView),
        (status = 404, description = "No such download (`DOWNLOAD_NOT_FOUND`)", body = ErrorBody),
        (status = 409, description = "The download has ended (`DOWNLOAD_NOT_ACTIVE`)", body = ErrorBody)))]
async fn cancel_download(State(state): State<AppState>, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    let view = state.downloads.get(&id).ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "DOWNLOAD_NOT_FOUND", "Download not found")
            .with_details(format!("no download '{id}'; GET /api/admin/downloads lists them"))
    })?;
    if !view.status.is_active() {
        return Err(ApiError::new(StatusCode::CONFLICT, "DOWNLOAD_NOT_ACTIVE", "The download has ended")
            .with_details(format!("download '{id}' is {:?}", view.status).to_lowercase()));
    }
    state.downloads.cancel(&id);
    Ok(axum::Json(view))
}

/// Where a local model came from, by its source record.
#[utoipa::path(get, path = "/admin/hf/source/{id}", operation_id = "hf_source", tag = "models",
    params(("id" = String, Path, description = "The model's id")),
    responses((status = 200, description = "The source", body = Object),
        (status = 404, description = "No such model, or not from a hub (`MODEL_NOT_FOUND`, `SOURCE_UNKNOWN`)", body = ErrorBody)))]
async fn model_source(State(state): State<AppState>, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    super::admin::rescanned(&state).await?;
    let model = super::admin::model_or_404(&state, &id)?;
    match (&model.source.repo_id, &model.source.filename) {
        (Some(repo), Some(file)) => Ok(axum::Json(serde_json::json!({
            "model_id": model.id, "repo_id": repo, "filename": file,
        }))),
        _ => Err(ApiError::new(StatusCode::NOT_FOUND, "SOURCE_UNKNOWN", "The model has no known source")
            .with_details(format!("'{id}' is a local file, not a download from a hub"))),
    }
}
