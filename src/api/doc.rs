//! The OpenAPI document (`GET /api/openapi.json`).
//!
//! Each route module's `routes()` is a `utoipa_axum` [`OpenApiRouter`] built with `routes!`, so a
//! route is registered together with its `#[utoipa::path]`: the document lists what is served,
//! by construction. [`ApiDoc`] holds what is not per operation (info, tags, security); the types
//! here describe bodies that handlers build with `json!` or parse by hand (instance create and
//! update accept two body forms), so their schemas say what really goes over the wire.
//! [`finish`] completes the assembled document: the `name` parameter and unique operation ids of
//! the proxied llama-server routes, and schemas left open where `serde(flatten)` composes them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use crate::config::Config;
use crate::instance::{Alert, InstanceOptions, InstanceView, Status};
use crate::logs::LogLine;

/// Where one instance's llama-server routes are documented; `{name}` is the instance.
pub const PROXY_PREFIX: &str = "/api/instances/{name}/proxy";

const DESCRIPTION: &str = "paddock serves local LLMs in-process with llama.cpp and manages model instances behind \
one HTTP port.\n\n\
Paths are documented under their canonical prefixes: `/api/…` (management), `/v1/…` (OpenAI-compatible, \
`model` names the instance), `/api/instances/{name}/proxy/…` (llama-server's routes of one instance, \
including its own `/v1/…`), and `/health`.\n\n\
The same handlers also answer under aliases, which are not listed as separate operations: `/api/v1/…` \
for every management route (llamactl's prefix), `/api/v1/instances/{name}/proxy/…` and \
`/llama-cpp/{name}/…` for the proxied routes, and the root of an instance's own `port`, which serves the \
proxied routes of that instance without the prefix.\n\n\
Management routes answer errors as `{\"error\",\"code\",\"details\"}`; `/v1` and llama-server routes as \
OpenAI's `{\"error\":{\"message\",\"type\",\"param\",\"code\"}}` plus the same `code` and `details` at the top \
level. An unknown path answers 404 with code `NOT_FOUND`.";

/// Info, tags and security of the document; the paths come from the routers.
#[derive(OpenApi)]
#[openapi(
    info(title = "paddock", version = crate::build::VERSION, description = DESCRIPTION),
    tags(
        (name = "instances", description = "Create, configure, start and stop model instances; their logs and health."),
        (name = "system", description = "Server information, configuration and liveness."),
        (name = "openai", description = "OpenAI-compatible API; `model` names the instance (started on demand if its policy allows)."),
        (name = "llama-server", description = "llama-server's routes of one instance, with llama-server's request and response shapes."),
        (name = "auth", description = "Users, sessions and API keys."),
        (name = "nodes", description = "Remote nodes (llamactl's multi-node): other servers instances are placed on with `nodes`."),
        (name = "models", description = "The local model registry: GGUF metadata, memory estimates, rescans, deletes and unloads; node stats and version (the admin API of seed 003)."),
    ),
    components(schemas(ChatCompletionChunk, NativeCompletionChunk)),
    modifiers(&BearerScheme),
    security(("bearer" = [])),
)]
pub struct ApiDoc;

/// The `bearer` scheme: a session token (JWT) or an API key, as `Authorization: Bearer …`.
struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut http = Http::new(HttpAuthScheme::Bearer);
        http.description = Some("A session token (JWT) or an API key.".into());
        components.add_security_scheme("bearer", SecurityScheme::Http(http));
    }
}

/// The `/api/openapi.json` route, served at `/api/v1/openapi.json` too.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(openapi_json))
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "get_openapi",
    tag = "system",
    security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document of this server", body = Object)),
)]
async fn openapi_json() -> impl IntoResponse {
    static TEXT: OnceLock<String> = OnceLock::new();
    let text = TEXT.get_or_init(|| super::openapi().to_string());
    ([(header::CONTENT_TYPE, "application/json")], text.as_str())
}

