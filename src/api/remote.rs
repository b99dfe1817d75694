//! Instances that live on remote nodes ([`crate::nodes`]): a middleware inside the guard (so the
//! caller's rights are checked first) that
//! - creates an instance whose body says `"nodes": ["<node>"]` on that node, and keeps its record;
//! - forwards every call under `/api/instances/{name}` (and `/llama-cpp/{name}`) of a remote
//!   instance to its node's `/api/v1/instances/{name}…` (llamactl's paths, which paddock serves
//!   too), with the node's key;
//! - proxies `/v1/chat/completions`, `/v1/completions` and `/v1/embeddings` whose `model` is a
//!   remote instance: the body as sent, the answer streamed back as it arrives; a client that
//!   leaves drops the stream, which closes the connection to the node and so cancels there;
//! - adds remote instances to `GET /api/instances` and `GET /v1/models`.
//!
//! Everything else passes through untouched. A node that cannot be reached is a 502
//! `NODE_UNAVAILABLE` naming it, within the timeouts of [`crate::nodes`].

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{json, Map, Value};

use super::error::{ApiError, OpenAiError};
use super::AppState;
use crate::auth::{Need, Principal};
use crate::nodes::{Node, NodeError, RemoteInstance, CALL_TIMEOUT, PROBE_TIMEOUT};

/// Largest management body read here (the handlers' own limit is the same).
const MANAGEMENT_BODY: usize = 2 << 20;
/// Largest `/v1` body read to find its `model`.
const INFERENCE_BODY: usize = 64 << 20;

/// What a request is, as far as remote instances go.
enum Route {
    List,
    /// A create, with the name from the path if it has one.
    Create(Option<String>),
    /// A call under `/api/instances/{name}` (`rest` after the name) or `/llama-cpp/{name}`.
    Instance {
        name: String,
        rest: String,
        llama: bool,
    },
    Inference,
    Models,
    Other,
}

fn route(method: &Method, path: &str) -> Route {
    if *method == Method::POST && matches!(path, "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings") {
        return Route::Inference;
    }
    if *method == Method::GET && path == "/v1/models" {
        return Route::Models;
    }
    if let Some(rest) = path.strip_prefix("/llama-cpp/") {
        let (name, rest) = rest.split_once('/').map_or((rest, ""), |(n, r)| (n, r));
        return Route::Instance { name: name.into(), rest: format!("/{rest}"), llama: true };
    }
    let Some(rest) = path.strip_prefix("/api/v1/instances").or_else(|| path.strip_prefix("/api/instances")) else {
        return Route::Other;
    };
    match rest.strip_prefix('/').map(|r| r.split_once('/').map_or((r, ""), |(n, r)| (n, r))) {
        None if rest.is_empty() && *method == Method::GET => Route::List,
        None if rest.is_empty() && *method == Method::POST => Route::Create(None),
        Some(("start-all" | "stop-all", "")) | None => Route::Other,
        Some((name, "")) if *method == Method::POST => Route::Create(Some(name.into())),
        Some((name, rest)) => Route::Instance {
            name: name.into(),
            rest: if rest.is_empty() { String::new() } else { format!("/{rest}") },
            llama: false,
        },
    }
}

pub async fn forward(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let result = match route(&method, request.uri().path()) {
        Route::Other => return next.run(request).await,
        Route::List => Ok(list(&state, next.run(request).await).await),
        Route::Create(name) => create(&state, name, request, next).await,
        Route::Instance { name, rest, llama } => match state.nodes.record(&name) {
            Some(record) => instance(&state, record, rest, llama, request).await,
            None if method == Method::PUT && rest.is_empty() => local_update(&state, request, next).await,
            None => return next.run(request).await,
        },
        Route::Inference => return inference(&state, request, next).await.unwrap_or_else(|e| e.into_response()),
        Route::Models => return models(&state, request, next).await,
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

/// The request's body, at most `limit` bytes.
async fn body_of(request: Request, limit: usize) -> Result<(axum::http::request::Parts, Bytes), ApiError> {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "BODY_TOO_LARGE", "The body is too large")
            .with_details(format!("at most {limit} bytes"))
    })?;
    Ok((parts, bytes))
}

