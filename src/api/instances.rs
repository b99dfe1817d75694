//! Instance management routes (llamactl's API reference shapes, both create forms).

use std::path::PathBuf;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tracing::Level;

use super::error::{ApiError, Json};
use super::AppState;
use crate::instance::{
    InstanceError, InstanceOptions, InstanceSpec, ModelSource, Policy, PolicyPatch, SpecPatch, Status, StopMode,
};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/instances", get(list).post(create))
        .route("/instances/start-all", post(start_all))
        .route("/instances/stop-all", post(stop_all))
        .route("/instances/{name}", get(show).post(create_named).put(update).delete(remove))
        .route("/instances/{name}/start", post(start))
        .route("/instances/{name}/stop", post(stop))
        .route("/instances/{name}/restart", post(restart))
        .route("/instances/{name}/logs", get(logs))
        .route("/instances/{name}/health", get(health))
}

/// Either create/update form's body, parsed into the parts of a spec. Unknown fields anywhere
/// are refused by name: a typo must not be silently dropped.
#[derive(Debug, Default)]
struct Body {
    name: Option<String>,
    source: Option<ModelSource>,
    port: Option<u16>,
    options: InstanceOptions,
    policy: PolicyPatch,
}

const POLICY_FIELDS: [&str; 6] =
    ["auto_restart", "max_restarts", "restart_delay", "on_demand_start", "idle_timeout", "evictable"];

fn invalid(details: impl Into<String>) -> ApiError {
    ApiError::bad_request("Invalid request body").with_details(details)
}

/// Parses `{"name","model_path","port","options":{…}}` (seed 002) and
/// `{"backend_type":"llama_cpp","backend_options":{"model"|"hf_repo"+"hf_file",…},…}` (llamactl),
/// with the policy fields at the top level in both.
fn parse_body(value: Value) -> Result<Body, ApiError> {
    let Value::Object(mut top) = value else { return Err(invalid("the body must be a JSON object")) };
    let mut body = Body::default();
    let mut policy = Map::new();
    for key in POLICY_FIELDS {
        if let Some(v) = top.remove(key) {
            policy.insert(key.into(), v);
        }
    }
    body.policy = serde_json::from_value(Value::Object(policy)).map_err(|e| invalid(e.to_string()))?;
    body.name = take_string(&mut top, "name")?;
    body.port = take(&mut top, "port")?;
    let model_path: Option<PathBuf> = take(&mut top, "model_path")?;
    let mut options = match top.remove("options") {
        Some(Value::Object(o)) => o,
        Some(Value::Null) | None => Map::new(),
        Some(_) => return Err(invalid("options must be an object")),
    };
    if let Some(kind) = top.remove("backend_type") {
        if kind != "llama_cpp" {
            return Err(invalid(format!("backend_type {kind} is not supported; paddock runs llama_cpp")));
        }
    }
    let mut hf: (Option<String>, Option<String>) = (None, None);
    let mut backend_model = None;
    match top.remove("backend_options") {
        Some(Value::Object(mut b)) => {
            backend_model = take::<PathBuf>(&mut b, "model")?;
            hf = (take_string(&mut b, "hf_repo")?, take_string(&mut b, "hf_file")?);
            if let Some(port) = take(&mut b, "port")? {
                body.port = Some(port);
            }
            options.extend(b);
        }
        Some(Value::Null) | None => {}
        Some(_) => return Err(invalid("backend_options must be an object")),
    }
    let options_error = |e: String| {
        ApiError::new(StatusCode::BAD_REQUEST, "INVALID_OPTIONS", "Invalid instance options").with_details(e)
    };
    // llama-server flags by their names, at the top level or inside the options.
    for extra in [top.remove("extra"), options.remove("extra")].into_iter().flatten() {
        let Value::Object(extra) = extra else { return Err(invalid("extra must be an object of llama-server flags")) };
        crate::instance::options::fold_extra(&mut options, extra).map_err(options_error)?;
    }
    if let Some(field) = top.keys().next() {
        return Err(invalid(format!("unknown field `{field}`")));
    }
    body.options = serde_json::from_value(Value::Object(options)).map_err(|e| options_error(e.to_string()))?;
    body.source = match (model_path.or(backend_model), hf) {
        (Some(model_path), (None, None)) => Some(ModelSource::Path { model_path }),
        (None, (Some(hf_repo), hf_file)) => Some(ModelSource::HuggingFace { hf_repo, hf_file }),
        (None, (None, Some(_))) => return Err(invalid("hf_file needs hf_repo")),
        (None, (None, None)) => None,
        (Some(_), _) => return Err(invalid("give either a model path or hf_repo/hf_file, not both")),
    };
    Ok(body)
}

fn take<T: serde::de::DeserializeOwned>(map: &mut Map<String, Value>, key: &str) -> Result<Option<T>, ApiError> {
    match map.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v).map(Some).map_err(|e| invalid(format!("{key}: {e}"))),
    }
}

fn take_string(map: &mut Map<String, Value>, key: &str) -> Result<Option<String>, ApiError> {
    take(map, key)
}

/// Parses a body sent to `/instances/{name}`; a `name` in it must be that name.
fn parse_for(value: Value, name: &str, mismatch: &str) -> Result<Body, ApiError> {
    let body = parse_body(value)?;
    if body.name.as_deref().is_some_and(|n| n != name) {
        return Err(invalid(mismatch));
    }
    Ok(body)
}

async fn create(State(state): State<AppState>, Json(value): Json<Value>) -> Result<impl IntoResponse, ApiError> {
    let body = parse_body(value)?;
    let name = body.name.clone().ok_or_else(|| invalid("missing field `name`"))?;
    create_from(&state, name, body).await
}