/// Completes the document of the assembled routers (see the module docs).
pub fn finish(doc: utoipa::openapi::OpenApi) -> Value {
    let mut doc = serde_json::to_value(doc).expect("the OpenAPI document serializes");
    proxied_operations(&mut doc);
    path_errors(&mut doc);
    guard_errors(&mut doc);
    open_composed_schemas(&mut doc);
    doc
}

/// A path parameter that does not decode (invalid UTF-8 after percent-decoding) is refused by
/// the extractor before the handler runs, with 400 `INVALID_PATH`: every operation with path
/// parameters says so.
fn path_errors(doc: &mut Value) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else { return };
    const WHY: &str = "a path parameter that does not decode (`INVALID_PATH`)";
    for (path, item) in paths.iter_mut().filter(|(p, _)| p.contains('{')) {
        let management = path.starts_with("/api/") && !path.starts_with(PROXY_PREFIX);
        let body = if management { "ErrorBody" } else { "OpenAiErrorBody" };
        for op in item.as_object_mut().into_iter().flat_map(|m| m.values_mut()) {
            let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else { continue };
            match responses.get_mut("400").and_then(|r| r.get_mut("description")) {
                Some(Value::String(d)) => *d = format!("{d}; or {WHY}"),
                _ => {
                    let response = json!({
                        "description": format!("Invalid path: {WHY}"),
                        "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{body}") } } },
                    });
                    responses.insert("400".into(), response);
                }
            }
        }
    }
}

/// The guard ([`super::guard`]) answers before any handler: 401 without valid credentials and
/// 403 without the right on every operation that is not public, and 429 past a rate limit on
/// every operation but `/health`. Each operation says so, in its route's error shape.
fn guard_errors(doc: &mut Value) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else { return };
    for (path, item) in paths.iter_mut() {
        let management = path.starts_with("/api/") && !path.starts_with(PROXY_PREFIX);
        let body = if management { "ErrorBody" } else { "OpenAiErrorBody" };
        let response = |description: &str| {
            json!({
                "description": description,
                "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{body}") } } },
            })
        };
        for op in item.as_object_mut().into_iter().flat_map(|m| m.values_mut()) {
            let public = op["security"].as_array().is_some_and(|s| s.iter().all(|r| r == &json!({})));
            let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else { continue };
            if !public {
                responses
                    .entry("401")
                    .or_insert_with(|| response("No, invalid or expired credentials (`UNAUTHORIZED`)"));
                responses.entry("403").or_insert_with(|| response("The credentials lack the right (`FORBIDDEN`)"));
            }
            if path != "/health" {
                responses.entry("429").or_insert_with(|| {
                    response("Over the rate limit (`RATE_LIMITED`); `Retry-After` says when to retry")
                });
            }
        }
    }
}

/// Operations under [`PROXY_PREFIX`] come from handlers that also serve an instance's own port,
/// where there is no name: the `name` parameter is declared here. Their `/v1` operations are the
/// top-level `/v1` handlers, so their ids get a `proxy_` prefix to stay unique.
fn proxied_operations(doc: &mut Value) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else { return };
    let name = json!({
        "name": "name",
        "in": "path",
        "required": true,
        "description": "The instance whose routes these are.",
        "schema": { "type": "string" },
    });
    let v1 = format!("{PROXY_PREFIX}/v1/");
    for (path, item) in paths.iter_mut().filter(|(p, _)| p.starts_with(PROXY_PREFIX)) {
        for op in item.as_object_mut().into_iter().flat_map(|m| m.values_mut()).filter_map(Value::as_object_mut) {
            let params = op.entry("parameters").or_insert_with(|| json!([]));
            if let Some(params) = params.as_array_mut() {
                if !params.iter().any(|p| p["name"] == "name" && p["in"] == "path") {
                    params.insert(0, name.clone());
                }
            }
            if path.starts_with(&v1) {
                if let Some(Value::String(id)) = op.get_mut("operationId") {
                    *id = format!("proxy_{id}");
                }
                op.insert("tags".into(), json!(["llama-server"]));
            }
        }
    }
}

