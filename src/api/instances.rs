//! Instance management routes (llamactl's API reference shapes, both create forms).

use std::path::PathBuf;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tracing::Level;

use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::doc::{self, ErrorBody};
use super::error::{ApiError, Json, Path, Query};
use super::AppState;
use crate::instance::{
    InstanceError, InstanceOptions, InstanceSpec, ModelSource, Policy, PolicyPatch, SpecPatch, Status, StopMode,
};

/// The routes, each with its `#[utoipa::path]` (one `routes!` per path).
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(start_all))
        .routes(routes!(stop_all))
        .routes(routes!(show, create_named, update, remove))
        .routes(routes!(start))
        .routes(routes!(stop))
        .routes(routes!(restart))
        .routes(routes!(logs))
        .routes(routes!(health))
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

pub(super) const POLICY_FIELDS: [&str; 7] =
    ["auto_restart", "max_restarts", "restart_delay", "on_demand_start", "idle_timeout", "evictable", "group"];

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
    // Errors name the field (`max_restarts: invalid value…`), so a form can show them beside it.
    body.policy = serde_path_to_error::deserialize(Value::Object(policy)).map_err(|e| invalid(e.to_string()))?;
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
    body.options =
        serde_path_to_error::deserialize(Value::Object(options)).map_err(|e| options_error(e.to_string()))?;
    body.source = match (model_path.or(backend_model), hf) {
        (Some(model_path), (None, None)) => Some(ModelSource::Path { model_path }),
        (None, (Some(hf_repo), hf_file)) => Some(ModelSource::HuggingFace { hf_repo, hf_file }),
        (None, (None, Some(_))) => return Err(invalid("hf_file needs hf_repo")),
        (None, (None, None)) => None,
        (Some(_), _) => return Err(invalid("give either a model path or hf_repo/hf_file, not both")),
    };
    Ok(body)
}

/// Replaces `{"adapter": "<id>"}` entries of `lora` (in `options` or `backend_options`) by the
/// registered adapter's path, so instances attach adapters by id.
fn with_adapter_paths(state: &AppState, mut value: Value) -> Result<Value, ApiError> {
    for key in ["options", "backend_options"] {
        let Some(Value::Array(lora)) = value.get_mut(key).and_then(|o| o.get_mut("lora")) else { continue };
        for (i, entry) in lora.iter_mut().enumerate() {
            let Some(map) = entry.as_object_mut() else { continue };
            let Some(id) = map.remove("adapter") else { continue };
            let Some(id) = id.as_str() else {
                return Err(invalid(format!("{key}.lora[{i}].adapter must be an adapter id (a string)")));
            };
            if map.contains_key("path") {
                return Err(invalid(format!("{key}.lora[{i}]: give either adapter or path, not both")));
            }
            let adapter = state.adapters.get(id).ok_or_else(|| {
                invalid(format!("{key}.lora[{i}].adapter: no adapter '{id}'; GET /api/admin/adapters lists them"))
            })?;
            map.insert("path".into(), json!(adapter.path));
        }
    }
    Ok(value)
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

/// Create an instance (stopped), from either body form; `name` is required.
#[utoipa::path(
    post,
    path = "/instances",
    operation_id = "create_instance",
    tag = "instances",
    request_body = doc::InstanceBody,
    params(DryRunQuery),
    responses(
        (status = 200, description = "With `dry_run=true`: what the instance would cost in memory and whether it fits now; nothing is created", body = crate::instance::DryRun),
        (status = 201, description = "Created", body = doc::InstanceCreated),
        (status = 400, description = "Invalid body, name, options or model (`INVALID_REQUEST`, `INVALID_JSON`, `INVALID_NAME`, `INVALID_OPTIONS`, `MODEL_NOT_FOUND`, `INVALID_MODEL`), or `nodes` names no configured node (`UNKNOWN_NODE`, `INVALID_NODES`)", body = ErrorBody),
        (status = 409, description = "An instance of that name exists (`INSTANCE_EXISTS`)", body = ErrorBody),
        (status = 502, description = "`nodes` names a remote node that cannot be reached (`NODE_UNAVAILABLE`)", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 500, description = "The instance could not be saved (`STORE_ERROR`)", body = ErrorBody),
    ),
)]
async fn create(
    State(state): State<AppState>,
    Query(q): Query<DryRunQuery>,
    Json(value): Json<Value>,
) -> Result<impl IntoResponse, ApiError> {
    let body = parse_body(with_adapter_paths(&state, value)?)?;
    let name = body.name.clone().ok_or_else(|| invalid("missing field `name`"))?;
    create_from(&state, name, body, q.dry_run).await
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct DryRunQuery {
    /// Only answer what the instance would cost in memory and whether it fits now.
    #[serde(default)]
    dry_run: bool,
}

/// Create an instance named by the path (llamactl's form); a `name` in the body must match.
#[utoipa::path(
    post,
    path = "/instances/{name}",
    operation_id = "create_named_instance",
    tag = "instances",
    params(("name" = String, Path, description = "The new instance's name"), DryRunQuery),
    request_body = doc::InstanceBody,
    responses(
        (status = 200, description = "With `dry_run=true`: what the instance would cost in memory and whether it fits now; nothing is created", body = crate::instance::DryRun),
        (status = 201, description = "Created", body = doc::InstanceCreated),
        (status = 400, description = "Invalid body, name, options or model (`INVALID_REQUEST`, `INVALID_JSON`, `INVALID_NAME`, `INVALID_OPTIONS`, `MODEL_NOT_FOUND`, `INVALID_MODEL`), or `nodes` names no configured node (`UNKNOWN_NODE`, `INVALID_NODES`)", body = ErrorBody),
        (status = 409, description = "An instance of that name exists (`INSTANCE_EXISTS`)", body = ErrorBody),
        (status = 502, description = "`nodes` names a remote node that cannot be reached (`NODE_UNAVAILABLE`)", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 500, description = "The instance could not be saved (`STORE_ERROR`)", body = ErrorBody),
    ),
)]
async fn create_named(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<DryRunQuery>,
    Json(value): Json<Value>,
) -> Result<impl IntoResponse, ApiError> {
    let body =
        parse_for(with_adapter_paths(&state, value)?, &name, "the name in the body differs from the one in the path")?;
    create_from(&state, name, body, q.dry_run).await
}