/// The JSON object of a body, if it is one (else the handler answers the error).
fn object(bytes: &Bytes) -> Option<Map<String, Value>> {
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    }
}

fn rebuild(parts: axum::http::request::Parts, body: impl Into<Body>) -> Request {
    let mut parts = parts;
    parts.headers.remove(header::CONTENT_LENGTH);
    Request::from_parts(parts, body.into())
}

async fn create(
    state: &AppState,
    path_name: Option<String>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (parts, bytes) = body_of(request, MANAGEMENT_BODY).await?;
    let Some(mut body) = object(&bytes) else { return Ok(next.run(rebuild(parts, bytes)).await) };
    let nodes = body.remove("nodes").unwrap_or(Value::Null);
    let node = state.nodes.placement(&nodes)?;
    let name = path_name.or_else(|| body.get("name").and_then(Value::as_str).map(str::to_owned));
    let Some(node) = node else {
        // Here: the handler creates it, unless a remote instance has the name.
        if let Some(name) = name.filter(|n| state.nodes.record(n).is_some()) {
            return Err(NodeError::Exists(name).into());
        }
        return Ok(next.run(rebuild(parts, serde_json::to_vec(&body).unwrap_or_default())).await);
    };
    let name =
        name.ok_or_else(|| ApiError::bad_request("Invalid request body").with_details("missing field `name`"))?;
    crate::instance::validate_name(&name)?;
    if state.registry.get(&name).is_ok() || state.nodes.record(&name).is_some() {
        return Err(NodeError::Exists(name).into());
    }
    let query = parts.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let call = state
        .nodes
        .request(node, Method::POST, &format!("/api/v1/instances/{name}{query}"), Some(CALL_TIMEOUT))
        .json(&body);
    let response = state.nodes.send(node, call).await?;
    if response.status() == StatusCode::CREATED {
        body.insert("nodes".into(), json!([node.name]));
        let record =
            RemoteInstance { name, node: node.name.clone(), created_at: chrono::Utc::now(), spec: Value::Object(body) };
        state.nodes.put_record(record)?;
    }
    Ok(with_node(node, response, "/instance").await)
}

/// A PUT to a local instance: `nodes` may only name this node.
async fn local_update(state: &AppState, request: Request, next: Next) -> Result<Response, ApiError> {
    let (parts, bytes) = body_of(request, MANAGEMENT_BODY).await?;
    let Some(mut body) = object(&bytes).filter(|b| b.contains_key("nodes")) else {
        return Ok(next.run(rebuild(parts, bytes)).await);
    };
    if state.nodes.placement(&body.remove("nodes").unwrap_or_default())?.is_some() {
        return Err(cannot_move());
    }
    Ok(next.run(rebuild(parts, serde_json::to_vec(&body).unwrap_or_default())).await)
}

fn cannot_move() -> ApiError {
    ApiError::from(NodeError::Placement(
        "an instance cannot move between nodes; delete it and create it on the other node".into(),
    ))
}