/// `serde(flatten)` becomes `allOf`, and a closed schema (`additionalProperties: false`, from
/// `deny_unknown_fields`) inside an `allOf` would refuse its siblings' properties. Such parts
/// are left open: the composed object still lists every property it has.
fn open_composed_schemas(doc: &mut Value) {
    let mut referenced = BTreeSet::new();
    open_all_of(doc, &mut referenced);
    let Some(schemas) = doc.pointer_mut("/components/schemas").and_then(Value::as_object_mut) else { return };
    for name in referenced {
        if let Some(Value::Object(schema)) = schemas.get_mut(&name) {
            if schema.get("additionalProperties") == Some(&Value::Bool(false)) {
                schema.remove("additionalProperties");
            }
        }
    }
}

fn open_all_of(value: &mut Value, referenced: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::Array(items)) = map.get_mut("allOf") {
                for item in items.iter_mut().filter_map(Value::as_object_mut) {
                    if item.get("additionalProperties") == Some(&Value::Bool(false)) {
                        item.remove("additionalProperties");
                    }
                    if let Some(name) = item.get("$ref").and_then(Value::as_str).and_then(component_name) {
                        referenced.insert(name.to_string());
                    }
                }
            }
            map.values_mut().for_each(|v| open_all_of(v, referenced));
        }
        Value::Array(items) => items.iter_mut().for_each(|v| open_all_of(v, referenced)),
        _ => {}
    }
}

fn component_name(reference: &str) -> Option<&str> {
    reference.strip_prefix("#/components/schemas/")
}

// ---- Server-sent events ----
//
// OpenAPI 3.1 has no keyword for one event of a stream (3.2 adds `itemSchema`); by convention
// the `text/event-stream` schema describes each event, as these do.

/// One event of a log stream.
#[derive(Serialize, ToSchema)]
pub struct LogEvent {
    /// A `LogLine` as JSON.
    #[schema(content_media_type = "application/json")]
    pub data: String,
}

/// One event of a streamed chat completion.
#[derive(Serialize, ToSchema)]
pub struct ChatCompletionEvent {
    /// A `ChatCompletionChunk` as JSON, or in the last event `[DONE]`. A failure during
    /// generation is an `OpenAiErrorBody` event followed by `[DONE]`.
    pub data: String,
}

/// One event of a streamed completion.
#[derive(Serialize, ToSchema)]
pub struct CompletionEvent {
    /// A `Completion` chunk as JSON, or in the last event `[DONE]`. A failure during
    /// generation is an `OpenAiErrorBody` event followed by `[DONE]`.
    pub data: String,
}

/// One event of llama-server's completion stream (no `[DONE]`).
#[derive(Serialize, ToSchema)]
pub struct NativeCompletionEvent {
    /// A `NativeCompletionChunk` per token, then the full `NativeCompletion` as the last event
    /// (or an `OpenAiErrorBody` if generation failed), as JSON.
    #[schema(content_media_type = "application/json")]
    pub data: String,
}

// ---- Errors ----

/// A management route's error.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for people.
    pub error: String,
    /// Stable machine-readable code, e.g. `INSTANCE_NOT_FOUND`.
    pub code: String,
    /// The specifics (empty for server errors, which are logged instead).
    pub details: String,
}

/// A `/v1` or llama-server route's error: OpenAI's shape, plus paddock's `code` and `details`.
#[derive(Serialize, ToSchema)]
pub struct OpenAiErrorBody {
    pub error: OpenAiError,
    /// Stable machine-readable code, e.g. `MODEL_NOT_FOUND`.
    pub code: String,
    /// The specifics (empty for server errors).
    pub details: String,
}

