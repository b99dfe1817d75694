//! Server information, status and liveness.

use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;
use parking_lot::Mutex;
use serde_json::json;
use sysinfo::{Disks, Pid, ProcessesToUpdate, System};

use axum::http::StatusCode;

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::doc::{self, ErrorBody};
use super::error::{ApiError, Json};
use super::AppState;
use crate::build;
use crate::config::ConfigPatch;
use crate::instance::Status;

/// The routes under `/api`, each with its `#[utoipa::path]`.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(info))
        .routes(routes!(status))
        .routes(routes!(alerts))
        .routes(routes!(config, update_config))
}

/// Routes outside `/api`.
pub fn root_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(health))
}

/// One `sysinfo::System` kept between calls: CPU usage is the change since the previous refresh.
#[derive(Clone, Default)]
pub struct SystemProbe(Arc<Mutex<Option<System>>>);

pub(crate) struct Resources {
    pub cpu_usage: f32,
    pub memory_used: u64,
    pub memory_total: u64,
    pub process_memory: u64,
    pub disk_usage: f64,
}

impl SystemProbe {
    pub(crate) fn sample(&self, data_dir: &std::path::Path) -> Resources {
        let mut guard = self.0.lock();
        let sys = guard.get_or_insert_with(|| {
            let mut s = System::new();
            s.refresh_cpu_usage();
            s
        });
        sys.refresh_cpu_usage();
        sys.refresh_memory();
        let pid = Pid::from_u32(std::process::id());
        sys.refresh_processes(ProcessesToUpdate::Some(&[pid]), true);
        let process_memory = sys.process(pid).map(|p| p.memory()).unwrap_or(0);
        // The disk that holds the data dir: the longest mount point that prefixes it.
        let disks = Disks::new_with_refreshed_list();
        let disk_usage = disks
            .iter()
            .filter(|d| data_dir.starts_with(d.mount_point()))
            .max_by_key(|d| d.mount_point().as_os_str().len())
            .map(|d| 100.0 * (1.0 - d.available_space() as f64 / d.total_space().max(1) as f64))
            .unwrap_or(0.0);
        Resources {
            cpu_usage: sys.global_cpu_usage(),
            memory_used: sys.used_memory(),
            memory_total: sys.total_memory(),
            process_memory,
            disk_usage,
        }
    }
}

/// What paddock runs on, and which build it is.
#[utoipa::path(
    get,
    path = "/system/info",
    operation_id = "get_system_info",
    tag = "system",
    responses((status = 200, description = "Host and build information", body = doc::SystemInfo)),
)]
async fn info(State(state): State<AppState>) -> impl IntoResponse {
    axum::Json(json!({
        "hostname": System::host_name().unwrap_or_default(),
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "cpu_count": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "memory_total": System::new_with_specifics(sysinfo::RefreshKind::nothing().with_memory(sysinfo::MemoryRefreshKind::everything())).total_memory(),
        "version": build::VERSION,
        "git_revision": build::GIT_REVISION,
        "build_time": build::build_time(),
        "uptime": state.started.elapsed().as_secs(),
    }))
}

/// Instances by status, alerts, and resource use.
#[utoipa::path(
    get,
    path = "/system/status",
    operation_id = "get_system_status",
    tag = "system",
    responses(
        (status = 200, description = "The server's status", body = doc::SystemStatus),
        (status = 500, description = "The resource probe failed (`INTERNAL`)", body = ErrorBody),
    ),
)]
async fn status(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let instances = state.registry.list();
    let count = |s: Status| instances.iter().filter(|i| i.status == s).count();
    let probe = state.system.clone();
    let data_dir = state.config.read().data_dir.clone();
    let r = tokio::task::spawn_blocking(move || probe.sample(&data_dir)).await.map_err(|e| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "status probe failed").with_details(e.to_string())
    })?;
    Ok(axum::Json(json!({
        "version": build::VERSION,
        "uptime": state.started.elapsed().as_secs(),
        "instances": {
            "total": instances.len(),
            "running": count(Status::Running),
            "starting": count(Status::Starting),
            "stopping": count(Status::Stopping),
            "stopped": count(Status::Stopped),
            "failed": count(Status::Failed),
            "restarting": count(Status::Restarting),
            "parked": count(Status::Parked),
        },
        "alerts": state.registry.alerts().len(),
        "memory_budget": state.registry.memory_usage(),
        "scheduler": state.registry.scheduler(),
        "resources": {
            "cpu_usage": r.cpu_usage,
            "memory_usage": r.memory_used,
            "memory_total": r.memory_total,
            "process_memory": r.process_memory,
            "disk_usage": r.disk_usage,
        },
    })))
}