/// A call about a remote instance, sent to its node.
async fn instance(
    state: &AppState,
    mut record: RemoteInstance,
    rest: String,
    llama: bool,
    request: Request,
) -> Result<Response, ApiError> {
    let node = state.nodes.node(&record.node)?.clone();
    let method = request.method().clone();
    let query = request.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
    let path = if llama {
        format!("/llama-cpp/{}{rest}{query}", record.name)
    } else {
        format!("/api/v1/instances/{}{rest}{query}", record.name)
    };
    // Streams (followed logs, llama-server routes) run as long as the node sends; the rest is bounded.
    let streams = llama || rest.starts_with("/proxy") || (rest == "/logs" && query.contains("follow=true"));
    let timeout = (!streams).then_some(CALL_TIMEOUT);
    let (parts, mut bytes) = body_of(request, if streams { INFERENCE_BODY } else { MANAGEMENT_BODY }).await?;
    let mut update = None;
    if method == Method::PUT && rest.is_empty() {
        if let Some(mut body) = object(&bytes) {
            if let Some(nodes) = body.remove("nodes") {
                if state.nodes.placement(&nodes)?.map(|n| n.name.as_str()) != Some(node.name.as_str()) {
                    return Err(cannot_move());
                }
            }
            bytes = serde_json::to_vec(&body).unwrap_or_default().into();
            update = Some(body);
        }
    }
    let mut call = state.nodes.request(&node, method.clone(), &path, timeout);
    if let Some(ct) = parts.headers.get(header::CONTENT_TYPE) {
        call = call.header(header::CONTENT_TYPE, ct);
    }
    if !bytes.is_empty() {
        call = call.body(bytes);
    }
    let response = state.nodes.send(&node, call).await?;
    let status = response.status();
    if method == Method::DELETE && rest.is_empty() && (status.is_success() || status == StatusCode::NOT_FOUND) {
        state.nodes.remove_record(&record.name)?;
    }
    if let (Some(change), true) = (update, status.is_success()) {
        merge(&mut record.spec, change);
        state.nodes.put_record(record)?;
    }
    Ok(match (&method, rest.as_str()) {
        (&Method::GET, "") => with_node(&node, response, "").await,
        (&Method::PUT, "") => with_node(&node, response, "/instance").await,
        _ => relay(&node, response),
    })
}

/// Applies an update body to a record's spec: fields replace, `options` merge.
fn merge(spec: &mut Value, change: Map<String, Value>) {
    let Value::Object(spec) = spec else { return };
    for (key, value) in change {
        match (spec.get_mut(&key), value) {
            (Some(Value::Object(old)), Value::Object(new)) if key == "options" || key == "backend_options" => {
                old.extend(new)
            }
            (_, value) => {
                spec.insert(key, value);
            }
        }
    }
}

/// The node's answer as it arrives: status, headers (but hop-by-hop ones) and body stream. A
/// server-sent event stream that the node breaks off ends with an error event naming the node and
/// `[DONE]`, as paddock's own streams end on a failure; other bodies are cut off.
fn relay(node: &Node, response: reqwest::Response) -> Response {
    let status = response.status();
    let headers = end_to_end(response.headers());
    let sse = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let node = node.clone();
    let stream = response.bytes_stream().scan(false, move |ended, item| {
        let next = match item {
            _ if *ended => None,
            Ok(bytes) => Some(Ok(bytes)),
            Err(e) => {
                *ended = true;
                tracing::warn!(node = %node.name, "a stream from the node broke off: {e}");
                if sse {
                    let error = OpenAiError(ApiError::from(crate::nodes::unreachable(&node, &e)));
                    // The blank line first ends an event the node left half-sent.
                    Some(Ok(Bytes::from(format!("\n\ndata: {}\n\ndata: [DONE]\n\n", error.body()))))
                } else {
                    Some(Err(e))
                }
            }
        };
        futures::future::ready(next)
    });
    let mut out = Response::new(Body::from_stream(stream));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    for h in [header::CONNECTION, header::TRANSFER_ENCODING, header::CONTENT_LENGTH, header::UPGRADE, header::TRAILER] {
        out.remove(h);
    }
    out.remove("keep-alive");
    out
}