/// OpenAI's error object.
#[derive(Serialize, ToSchema)]
pub struct OpenAiError {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: OpenAiErrorType,
    /// The request field at fault, when there is one.
    #[schema(required = true)]
    pub param: Option<String>,
    /// `code` in lower case.
    pub code: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OpenAiErrorType {
    InvalidRequestError,
    AuthenticationError,
    PermissionError,
    RateLimitError,
    ServerError,
}

// ---- Instances ----

/// Fields of both create forms and of an update; `model_path` / `backend_options` say where
/// the model is. Unknown fields are refused by name.
#[derive(Serialize, ToSchema)]
pub struct InstanceBody {
    /// The instance's name; with `/instances/{name}` it may be omitted, and must match if given.
    pub name: Option<String>,
    /// A GGUF file (paddock's form).
    pub model_path: Option<String>,
    /// A port on which the instance also answers llama-server's routes at the root.
    pub port: Option<u16>,
    pub options: Option<InstanceOptions>,
    /// llama-server flags by their names, e.g. `{"ctx-size": 4096, "fa": "on"}`.
    #[schema(value_type = Option<Object>)]
    pub extra: Option<Value>,
    /// llamactl's form: only `llama_cpp` is supported.
    pub backend_type: Option<BackendType>,
    /// llamactl's form: the model and the options in one object.
    pub backend_options: Option<BackendOptions>,
    /// Restart an engine that dies or fails to load (default true).
    pub auto_restart: Option<bool>,
    /// Default 3, at most 1000.
    pub max_restarts: Option<u32>,
    /// Seconds between automatic restarts (default 5, at most 86400).
    pub restart_delay: Option<f64>,
    /// A `/v1` request for the stopped instance starts it (default true).
    pub on_demand_start: Option<bool>,
    /// Minutes without inference traffic before the instance is stopped; 0 = never (default).
    pub idle_timeout: Option<f64>,
    /// Whether it may be parked to make room for another (default true).
    pub evictable: Option<bool>,
    /// The group it counts in for the group's `max_running` (config `groups`); `""` leaves it.
    pub group: Option<String>,
    /// The node it lives on (llamactl's `nodes`): one name of the config's `nodes`, or
    /// `local_node`; default here. Set at creation; an update may only repeat it.
    pub nodes: Option<Vec<String>>,
}

/// The policy fields [`InstanceBody`] lists at its top level (checked against the parser's list).
pub const BODY_POLICY_FIELDS: [&str; 7] =
    ["auto_restart", "max_restarts", "restart_delay", "on_demand_start", "idle_timeout", "evictable", "group"];

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BackendType {
    LlamaCpp,
}

/// llamactl's `backend_options`: a model (`model`, or `hf_repo` and `hf_file`), a port, and any
/// instance option by its name.
#[derive(Serialize, ToSchema)]
pub struct BackendOptions {
    /// A GGUF file.
    pub model: Option<String>,
    /// A Hugging Face repository (such an instance cannot start until the model store resolves it).
    pub hf_repo: Option<String>,
    pub hf_file: Option<String>,
    pub port: Option<u16>,
    /// llama-server flags by their names.
    #[schema(value_type = Option<Object>)]
    pub extra: Option<Value>,
    #[serde(flatten)]
    #[schema(inline)]
    pub options: InstanceOptions,
}

#[derive(Serialize, ToSchema)]
pub struct InstanceList {
    pub instances: Vec<InstanceView>,
}

#[derive(Serialize, ToSchema)]
pub struct InstanceCreated {
    pub message: String,
    pub instance: InstanceView,
}

#[derive(Serialize, ToSchema)]
pub struct InstanceUpdated {
    pub message: String,
    /// Whether the change applies only after a restart of the instance.
    pub restart_required: bool,
    pub instance: InstanceView,
}

#[derive(Serialize, ToSchema)]
pub struct Message {
    pub message: String,
}

#[derive(Serialize, ToSchema)]
pub struct StatusMessage {
    pub message: String,
    /// The instance's status after the request.
    pub status: Status,
}

/// Each instance's outcome of a bulk start or stop.
#[derive(Serialize, ToSchema)]
pub struct BulkResults {
    pub results: Vec<BulkResult>,
}

#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum BulkResult {
    Done {
        name: String,
        status: Status,
    },
    /// The instance's error, in the management error shape.
    Failed {
        name: String,
        error: String,
        code: String,
        details: String,
    },
}