async fn create_from(
    state: &AppState,
    name: String,
    body: Body,
    dry_run: bool,
) -> Result<(StatusCode, axum::Json<Value>), ApiError> {
    let source =
        body.source.ok_or_else(|| invalid("give a model: model_path (or backend_options.model), or hf_repo"))?;
    let mut policy = Policy::default();
    policy.apply(&body.policy);
    let spec = InstanceSpec { name, source, port: body.port, options: body.options, policy };
    if dry_run {
        let answer = state.registry.dry_run(spec).await?;
        return Ok((StatusCode::OK, axum::Json(serde_json::to_value(answer).unwrap_or_default())));
    }
    let instance = state.registry.create(spec).await?;
    Ok((StatusCode::CREATED, axum::Json(json!({ "message": "Instance created successfully", "instance": instance }))))
}

/// Change an instance: only the fields given change (options merge). Some changes apply at
/// the next start; the answer says so.
#[utoipa::path(
    put,
    path = "/instances/{name}",
    operation_id = "update_instance",
    tag = "instances",
    params(("name" = String, Path, description = "The instance's name")),
    request_body = doc::InstanceBody,
    responses(
        (status = 200, description = "Updated", body = doc::InstanceUpdated),
        (status = 400, description = "Invalid body, options or model, or a different name (`INVALID_REQUEST`, `INVALID_JSON`, `INVALID_OPTIONS`, `MODEL_NOT_FOUND`, `INVALID_MODEL`), or `nodes` would move it to another node (`INVALID_NODES`, `UNKNOWN_NODE`)", body = ErrorBody),
        (status = 404, description = "No such instance (`INSTANCE_NOT_FOUND`)", body = ErrorBody),
        (status = 502, description = "The instance lives on a remote node that cannot be reached (`NODE_UNAVAILABLE`)", body = ErrorBody),
        (status = 409, description = "The change is not allowed in the instance's state", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 500, description = "The change could not be saved (`STORE_ERROR`)", body = ErrorBody),
    ),
)]
async fn update(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Json(value): Json<Value>,
) -> Result<impl IntoResponse, ApiError> {
    let body = parse_for(with_adapter_paths(&state, value)?, &name, "an instance cannot be renamed")?;
    let patch = SpecPatch { source: body.source, port: body.port, options: body.options, policy: body.policy };
    let (instance, restart_required) = state.registry.update(&name, &patch).await?;
    let message = if restart_required {
        "Instance updated; restart it to apply the changes"
    } else {
        "Instance updated successfully"
    };
    Ok(axum::Json(json!({ "message": message, "restart_required": restart_required, "instance": instance })))
}

/// All instances.
#[utoipa::path(
    get,
    path = "/instances",
    operation_id = "list_instances",
    tag = "instances",
    responses((status = 200, description = "Every instance", body = doc::InstanceList)),
)]
async fn list(State(state): State<AppState>) -> impl IntoResponse {
    axum::Json(json!({ "instances": state.registry.list() }))
}

