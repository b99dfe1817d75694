//! Server information and liveness.

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde_json::json;

use super::AppState;
use crate::build;

pub fn routes() -> Router<AppState> {
    Router::new().route("/system/info", get(info))
}

/// Routes outside `/api`.
pub fn root_routes() -> Router<AppState> {
    Router::new().route("/health", get(health))
}

async fn info(State(state): State<AppState>) -> impl IntoResponse {
    axum::Json(json!({
        "version": build::VERSION,
        "git_revision": build::GIT_REVISION,
        "build_time": build::build_time(),
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "cpu_count": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "uptime": state.started.elapsed().as_secs(),
    }))
}

async fn health() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}