#[derive(Serialize, ToSchema)]
pub struct LogList {
    /// Oldest first.
    pub logs: Vec<LogLine>,
}

// ---- System ----

#[derive(Serialize, ToSchema)]
pub struct SystemInfo {
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub cpu_count: u64,
    /// Bytes.
    pub memory_total: u64,
    pub version: String,
    pub git_revision: String,
    /// RFC 3339.
    pub build_time: String,
    /// Seconds since paddock started.
    pub uptime: u64,
}

#[derive(Serialize, ToSchema)]
pub struct SystemStatus {
    pub version: String,
    /// Seconds since paddock started.
    pub uptime: u64,
    pub instances: InstanceCounts,
    /// Alerts raised since paddock started (`GET /api/system/alerts`).
    pub alerts: u64,
    pub resources: Resources,
    /// The memory budget (`memory_budget`) and what instances hold of it, by the estimates.
    pub memory_budget: crate::instance::memory::BudgetUsage,
    /// Swaps so far and requests waiting for instances to start.
    pub scheduler: crate::instance::SchedulerView,
}

/// Instances by status.
#[derive(Serialize, ToSchema)]
pub struct InstanceCounts {
    pub total: u64,
    pub running: u64,
    pub starting: u64,
    pub stopping: u64,
    pub stopped: u64,
    pub failed: u64,
    pub restarting: u64,
    /// Context freed, weights kept loaded for a fast start.
    pub parked: u64,
}

#[derive(Serialize, ToSchema)]
pub struct Resources {
    /// Percent of all CPUs since the previous sample.
    pub cpu_usage: f32,
    /// Bytes of memory used on the machine.
    pub memory_usage: u64,
    pub memory_total: u64,
    /// Bytes of memory paddock's process uses.
    pub process_memory: u64,
    /// Percent used of the disk that holds the data dir.
    pub disk_usage: f64,
}

#[derive(Serialize, ToSchema)]
pub struct AlertList {
    /// The latest 100, oldest first.
    pub alerts: Vec<Alert>,
}

#[derive(Serialize, ToSchema)]
pub struct ConfigUpdated {
    pub message: String,
    /// The configuration as saved.
    pub config: Config,
    /// Keys that took effect at once.
    pub applied: Vec<String>,
    /// Keys saved that take effect when paddock restarts.
    pub restart_required: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct StatusOk {
    pub status: OkStatus,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OkStatus {
    Ok,
}

// ---- OpenAI ----

#[derive(Serialize, ToSchema)]
pub struct ModelList {
    pub object: ListObject,
    pub data: Vec<ModelEntry>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ListObject {
    List,
}

/// An instance, as OpenAI's model object.
#[derive(Serialize, ToSchema)]
pub struct ModelEntry {
    /// The instance's name: what `model` takes.
    pub id: String,
    pub object: ModelObject,
    /// Unix seconds when the instance was created.
    pub created: i64,
    pub owned_by: String,
    pub status: Status,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModelObject {
    Model,
}

/// Token counts of a response; the prompt counts once, the choices' outputs add up.
#[derive(Serialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Serialize, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV cache was reused.
    pub cached_tokens: u32,
}

/// llama-server's `timings` (of the first choice).
#[derive(Serialize, ToSchema)]
pub struct Timings {
    pub cache_n: u32,
    pub prompt_n: u32,
    pub prompt_ms: f64,
    pub prompt_per_second: f64,
    pub predicted_n: u32,
    pub predicted_ms: f64,
    pub predicted_per_second: f64,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
    ToolCalls,
}

#[derive(Serialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    /// `chat.completion`
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    pub timings: Timings,
}

#[derive(Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    /// Present (and not null) when the request set `logprobs`.
    #[schema(required = true)]
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: FinishReason,
}

#[derive(Serialize, ToSchema)]
pub struct AssistantMessage {
    /// `assistant`
    pub role: String,
    /// Null only when the model called tools and said nothing else.
    #[schema(required = true)]
    pub content: Option<String>,
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// A tool call parsed from the model's output.
#[derive(Serialize, ToSchema)]
pub struct ToolCall {
    /// Only in stream chunks: the call's position.
    pub index: Option<u32>,
    pub id: String,
    /// `function`
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Serialize, ToSchema)]
pub struct FunctionCall {
    pub name: String,
    /// JSON text of an object.
    pub arguments: String,
}

#[derive(Serialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Serialize, ToSchema)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Serialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// One `data:` event of a streamed chat completion (the stream ends with `data: [DONE]`).
#[derive(Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    /// `chat.completion.chunk`
    pub object: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    /// One choice's delta; empty in the final usage chunk.
    pub choices: Vec<ChunkChoice>,
    /// With `stream_options.include_usage`: null, except in the final chunk.
    pub usage: Option<Usage>,
    /// In the final usage chunk.
    pub timings: Option<Timings>,
}