/// Alerts raised since paddock started (the latest 100), oldest first.
#[utoipa::path(
    get,
    path = "/system/alerts",
    operation_id = "list_alerts",
    tag = "system",
    responses((status = 200, description = "The alerts", body = doc::AlertList)),
)]
async fn alerts(State(state): State<AppState>) -> impl IntoResponse {
    axum::Json(json!({ "alerts": state.registry.alerts() }))
}

/// The effective configuration (paddock has no secrets in it yet).
#[utoipa::path(
    get,
    path = "/config",
    operation_id = "get_config",
    tag = "system",
    responses((status = 200, description = "The configuration in effect", body = crate::config::Config)),
)]
pub(super) async fn config(State(state): State<AppState>) -> impl IntoResponse {
    axum::Json(json!(state.config.read().redacted()))
}

/// Validates a partial change, saves it to the config file, applies what can apply live, and
/// says which changes wait for a restart of paddock.
#[utoipa::path(
    put,
    path = "/config",
    operation_id = "update_config",
    tag = "system",
    request_body = crate::config::ConfigPatch,
    responses(
        (status = 200, description = "Saved; `applied` and `restart_required` say when each change takes effect", body = doc::ConfigUpdated),
        (status = 400, description = "Invalid configuration, or not JSON (`INVALID_CONFIG`, `INVALID_JSON`)", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 422, description = "A field has the wrong type or is unknown (`INVALID_JSON`)", body = ErrorBody),
        (status = 500, description = "The file could not be written (`CONFIG_SAVE_FAILED`)", body = ErrorBody),
    ),
)]
pub(super) async fn update_config(
    State(state): State<AppState>,
    Json(patch): Json<ConfigPatch>,
) -> Result<impl IntoResponse, ApiError> {
    let current = state.config.read().clone();
    let (next, report) = current.patched(&patch).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "INVALID_CONFIG", "Invalid configuration").with_details(e)
    })?;
    let (to_save, path) = (next.clone(), state.config_path.clone());
    tokio::task::spawn_blocking(move || to_save.save(&path))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
        .map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "CONFIG_SAVE_FAILED", "Could not save the configuration")
                .with_details(e)
        })?;
    // What needs a restart stays as it is in memory until then.
    let mut live = current;
    live.max_running_instances = next.max_running_instances;
    live.on_demand_start_timeout = next.on_demand_start_timeout;
    live.memory_budget = next.memory_budget;
    live.swap_max_wait = next.swap_max_wait;
    live.swap_min_resident = next.swap_min_resident;
    super::apply_limits(&state.registry, &live);
    *state.config.write() = live;
    let message = if report.restart_required.is_empty() {
        "Configuration updated"
    } else {
        "Configuration saved; some changes apply after a restart"
    };
    Ok(axum::Json(
        json!({ "message": message, "config": next.redacted(), "applied": report.applied, "restart_required": report.restart_required }),
    ))
}

/// Liveness: answers while the server runs.
#[utoipa::path(
    get,
    path = "/health",
    operation_id = "health",
    tag = "system",
    security(()),
    responses((status = 200, description = "The server is up", body = doc::StatusOk)),
)]
async fn health() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}