/// One instance: its spec, status, and while running its model and counters.
#[utoipa::path(
    get,
    path = "/instances/{name}",
    operation_id = "get_instance",
    tag = "instances",
    params(("name" = String, Path, description = "The instance's name")),
    responses(
        (status = 200, description = "The instance", body = crate::instance::InstanceView),
        (status = 404, description = "No such instance (`INSTANCE_NOT_FOUND`)", body = ErrorBody),
        (status = 502, description = "The instance lives on a remote node that cannot be reached (`NODE_UNAVAILABLE`)", body = ErrorBody),
    ),
)]
async fn show(State(state): State<AppState>, Path(name): Path<String>) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(state.registry.get(&name)?))
}

/// Delete a stopped instance.
#[utoipa::path(
    delete,
    path = "/instances/{name}",
    operation_id = "delete_instance",
    tag = "instances",
    params(("name" = String, Path, description = "The instance's name")),
    responses(
        (status = 200, description = "Deleted", body = doc::Message),
        (status = 404, description = "No such instance (`INSTANCE_NOT_FOUND`)", body = ErrorBody),
        (status = 502, description = "The instance lives on a remote node that cannot be reached (`NODE_UNAVAILABLE`)", body = ErrorBody),
        (status = 409, description = "The instance is not stopped (`INSTANCE_RUNNING`, `INVALID_STATE`)", body = ErrorBody),
        (status = 500, description = "The deletion could not be saved (`STORE_ERROR`)", body = ErrorBody),
    ),
)]
async fn remove(State(state): State<AppState>, Path(name): Path<String>) -> Result<impl IntoResponse, ApiError> {
    state.registry.delete(&name).await?;
    Ok(axum::Json(json!({ "message": "Instance deleted successfully" })))
}

/// Start an instance; the answer comes once the start is under way (status `starting`).
#[utoipa::path(
    post,
    path = "/instances/{name}/start",
    operation_id = "start_instance",
    tag = "instances",
    params(("name" = String, Path, description = "The instance's name")),
    responses(
        (status = 200, description = "Start initiated", body = doc::StatusMessage),
        (status = 404, description = "No such instance (`INSTANCE_NOT_FOUND`)", body = ErrorBody),
        (status = 502, description = "The instance lives on a remote node that cannot be reached (`NODE_UNAVAILABLE`)", body = ErrorBody),
        (status = 409, description = "Not startable now (`INVALID_STATE`, `MODEL_NOT_AVAILABLE`, `NO_CAPACITY`, `PORT_IN_USE`)", body = ErrorBody),
        (status = 500, description = "The change could not be saved (`STORE_ERROR`)", body = ErrorBody),
        (status = 503, description = "The start failed at once (`MODEL_LOAD_FAILED`)", body = ErrorBody),
    ),
)]
async fn start(State(state): State<AppState>, Path(name): Path<String>) -> Result<impl IntoResponse, ApiError> {
    let status = state.registry.start(&name).await?;
    Ok(axum::Json(json!({ "message": "Instance start initiated", "status": status })))
}

/// How to stop; the body is optional (empty means the defaults).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct StopBody {
    /// Cancel in-flight requests at once instead of letting them finish.
    #[serde(default)]
    force: bool,
    /// Seconds in-flight requests may take to finish (0 to 3600).
    #[schema(minimum = 0, maximum = 3600)]
    timeout: Option<f64>,
}

/// The stop body is optional (llamactl's clients send none); an empty body means the defaults.
fn stop_mode(bytes: &[u8]) -> Result<StopMode, ApiError> {
    let body: StopBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        StopBody::default()
    } else {
        // `null` means the defaults too, as the document's optional body says.
        serde_json::from_slice::<Option<StopBody>>(bytes).map_err(|e| invalid(e.to_string()))?.unwrap_or_default()
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

/// Stop an instance, letting in-flight requests finish (up to `timeout`) unless `force`.
#[utoipa::path(
    post,
    path = "/instances/{name}/stop",
    operation_id = "stop_instance",
    tag = "instances",
    params(("name" = String, Path, description = "The instance's name")),
    request_body(content = Option<StopBody>, description = "Optional; an empty body means the defaults"),
    responses(
        (status = 200, description = "Stopped, or stop initiated", body = doc::StatusMessage),
        (status = 400, description = "Invalid body (`INVALID_REQUEST`)", body = ErrorBody),
        (status = 404, description = "No such instance (`INSTANCE_NOT_FOUND`)", body = ErrorBody),
        (status = 502, description = "The instance lives on a remote node that cannot be reached (`NODE_UNAVAILABLE`)", body = ErrorBody),
        (status = 409, description = "Not running (`INVALID_STATE`)", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
        (status = 500, description = "The change could not be saved (`STORE_ERROR`)", body = ErrorBody),
    ),
)]
async fn stop(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let status = state.registry.stop(&name, stop_mode(&body)?).await?;
    let message = if status == Status::Stopped { "Instance stopped" } else { "Instance stop initiated" };
    Ok(axum::Json(json!({ "message": message, "status": status })))
}