#[derive(Serialize, ToSchema)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    /// Null until the choice's last chunk.
    pub finish_reason: Option<FinishReason>,
}

#[derive(Serialize, ToSchema)]
pub struct Delta {
    /// In a choice's first chunk.
    pub role: Option<String>,
    pub content: Option<String>,
    pub tool_calls: Option<Vec<ToolCall>>,
}

#[derive(Serialize, ToSchema)]
pub struct Completion {
    pub id: String,
    /// `text_completion`
    pub object: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<CompletionChoice>,
    /// In whole responses, and in a stream's final chunk with `stream_options.include_usage`.
    pub usage: Option<Usage>,
    pub timings: Option<Timings>,
}

#[derive(Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    /// Present (and not null) when the request set `logprobs`.
    pub logprobs: Option<CompletionLogprobs>,
    /// Null until the choice's last chunk of a stream.
    pub finish_reason: Option<FinishReason>,
}

/// OpenAI's legacy completions log-probabilities, one entry per token.
#[derive(Serialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    /// Per token, the top tokens and their log-probabilities.
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    pub text_offset: Vec<u64>,
}

#[derive(Serialize, ToSchema)]
pub struct EmbeddingList {
    pub object: ListObject,
    pub data: Vec<Embedding>,
    pub model: String,
    pub usage: EmbeddingUsage,
}

#[derive(Serialize, ToSchema)]
pub struct Embedding {
    /// `embedding`
    pub object: String,
    pub index: u32,
    pub embedding: EmbeddingVector,
}

/// L2-normalized floats, or with `encoding_format: base64` their little-endian f32 bytes.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Serialize, ToSchema)]
pub struct EmbeddingUsage {
    pub prompt_tokens: u32,
    pub total_tokens: u32,
}

// ---- llama-server ----

/// `/health` of a stopped, starting or failed instance.
#[derive(Serialize, ToSchema)]
pub struct LlamaUnavailable {
    /// `loading model` or `unavailable`
    pub status: String,
    pub error: LlamaUnavailableError,
}

#[derive(Serialize, ToSchema)]
pub struct LlamaUnavailableError {
    /// 503
    pub code: u16,
    pub message: String,
    /// `unavailable_error`
    #[serde(rename = "type")]
    pub kind: String,
}

/// A request's sampling settings under llama-server's names.
#[derive(Serialize, ToSchema)]
pub struct GenerationSettings {
    /// -1: no limit but the context.
    pub n_predict: i64,
    /// -1: random.
    pub seed: i64,
    pub temperature: f32,
    pub dynatemp_range: f32,
    pub dynatemp_exponent: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub min_p: f32,
    pub typical_p: f32,
    pub xtc_probability: f32,
    pub xtc_threshold: f32,
    pub top_n_sigma: f32,
    pub repeat_last_n: i32,
    pub repeat_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub dry_multiplier: f32,
    pub dry_base: f32,
    pub dry_allowed_length: i32,
    pub dry_penalty_last_n: i32,
    pub dry_sequence_breakers: Vec<String>,
    pub mirostat: u8,
    pub mirostat_tau: f32,
    pub mirostat_eta: f32,
    pub stop: Vec<String>,
    /// `[token id, bias]` pairs; a bias of `false` bans the token.
    pub logit_bias: Vec<(i32, LogitBiasValue)>,
}