async fn create_named(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Json(value): Json<Value>,
) -> Result<impl IntoResponse, ApiError> {
    let body = parse_for(value, &name, "the name in the body differs from the one in the path")?;
    create_from(&state, name, body).await
}

async fn create_from(state: &AppState, name: String, body: Body) -> Result<(StatusCode, axum::Json<Value>), ApiError> {
    let source =
        body.source.ok_or_else(|| invalid("give a model: model_path (or backend_options.model), or hf_repo"))?;
    let mut policy = Policy::default();
    policy.apply(&body.policy);
    let spec = InstanceSpec { name, source, port: body.port, options: body.options, policy };
    let instance = state.registry.create(spec).await?;
    Ok((StatusCode::CREATED, axum::Json(json!({ "message": "Instance created successfully", "instance": instance }))))
}

async fn update(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Json(value): Json<Value>,
) -> Result<impl IntoResponse, ApiError> {
    let body = parse_for(value, &name, "an instance cannot be renamed")?;
    let patch = SpecPatch { source: body.source, port: body.port, options: body.options, policy: body.policy };
    let (instance, restart_required) = state.registry.update(&name, &patch).await?;
    let message = if restart_required {
        "Instance updated; restart it to apply the changes"
    } else {
        "Instance updated successfully"
    };
    Ok(axum::Json(json!({ "message": message, "restart_required": restart_required, "instance": instance })))
}

async fn list(State(state): State<AppState>) -> impl IntoResponse {
    axum::Json(json!({ "instances": state.registry.list() }))
}

async fn show(State(state): State<AppState>, Path(name): Path<String>) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(state.registry.get(&name)?))
}

async fn remove(State(state): State<AppState>, Path(name): Path<String>) -> Result<impl IntoResponse, ApiError> {
    state.registry.delete(&name).await?;
    Ok(axum::Json(json!({ "message": "Instance deleted successfully" })))
}

async fn start(State(state): State<AppState>, Path(name): Path<String>) -> Result<impl IntoResponse, ApiError> {
    let status = state.registry.start(&name).await?;
    Ok(axum::Json(json!({ "message": "Instance start initiated", "status": status })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StopBody {
    #[serde(default)]
    force: bool,
    /// Seconds in-flight requests may take to finish.
    timeout: Option<f64>,
}

/// The stop body is optional (llamactl's clients send none); an empty body means the defaults.
fn stop_mode(bytes: &[u8]) -> Result<StopMode, ApiError> {
    let body: StopBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        StopBody::default()
    } else {
        serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?
    };
    let mut mode = StopMode { force: body.force, ..StopMode::default() };
    if let Some(t) = body.timeout {
        if !(t.is_finite() && (0.0..=3600.0).contains(&t)) {
            return Err(invalid(format!("timeout must be between 0 and 3600 seconds, got {t}")));
        }
        mode.timeout = Duration::from_secs_f64(t);
    }
    Ok(mode)
}

async fn stop(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let status = state.registry.stop(&name, stop_mode(&body)?).await?;
    let message = if status == Status::Stopped { "Instance stopped" } else { "Instance stop initiated" };
    Ok(axum::Json(json!({ "message": message, "status": status })))
}

async fn restart(State(state): State<AppState>, Path(name): Path<String>) -> Result<impl IntoResponse, ApiError> {
    let status = state.registry.restart(&name).await?;
    Ok(axum::Json(json!({ "message": "Instance restart initiated", "status": status })))
}

fn results(results: Vec<(String, Result<Status, InstanceError>)>) -> Value {
    let items: Vec<Value> = results
        .into_iter()
        .map(|(name, r)| match r {
            Ok(status) => json!({ "name": name, "status": status }),
            Err(e) => {
                let e = ApiError::from(e);
                json!({ "name": name, "error": e.message, "code": e.code, "details": e.details })
            }
        })
        .collect();
    json!({ "results": items })
}

async fn start_all(State(state): State<AppState>) -> impl IntoResponse {
    axum::Json(results(state.registry.start_all().await))
}

async fn stop_all(State(state): State<AppState>, body: Bytes) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(results(state.registry.stop_all(stop_mode(&body)?).await)))
}

#[derive(Debug, Deserialize)]
struct LogQuery {
    lines: Option<usize>,
    level: Option<String>,
    #[serde(default)]
    follow: bool,
}

async fn logs(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let level = match q.level.as_deref() {
        None => None,
        Some(l) => Some(l.parse::<Level>().map_err(|_| {
            ApiError::bad_request("Invalid log level")
                .with_details(format!("level must be debug, info, warn or error, got '{l}'"))
        })?),
    };
    let lines = q.lines.unwrap_or(100);
    if !q.follow {
        let logs = state.registry.logs(&name, lines, level)?;
        return Ok(axum::Json(json!({ "logs": logs })).into_response());
    }
    // follow=true: the tail, then every new line, as SSE events of one line each, until the
    // client leaves (or the instance is deleted and its buffer dropped).
    let (tail, rx) = state.registry.log_buffer(&name)?.follow(lines, level);
    let backlog = futures::stream::iter(tail.into_iter().map(Ok));
    let live = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |r| {
        futures::future::ready(match r {
            Ok(line) if crate::logs::at_least(&line, level) => Some(Ok(line)),
            Ok(_) => None,
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                Some(Ok(crate::logs::LogLine {
                    timestamp: chrono::Utc::now(),
                    level: "warn",
                    message: format!("{n} lines skipped"),
                }))
            }
        })
    });
    let events = backlog.chain(live).map(|r: Result<crate::logs::LogLine, std::convert::Infallible>| {
        r.map(|line| Event::default().data(serde_json::to_string(&line).unwrap_or_default()))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
}

async fn health(State(state): State<AppState>, Path(name): Path<String>) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(state.registry.health(&name).await?))
}