/// Stop (letting requests finish) and start again.
#[utoipa::path(
    post,
    path = "/instances/{name}/restart",
    operation_id = "restart_instance",
    tag = "instances",
    params(("name" = String, Path, description = "The instance's name")),
    responses(
        (status = 200, description = "Restart initiated", body = doc::StatusMessage),
        (status = 404, description = "No such instance (`INSTANCE_NOT_FOUND`)", body = ErrorBody),
        (status = 502, description = "The instance lives on a remote node that cannot be reached (`NODE_UNAVAILABLE`)", body = ErrorBody),
        (status = 409, description = "Not restartable now (`INVALID_STATE`, `MODEL_NOT_AVAILABLE`, `NO_CAPACITY`, `PORT_IN_USE`)", body = ErrorBody),
        (status = 500, description = "The change could not be saved (`STORE_ERROR`)", body = ErrorBody),
        (status = 503, description = "The start failed at once (`MODEL_LOAD_FAILED`)", body = ErrorBody),
    ),
)]
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

/// Start every stopped or failed instance; each one's outcome is in `results`.
#[utoipa::path(
    post,
    path = "/instances/start-all",
    operation_id = "start_all_instances",
    tag = "instances",
    responses((status = 200, description = "Each instance's outcome", body = doc::BulkResults)),
)]
async fn start_all(State(state): State<AppState>) -> impl IntoResponse {
    axum::Json(results(state.registry.start_all().await))
}

/// Stop every running instance; each one's outcome is in `results`.
#[utoipa::path(
    post,
    path = "/instances/stop-all",
    operation_id = "stop_all_instances",
    tag = "instances",
    request_body(content = Option<StopBody>, description = "Optional; an empty body means the defaults"),
    responses(
        (status = 200, description = "Each instance's outcome", body = doc::BulkResults),
        (status = 400, description = "Invalid body (`INVALID_REQUEST`)", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
    ),
)]
async fn stop_all(State(state): State<AppState>, body: Bytes) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(results(state.registry.stop_all(stop_mode(&body)?).await)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct LogQuery {
    /// How many of the latest lines (default 100).
    lines: Option<usize>,
    /// The least severe level to include.
    #[param(value_type = Option<LogLevel>, inline)]
    level: Option<String>,
    /// Stream the lines, then every new one, as server-sent events.
    #[serde(default)]
    follow: bool,
}

/// Log levels, least severe first.
#[derive(serde::Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)] // documents the values `level` takes
enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

/// An instance's log: its lifecycle events and llama.cpp's own lines, newest last.
#[utoipa::path(
    get,
    path = "/instances/{name}/logs",
    operation_id = "get_instance_logs",
    tag = "instances",
    params(("name" = String, Path, description = "The instance's name"), LogQuery),
    responses(
        (status = 200, description = "The lines; with `follow=true` a server-sent event stream whose events each carry one `LogLine` as JSON", content(
            (doc::LogList = "application/json"),
            (doc::LogEvent = "text/event-stream"),
        )),
        (status = 400, description = "Invalid query (`INVALID_REQUEST`)", body = ErrorBody),
        (status = 404, description = "No such instance (`INSTANCE_NOT_FOUND`)", body = ErrorBody),
        (status = 502, description = "The instance lives on a remote node that cannot be reached (`NODE_UNAVAILABLE`)", body = ErrorBody),
    ),
)]
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

/// Whether the instance's engine answers, and its port.
#[utoipa::path(
    get,
    path = "/instances/{name}/health",
    operation_id = "get_instance_health",
    tag = "instances",
    params(("name" = String, Path, description = "The instance's name")),
    responses(
        (status = 200, description = "The instance's health", body = crate::instance::Health),
        (status = 404, description = "No such instance (`INSTANCE_NOT_FOUND`)", body = ErrorBody),
        (status = 502, description = "The instance lives on a remote node that cannot be reached (`NODE_UNAVAILABLE`)", body = ErrorBody),
    ),
)]
async fn health(State(state): State<AppState>, Path(name): Path<String>) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(state.registry.health(&name).await?))
}