#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum LogitBiasValue {
    Bias(f32),
    /// Always `false`: the token is banned.
    Banned(bool),
}

#[derive(Serialize, ToSchema)]
pub struct Props {
    pub default_generation_settings: DefaultSlot,
    pub total_slots: u32,
    pub n_ctx: u32,
    pub model_path: String,
    /// The instance's name.
    pub model_alias: String,
    /// The Jinja chat template in use.
    pub chat_template: String,
    pub bos_token: String,
    pub eos_token: String,
    pub modalities: Modalities,
    pub embeddings: bool,
    pub build_info: String,
}

#[derive(Serialize, ToSchema)]
pub struct DefaultSlot {
    pub id: u32,
    pub id_task: i64,
    pub n_ctx: u32,
    pub speculative: bool,
    pub is_processing: bool,
    pub params: GenerationSettings,
}

#[derive(Serialize, ToSchema)]
pub struct Modalities {
    pub vision: bool,
    pub audio: bool,
}

#[derive(Serialize, ToSchema)]
pub struct Slot {
    pub id: u32,
    /// 0 while processing, else -1.
    pub id_task: i64,
    pub n_ctx: u32,
    pub speculative: bool,
    pub is_processing: bool,
    /// The running (or last) request's settings; null before the slot's first request.
    #[schema(required = true)]
    pub params: Option<GenerationSettings>,
    pub prompt: String,
    pub n_prompt_tokens: u32,
    pub n_cached: u32,
    pub next_token: NextToken,
}

#[derive(Serialize, ToSchema)]
pub struct NextToken {
    pub has_next_token: bool,
    pub has_new_line: bool,
    pub n_remain: i64,
    pub n_decoded: u32,
    pub stopping_word: String,
}

/// The answer to `save`, `restore` or `erase`.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum SlotActionResult {
    Save { id_slot: u32, filename: String, n_saved: u32, n_written: u64, timings: SaveTimings },
    Restore { id_slot: u32, filename: String, n_restored: u32, n_read: u64, timings: RestoreTimings },
    Erase { id_slot: u32, n_erased: u32 },
}

#[derive(Serialize, ToSchema)]
pub struct SaveTimings {
    pub save_ms: f64,
}

#[derive(Serialize, ToSchema)]
pub struct RestoreTimings {
    pub restore_ms: f64,
}

/// llama-server's `/completion` response, and the last event of its stream.
#[derive(Serialize, ToSchema)]
pub struct NativeCompletion {
    pub index: u32,
    /// The generated text (empty in a stream's last event).
    pub content: String,
    pub tokens: Vec<i32>,
    pub id_slot: i64,
    pub stop: bool,
    pub model: String,
    pub tokens_predicted: u32,
    pub tokens_evaluated: u32,
    pub generation_settings: GenerationSettings,
    pub prompt: String,
    pub has_new_line: bool,
    pub truncated: bool,
    pub stop_type: StopType,
    pub stopping_word: String,
    pub tokens_cached: u32,
    pub timings: Timings,
    /// With `n_probs`.
    pub completion_probabilities: Option<Vec<TokenProbability>>,
}