/// The node's JSON answer with `"node"` set on the instance at `pointer` (when it succeeded).
async fn with_node(node: &Node, response: reqwest::Response, pointer: &str) -> Response {
    let status = response.status();
    let headers = end_to_end(response.headers());
    let bytes = match response.bytes().await {
        Ok(b) => b,
        Err(e) => return ApiError::from(crate::nodes::unreachable(node, &e)).into_response(),
    };
    let mut value: Value = match serde_json::from_slice(&bytes) {
        Ok(v) if status.is_success() => v,
        _ => {
            let mut out = Response::new(Body::from(bytes));
            *out.status_mut() = status;
            *out.headers_mut() = headers;
            return out;
        }
    };
    if let Some(Value::Object(instance)) = value.pointer_mut(pointer) {
        instance.insert("node".into(), json!(node.name));
    }
    (status, axum::Json(value)).into_response()
}

/// Every remote instance as its node shows it (nodes asked at once), or, when its node does not
/// answer in time, its record with status `unknown` and the error.
async fn remote_views(state: &AppState) -> Vec<Value> {
    let records = state.nodes.records();
    let mut by_node: std::collections::BTreeMap<String, Vec<RemoteInstance>> = Default::default();
    for r in records {
        by_node.entry(r.node.clone()).or_default().push(r);
    }
    let fetches = by_node.into_iter().map(|(node_name, records)| async move {
        let listed = async {
            let node = state.nodes.node(&node_name)?;
            let call = state.nodes.request(node, Method::GET, "/api/v1/instances", Some(PROBE_TIMEOUT));
            let response = state.nodes.send(node, call).await?;
            let status = response.status();
            let value: Value = response.json().await.map_err(|e| crate::nodes::unreachable(node, &e))?;
            if !status.is_success() {
                return Err(NodeError::Placement(format!("node '{node_name}' answered {status}: {value}")));
            }
            let items = value.get("instances").unwrap_or(&value).as_array().cloned().unwrap_or_default();
            Ok::<_, NodeError>(items)
        }
        .await;
        records
            .into_iter()
            .map(|r| {
                let found = match &listed {
                    Ok(items) => items
                        .iter()
                        .find(|i| i["name"] == r.name.as_str())
                        .cloned()
                        .ok_or_else(|| format!("node '{}' has no instance '{}' (deleted there?)", r.node, r.name)),
                    Err(e) => Err(e.to_string()),
                };
                match found {
                    Ok(Value::Object(mut view)) => {
                        view.insert("node".into(), json!(r.node));
                        Value::Object(view)
                    }
                    Ok(_) | Err(_) => {
                        let mut view = r.spec.as_object().cloned().unwrap_or_default();
                        view.remove("nodes");
                        view.insert("name".into(), json!(r.name));
                        view.insert("node".into(), json!(r.node));
                        view.insert("status".into(), json!("unknown"));
                        view.insert("created_at".into(), json!(r.created_at));
                        if let Err(e) = found {
                            view.insert("error".into(), json!(e));
                        }
                        Value::Object(view)
                    }
                }
            })
            .collect::<Vec<_>>()
    });
    futures::future::join_all(fetches).await.into_iter().flatten().collect()
}

/// The local list, with the remote instances after it.
async fn list(state: &AppState, local: Response) -> Response {
    if !local.status().is_success() || state.nodes.records().is_empty() {
        return local;
    }
    let (parts, body) = local.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "The list could not be read")
            .into_response();
    };
    let Ok(mut value) = serde_json::from_slice::<Value>(&bytes) else {
        return Response::from_parts(parts, bytes.into());
    };
    let remote = remote_views(state).await;
    if let Some(items) = value.get_mut("instances").and_then(Value::as_array_mut) {
        items.extend(remote);
    }
    (parts.status, axum::Json(value)).into_response()
}