/// One token of llama-server's completion stream.
#[derive(Serialize, ToSchema)]
pub struct NativeCompletionChunk {
    pub index: u32,
    /// The token's text.
    pub content: String,
    /// The token's id.
    pub tokens: Vec<i32>,
    pub stop: bool,
    /// -1 while streaming.
    pub id_slot: i64,
    pub tokens_predicted: u32,
    pub tokens_evaluated: u32,
    /// With `n_probs`: the token's probabilities.
    pub completion_probabilities: Option<Vec<TokenProbability>>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StopType {
    /// `n_predict` or the context was reached.
    Limit,
    /// A stop string.
    Word,
    /// The end-of-generation token.
    Eos,
}

#[derive(Serialize, ToSchema)]
pub struct TokenProbability {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub top_logprobs: Vec<TopTokenProbability>,
}

#[derive(Serialize, ToSchema)]
pub struct TopTokenProbability {
    pub id: i32,
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

#[derive(Serialize, ToSchema)]
pub struct Tokens {
    pub tokens: Vec<TokenOut>,
}

/// A token id, or with `with_pieces` the id and its text (its bytes when they are not whole UTF-8).
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum TokenOut {
    Id(i32),
    Piece { id: i32, piece: Piece },
}

#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum Piece {
    Text(String),
    Bytes(Vec<u8>),
}

#[derive(Serialize, ToSchema)]
pub struct Content {
    pub content: String,
}

/// One per input.
#[derive(Serialize, ToSchema)]
pub struct NativeEmbedding {
    pub index: u32,
    /// One pooled vector (llama-server nests it in a list).
    pub embedding: Vec<Vec<f32>>,
}

#[derive(Serialize, ToSchema)]
pub struct RenderedPrompt {
    pub prompt: String,
}

#[derive(Serialize, ToSchema)]
pub struct LoraAdapter {
    /// The adapter's position in the instance's `lora` option.
    pub id: u32,
    pub path: String,
    pub scale: f32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_schema_lists_the_policy_fields_the_parser_takes() {
        assert_eq!(BODY_POLICY_FIELDS, super::super::instances::POLICY_FIELDS);
        let schema = serde_json::to_value(<InstanceBody as utoipa::PartialSchema>::schema()).unwrap();
        for field in BODY_POLICY_FIELDS {
            assert!(schema["properties"].get(field).is_some(), "{field} missing from {schema}");
        }
    }

    /// Every `$ref` in `value`.
    fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
        match value {
            Value::Object(map) => {
                out.extend(map.get("$ref").and_then(Value::as_str));
                map.values().for_each(|v| refs(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn the_document_resolves_and_its_operation_ids_are_unique() {
        let doc = super::super::openapi();
        let mut found = Vec::new();
        refs(doc, &mut found);
        assert!(!found.is_empty());
        for r in found {
            let name = component_name(r).unwrap_or_else(|| panic!("{r} is not a local schema"));
            assert!(doc["components"]["schemas"].get(name).is_some(), "{r} does not resolve");
        }
        let mut ids = BTreeSet::new();
        for item in doc["paths"].as_object().unwrap().values() {
            for op in item.as_object().unwrap().values() {
                let id = op["operationId"].as_str().expect("every operation has an id");
                assert!(ids.insert(id), "operationId {id} is used twice");
            }
        }
    }

    #[test]
    fn composed_schemas_are_opened_and_proxied_operations_get_their_name() {
        let mut doc = json!({
            "paths": {
                "/api/instances/{name}/proxy/v1/models": { "get": { "operationId": "list_models" } },
                "/api/instances/{name}/proxy/props": { "get": { "operationId": "get_props", "parameters": [] } },
            },
            "components": { "schemas": {
                "A": { "type": "object", "additionalProperties": false },
                "B": { "allOf": [ { "$ref": "#/components/schemas/A" }, { "type": "object", "additionalProperties": false } ] },
            } },
        });
        proxied_operations(&mut doc);
        open_composed_schemas(&mut doc);
        let models = &doc["paths"]["/api/instances/{name}/proxy/v1/models"]["get"];
        assert_eq!(models["operationId"], "proxy_list_models");
        assert_eq!(models["parameters"][0]["name"], "name");
        assert_eq!(doc["paths"]["/api/instances/{name}/proxy/props"]["get"]["operationId"], "get_props");
        assert!(doc["components"]["schemas"]["A"].get("additionalProperties").is_none());
        assert!(doc["components"]["schemas"]["B"]["allOf"][1].get("additionalProperties").is_none());
    }
}