/// A `/v1` request: to the node when its `model` is a remote instance.
async fn inference(state: &AppState, request: Request, next: Next) -> Result<Response, OpenAiError> {
    if state.nodes.records().is_empty() {
        return Ok(next.run(request).await);
    }
    let (parts, bytes) = body_of(request, INFERENCE_BODY).await?;
    #[derive(serde::Deserialize)]
    struct Model {
        model: Option<String>,
    }
    let model = serde_json::from_slice::<Model>(&bytes).ok().and_then(|m| m.model);
    let Some(record) = model.and_then(|m| state.nodes.record(&m)) else {
        return Ok(next.run(rebuild(parts, bytes)).await);
    };
    match parts.extensions.get::<Principal>() {
        Some(p) => p.check(Need::Inference(Some(&record.name))).map_err(|e| ApiError::from(e).with_param("model"))?,
        None => {
            return Err(
                ApiError::from(crate::auth::AuthError::Unauthenticated("no credentials were checked".into())).into()
            )
        }
    }
    let node = state.nodes.node(&record.node).map_err(ApiError::from)?;
    let mut call = state.nodes.request(node, Method::POST, parts.uri.path(), None).body(bytes);
    if let Some(ct) = parts.headers.get(header::CONTENT_TYPE) {
        call = call.header(header::CONTENT_TYPE, ct);
    }
    let response = state.nodes.send(node, call).await.map_err(ApiError::from)?;
    Ok(relay(node, response))
}

/// The local models, with the remote instances the caller may use after them.
async fn models(state: &AppState, request: Request, next: Next) -> Response {
    let principal = request.extensions().get::<Principal>().cloned();
    let local = next.run(request).await;
    let records = state.nodes.records();
    if !local.status().is_success() || records.is_empty() {
        return local;
    }
    let (parts, body) = local.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return Response::from_parts(parts, Body::empty());
    };
    let Ok(mut value) = serde_json::from_slice::<Value>(&bytes) else {
        return Response::from_parts(parts, bytes.into());
    };
    if let Some(data) = value.get_mut("data").and_then(Value::as_array_mut) {
        let visible = records.into_iter().filter(|r| principal.as_ref().is_some_and(|p| p.may_use(&r.name)));
        data.extend(visible.map(|r| {
            json!({ "id": r.name, "object": "model", "created": r.created_at.timestamp(), "owned_by": "paddock", "node": r.node })
        }));
    }
    (parts.status, axum::Json(value)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_told_apart() {
        let is = |m: Method, p: &str| match route(&m, p) {
            Route::List => "list".to_string(),
            Route::Create(n) => format!("create {n:?}"),
            Route::Instance { name, rest, llama } => format!("{name}|{rest}|{llama}"),
            Route::Inference => "inference".into(),
            Route::Models => "models".into(),
            Route::Other => "other".into(),
        };
        assert_eq!(is(Method::GET, "/api/instances"), "list");
        assert_eq!(is(Method::GET, "/api/v1/instances"), "list");
        assert_eq!(is(Method::POST, "/api/instances"), "create None");
        assert_eq!(is(Method::POST, "/api/v1/instances/a"), "create Some(\"a\")");
        assert_eq!(is(Method::GET, "/api/instances/a"), "a||false");
        assert_eq!(is(Method::POST, "/api/instances/a/start"), "a|/start|false");
        assert_eq!(is(Method::POST, "/api/instances/stop-all"), "other");
        assert_eq!(is(Method::GET, "/llama-cpp/a/v1/models"), "a|/v1/models|true");
        assert_eq!(is(Method::POST, "/v1/chat/completions"), "inference");
        assert_eq!(is(Method::GET, "/v1/models"), "models");
        assert_eq!(is(Method::GET, "/api/instancesx"), "other");
        assert_eq!(is(Method::GET, "/api/nodes"), "other");
    }

    #[test]
    fn updates_merge_options_and_replace_the_rest() {
        let mut spec = json!({ "model_path": "a", "options": { "ctx_size": 1, "parallel": 2 } });
        let change = json!({ "model_path": "b", "options": { "ctx_size": 3 } });
        merge(&mut spec, change.as_object().unwrap().clone());
        assert_eq!(spec, json!({ "model_path": "b", "options": { "ctx_size": 3, "parallel": 2 } }));
    }
}
