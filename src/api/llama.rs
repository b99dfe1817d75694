//! llama-server's own routes for one instance, answered in-process with llama-server's request
//! and response shapes, so tools written for llama-server work unchanged.
//!
//! Served under `/api/instances/{name}/proxy/` and `/llama-cpp/{name}/` (llamactl's paths), and
//! at the root of the instance's own `port`. Every handler reads the instance from the
//! [`Pinned`] extension those routers set. Errors use llama-server's (= OpenAI's) error shape.

use std::convert::Infallible;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::doc::{self, OpenAiErrorBody};
use super::error::{ApiError, OaiJson, OaiQuery, OaiRawPathParams, OpenAiError};
use super::oai_output::timings;
use super::openai::{self, lookup, normalize, Pinned, PromptIn, PromptsIn};
use super::params::{lora_scales, settings_json, GenerationFields, LoraScale};
use super::AppState;
use crate::engine::{
    Engine, EngineError, FinishReason, GenerateRequest, Generation, Prompt, SlotAction, SlotView, StreamEvent,
    TokenProbs, Usage,
};
use crate::instance::{InstanceError, Serving, Status};

type LlamaResult<T> = Result<T, OpenAiError>;

/// The routes, to be nested under a prefix that sets [`Pinned`] (or layered with it). The
/// document lists them under `/api/instances/{name}/proxy`, where [`super::doc::finish`] adds
/// the `name` parameter.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(props))
        .routes(routes!(slots))
        .routes(routes!(slot_action))
        .routes(routes!(metrics))
        .routes(routes!(completion))
        .routes(routes!(completions))
        .routes(routes!(infill))
        .routes(routes!(tokenize))
        .routes(routes!(detokenize))
        .routes(routes!(embedding))
        .routes(routes!(embeddings))
        .routes(routes!(apply_template))
        .routes(routes!(lora_adapters, set_lora_adapters))
        .nest("/v1", openai::routes())
}

/// The running instance, without starting it: for routes that only observe.
fn running(state: &AppState, name: &str) -> Result<Serving, ApiError> {
    state.registry.serving(name).map_err(ApiError::from)
}

/// llama-server's health: 200 while the instance runs, 503 while it loads or is stopped.
#[utoipa::path(
    get,
    path = "/health",
    operation_id = "llama_health",
    tag = "llama-server",
    responses(
        (status = 200, description = "The instance runs", body = doc::StatusOk),
        (status = 404, description = "No such instance (`INSTANCE_NOT_FOUND`)", body = OpenAiErrorBody),
        (status = 503, description = "The instance is loading, stopped or failed", body = doc::LlamaUnavailable),
    ),
)]
async fn health(State(state): State<AppState>, Extension(Pinned(name)): Extension<Pinned>) -> Response {
    let status = match state.registry.get(&name) {
        Ok(view) => view.status,
        Err(e) => return OpenAiError(e.into()).into_response(),
    };
    let unavailable = |status: &str, message: &str| {
        let body =
            json!({ "status": status, "error": { "code": 503, "message": message, "type": "unavailable_error" } });
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response()
    };
    match status {
        Status::Running => axum::Json(json!({ "status": "ok" })).into_response(),
        Status::Starting | Status::Restarting => unavailable("loading model", "Loading model"),
        other => unavailable("unavailable", &format!("Instance is {other}")),
    }
}

/// The running instance's properties: default settings, slots, context, template, tokens.
#[utoipa::path(
    get,
    path = "/props",
    operation_id = "llama_props",
    tag = "llama-server",
    responses(
        (status = 200, description = "The instance's properties", body = doc::Props),
        (status = 404, description = "No such instance (`INSTANCE_NOT_FOUND`)", body = OpenAiErrorBody),
        (status = 503, description = "The instance is not running (`INSTANCE_NOT_RUNNING`)", body = OpenAiErrorBody),
    ),
)]
async fn props(State(state): State<AppState>, Extension(Pinned(name)): Extension<Pinned>) -> LlamaResult<Response> {
    let serving = running(&state, &name)?;
    let info = serving.engine.info();
    let defaults = crate::engine::SamplingParams::default();
    Ok(axum::Json(json!({
        "default_generation_settings": {
            "id": 0,
            "id_task": -1,
            "n_ctx": info.n_ctx_slot,
            "speculative": false,
            "is_processing": false,
            "params": settings_json(&defaults, &[], -1),
        },
        "total_slots": info.n_parallel,
        "n_ctx": info.n_ctx,
        "model_path": info.model_path,
        "model_alias": &*name,
        "chat_template": serving.template.source(),
        "bos_token": info.bos_token,
        "eos_token": info.eos_token,
        "modalities": { "vision": false, "audio": false },
        "embeddings": info.embeddings,
        "build_info": format!("paddock {}", crate::build::long_version()),
    }))
    .into_response())
}

fn slot_json(s: &SlotView) -> Value {
    let params = s.sampling.as_ref().map(|p| settings_json(p, &s.stop, s.n_remain)).unwrap_or_default();
    json!({
        "id": s.id,
        "id_task": if s.is_processing { 0 } else { -1 },
        "n_ctx": s.n_ctx,
        "speculative": false,
        "is_processing": s.is_processing,
        "params": params,
        "prompt": s.prompt,
        "n_prompt_tokens": s.n_prompt_tokens,
        "n_cached": s.n_cached,
        "next_token": {
            "has_next_token": s.is_processing,
            "has_new_line": false,
            "n_remain": s.n_remain,
            "n_decoded": s.n_decoded,
            "stopping_word": "",
        },
    })
}

/// The running instance's slots and what each is doing.
#[utoipa::path(
    get,
    path = "/slots",
    operation_id = "llama_slots",
    tag = "llama-server",
    responses(
        (status = 200, description = "Each slot", body = Vec<doc::Slot>),
        (status = 404, description = "No such instance (`INSTANCE_NOT_FOUND`)", body = OpenAiErrorBody),
        (status = 503, description = "The instance is not running (`INSTANCE_NOT_RUNNING`)", body = OpenAiErrorBody),
    ),
)]
async fn slots(State(state): State<AppState>, Extension(Pinned(name)): Extension<Pinned>) -> LlamaResult<Response> {
    let serving = running(&state, &name)?;
    let views = serving.engine.slots().await.map_err(ApiError::from)?;
    Ok(axum::Json(views.iter().map(slot_json).collect::<Vec<_>>()).into_response())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct SlotQuery {
    /// What to do with the slot.
    #[param(value_type = SlotActionKind, inline)]
    action: String,
}

/// A slot action.
#[derive(serde::Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)] // documents the values `action` takes
enum SlotActionKind {
    Save,
    Restore,
    Erase,
}

/// The file of `save` and `restore`, in the instance's slot directory.
#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
struct SlotBody {
    /// A plain file name: no path separators, not starting with a dot.
    filename: Option<String>,
}

/// A slot file name: one plain path component, so it can only name a file in the instance's
/// slot directory.
fn slot_file_name(name: Option<String>) -> Result<String, ApiError> {
    let name = name.ok_or_else(|| ApiError::bad_request("filename is required").with_param("filename"))?;
    let plain = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && !name.starts_with('.');
    if !plain {
        return Err(ApiError::bad_request(format!(
            "invalid filename '{name}': give a plain file name (no path separators, not starting with a dot)"
        ))
        .with_param("filename"));
    }
    Ok(name)
}

/// Save a slot's KV cache to a file, restore it, or erase it.
#[utoipa::path(
    post,
    path = "/slots/{id}",
    operation_id = "llama_slot_action",
    tag = "llama-server",
    params(("id" = u32, Path, description = "The slot"), SlotQuery),
    request_body(content = Option<SlotBody>, description = "`filename` for save and restore; optional for erase"),
    responses(
        (status = 200, description = "What the action did", body = doc::SlotActionResult),
        (status = 400, description = "Invalid slot, action, file name or body, or the file could not be saved or restored", body = OpenAiErrorBody),
        (status = 404, description = "No such instance (`INSTANCE_NOT_FOUND`)", body = OpenAiErrorBody),
        (status = 409, description = "The slot is processing a request (`SLOT_BUSY`)", body = OpenAiErrorBody),
        (status = 413, description = "The body is too large", body = OpenAiErrorBody),
        (status = 500, description = "The slot directory could not be created (`SLOT_DIR`)", body = OpenAiErrorBody),
        (status = 503, description = "The instance is not running (`INSTANCE_NOT_RUNNING`)", body = OpenAiErrorBody),
    ),
)]
async fn slot_action(
    State(state): State<AppState>,
    Extension(Pinned(name)): Extension<Pinned>,
    OaiRawPathParams(params): OaiRawPathParams,
    OaiQuery(query): OaiQuery<SlotQuery>,
    body: axum::body::Bytes,
) -> LlamaResult<Response> {
    let serving = running(&state, &name)?;
    // The path may also hold the instance's name (proxied routes), so read `id` by name.
    let id = params.iter().find(|(k, _)| *k == "id").map_or("", |(_, v)| v);
    let id: u32 = id.parse().map_err(|_| ApiError::bad_request(format!("slot id must be a number, got '{id}'")))?;
    let body: SlotBody = if body.iter().all(u8::is_ascii_whitespace) {
        SlotBody::default()
    } else {
        serde_json::from_slice::<Option<SlotBody>>(&body)
            .map_err(|e| {
                ApiError::new(StatusCode::BAD_REQUEST, "INVALID_JSON", "Invalid request body")
                    .with_details(e.to_string())
            })?
            .unwrap_or_default()
    };
    let dir = state.config.read().data_dir.join("slots").join(&*name);
    let file = |body: SlotBody| -> Result<(String, std::path::PathBuf), ApiError> {
        let file = slot_file_name(body.filename)?;
        std::fs::create_dir_all(&dir).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "SLOT_DIR", "Cannot create the slot directory")
                .with_details(e.to_string())
        })?;
        let path = dir.join(&file);
        Ok((file, path))
    };
    let engine = &serving.engine;
    let body = match query.action.as_str() {
        "save" => {
            let (file, path) = file(body)?;
            let r = engine.slot_action(id, SlotAction::Save(path)).await.map_err(ApiError::from)?;
            json!({ "id_slot": id, "filename": file, "n_saved": r.n_tokens, "n_written": r.n_bytes, "timings": { "save_ms": r.ms } })
        }
        "restore" => {
            let (file, path) = file(body)?;
            let r = engine.slot_action(id, SlotAction::Restore(path)).await.map_err(ApiError::from)?;
            json!({ "id_slot": id, "filename": file, "n_restored": r.n_tokens, "n_read": r.n_bytes, "timings": { "restore_ms": r.ms } })
        }
        "erase" => {
            let r = engine.slot_action(id, SlotAction::Erase).await.map_err(ApiError::from)?;
            json!({ "id_slot": id, "n_erased": r.n_tokens })
        }
        other => {
            return Err(ApiError::bad_request(format!("action must be save, restore or erase, got '{other}'"))
                .with_param("action")
                .into())
        }
    };
    Ok(axum::Json(body).into_response())
}

/// Prometheus text, under llama-server's metric names so its dashboards work.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "llama_metrics",
    tag = "llama-server",
    responses(
        (status = 200, description = "Prometheus text exposition format", body = String, content_type = "text/plain"),
        (status = 404, description = "No such instance (`INSTANCE_NOT_FOUND`)", body = OpenAiErrorBody),
        (status = 503, description = "The instance is not running (`INSTANCE_NOT_RUNNING`)", body = OpenAiErrorBody),
    ),
)]
async fn metrics(State(state): State<AppState>, Extension(Pinned(name)): Extension<Pinned>) -> LlamaResult<Response> {
    let serving = running(&state, &name)?;
    let s = serving.engine.stats();
    let info = serving.engine.info();
    let per_decode =
        if s.decode_calls_total > 0 { s.batch_sequences_total as f64 / s.decode_calls_total as f64 } else { 0.0 };
    let metrics: [(&str, &str, &str, f64); 12] = [
        ("prompt_tokens_total", "counter", "Number of prompt tokens processed.", s.prompt_tokens_total as f64),
        ("prompt_seconds_total", "counter", "Prompt process time.", s.prompt_us_total as f64 / 1e6),
        (
            "tokens_predicted_total",
            "counter",
            "Number of generation tokens processed.",
            s.generated_tokens_total as f64,
        ),
        ("tokens_predicted_seconds_total", "counter", "Predict process time.", s.generation_us_total as f64 / 1e6),
        ("n_decode_total", "counter", "Total number of llama_decode() calls.", s.decode_calls_total as f64),
        ("n_busy_slots_per_decode", "gauge", "Average number of busy slots per llama_decode() call.", per_decode),
        ("prompt_tokens_seconds", "gauge", "Average prompt throughput in tokens/s.", s.prompt_tokens_per_second()),
        ("predicted_tokens_seconds", "gauge", "Average generation throughput in tokens/s.", s.tokens_per_second()),
        (
            "kv_cache_usage_ratio",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            s.kv_tokens as f64 / info.n_ctx as f64,
        ),
        ("kv_cache_tokens", "gauge", "KV-cache tokens.", s.kv_tokens as f64),
        ("requests_processing", "gauge", "Number of requests processing.", s.slots_busy as f64),
        ("requests_deferred", "gauge", "Number of requests deferred.", s.queued as f64),
    ];
    let mut text = String::with_capacity(2048);
    for (metric, kind, help, value) in metrics {
        text.push_str(&format!(
            "# HELP llamacpp:{metric} {help}\n# TYPE llamacpp:{metric} {kind}\nllamacpp:{metric} {value}\n"
        ));
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response())
}

/// llama-server's native completion request.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(as = NativeCompletionRequest)]
struct CompletionRequest {
    prompt: PromptIn,
    #[serde(flatten)]
    options: NativeOptions,
}

/// Options of llama-server's native generation routes.
#[derive(Debug, Deserialize, ToSchema)]
struct NativeOptions {
    /// Most tokens to generate: -1 (default) = until the end of the slot's context, else 1 to
    /// 1048576. Also accepted as `max_tokens`.
    #[serde(alias = "max_tokens")]
    n_predict: Option<i64>,
    /// Answer with server-sent events: one object per token, the full response last.
    #[serde(default)]
    stream: bool,
    /// Reuse the slot's cached prefix (default true).
    cache_prompt: Option<bool>,
    /// Top probabilities per token (at most 100).
    #[schema(maximum = 100)]
    n_probs: Option<u32>,
    /// The slot to use; -1 (default) = any.
    id_slot: Option<i64>,
    #[serde(flatten)]
    generation: GenerationFields,
}

/// Largest `n_predict`; generation also stops at the end of the slot's context.
const MAX_N_PREDICT: i64 = 1 << 20;
const MAX_N_PROBS: u32 = 100;

impl NativeOptions {
    async fn request(self, prompt: Prompt, engine: &Engine) -> Result<(GenerateRequest, bool, i64), ApiError> {
        let n_predict = self.n_predict.unwrap_or(-1);
        let max_tokens = match n_predict {
            -1 => None,
            n @ 1..=MAX_N_PREDICT => Some(n as u32),
            n => {
                return Err(ApiError::bad_request(format!(
                    "n_predict must be -1 (no limit) or between 1 and {MAX_N_PREDICT}, got {n}"
                ))
                .with_param("n_predict"))
            }
        };
        let n_probs = self.n_probs.unwrap_or(0);
        if n_probs > MAX_N_PROBS {
            return Err(ApiError::bad_request(format!("n_probs must be at most {MAX_N_PROBS}")).with_param("n_probs"));
        }
        let slot = match self.id_slot {
            None | Some(-1) => None,
            Some(id) if id >= 0 && id < engine.info().n_parallel as i64 => Some(id as u32),
            Some(id) => {
                let n = engine.info().n_parallel;
                return Err(ApiError::bad_request(format!("id_slot {id} does not exist; the instance has {n} slots"))
                    .with_param("id_slot"));
            }
        };
        let valid = self.generation.validate(engine).await?;
        let mut request = valid.into_request(prompt, max_tokens, n_probs);
        request.slot = slot;
        request.cache_prompt = self.cache_prompt.unwrap_or(true);
        Ok((request, self.stream, n_predict))
    }
}

/// llama-server's completion of `prompt`: one JSON body, or with `stream` server-sent events
/// (one object per token, the full `NativeCompletion` last).
#[utoipa::path(
    post,
    path = "/completion",
    operation_id = "llama_completion",
    tag = "llama-server",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion, or its stream", content(
            (doc::NativeCompletion = "application/json"),
            (doc::NativeCompletionEvent = "text/event-stream"),
        )),
        (status = 400, description = "Invalid request, e.g. a prompt over the context or bad parameters", body = OpenAiErrorBody),
        (status = 404, description = "No such instance (`MODEL_NOT_FOUND`)", body = OpenAiErrorBody),
        (status = 409, description = "The instance cannot start now (`INVALID_STATE`, `MODEL_NOT_AVAILABLE`, `NO_CAPACITY`, `PORT_IN_USE`)", body = OpenAiErrorBody),
        (status = 413, description = "The body is too large", body = OpenAiErrorBody),
        (status = 422, description = "A field has the wrong type (`INVALID_JSON`)", body = OpenAiErrorBody),
        (status = 500, description = "Generation failed", body = OpenAiErrorBody),
        (status = 503, description = "The instance is not running or is overloaded (`INSTANCE_NOT_RUNNING`, `OVERLOADED`, `START_TIMEOUT`, `MODEL_LOAD_FAILED`)", body = OpenAiErrorBody),
    ),
)]
async fn completion(
    State(state): State<AppState>,
    Extension(Pinned(name)): Extension<Pinned>,
    OaiJson(req): OaiJson<CompletionRequest>,
) -> LlamaResult<Response> {
    let serving = lookup(&state, &name).await?;
    let prompt = req.prompt.single()?;
    generate(serving.engine, name.to_string(), prompt, req.options).await
}

/// `/completions`: the same as `/completion`.
#[utoipa::path(
    post,
    path = "/completions",
    operation_id = "llama_completions",
    tag = "llama-server",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion, or its stream", content(
            (doc::NativeCompletion = "application/json"),
            (doc::NativeCompletionEvent = "text/event-stream"),
        )),
        (status = 400, description = "Invalid request, e.g. a prompt over the context or bad parameters", body = OpenAiErrorBody),
        (status = 404, description = "No such instance (`MODEL_NOT_FOUND`)", body = OpenAiErrorBody),
        (status = 409, description = "The instance cannot start now (`INVALID_STATE`, `MODEL_NOT_AVAILABLE`, `NO_CAPACITY`, `PORT_IN_USE`)", body = OpenAiErrorBody),
        (status = 413, description = "The body is too large", body = OpenAiErrorBody),
        (status = 422, description = "A field has the wrong type (`INVALID_JSON`)", body = OpenAiErrorBody),
        (status = 500, description = "Generation failed", body = OpenAiErrorBody),
        (status = 503, description = "The instance is not running or is overloaded (`INSTANCE_NOT_RUNNING`, `OVERLOADED`, `START_TIMEOUT`, `MODEL_LOAD_FAILED`)", body = OpenAiErrorBody),
    ),
)]
async fn completions(
    state: State<AppState>,
    pinned: Extension<Pinned>,
    req: OaiJson<CompletionRequest>,
) -> LlamaResult<Response> {
    completion(state, pinned, req).await
}

/// Runs a native request: admitted before the response starts, then one JSON body or SSE.
async fn generate(engine: Engine, model: String, prompt: Prompt, options: NativeOptions) -> LlamaResult<Response> {
    let (request, stream, n_predict) = options.request(prompt, &engine).await?;
    let settings = settings_json(&request.sampling, &request.stop, n_predict);
    let prompt_text = match &request.prompt {
        Prompt::Text(t) => t.clone(),
        Prompt::Tokens(t) => engine.detokenize(t.clone()).await.unwrap_or_default(),
    };
    let generation = engine.generate(request).await.map_err(ApiError::from)?;
    let meta = NativeMeta { model, settings, prompt: prompt_text, n_prompt: generation.prompt_tokens };
    if stream {
        return Ok(native_stream(generation, meta).into_response());
    }
    let mut generation = generation;
    let mut content = String::new();
    let mut probs = Vec::new();
    while let Some(event) = generation.next().await {
        match event.map_err(ApiError::from)? {
            StreamEvent::Token { text, probs: p, .. } => {
                content.push_str(&text);
                probs.extend(p.map(|p| prob_json(&p)));
            }
            StreamEvent::Done { finish_reason, usage, stop_word, slot } => {
                let mut body = meta.last(&content, finish_reason, &usage, stop_word, slot);
                if !probs.is_empty() {
                    body["completion_probabilities"] = Value::Array(probs);
                }
                return Ok(axum::Json(body).into_response());
            }
            StreamEvent::Accepted { .. } => {}
        }
    }
    Err(ApiError::from(EngineError::IncompleteGeneration).into())
}

struct NativeMeta {
    model: String,
    settings: Value,
    prompt: String,
    n_prompt: u32,
}

impl NativeMeta {
    /// The final object: llama-server's full response.
    fn last(&self, content: &str, finish: FinishReason, usage: &Usage, stop_word: Option<String>, slot: u32) -> Value {
        let stop_type = match (finish, &stop_word) {
            (FinishReason::Length, _) => "limit",
            (FinishReason::Stop, Some(_)) => "word",
            (FinishReason::Stop, None) => "eos",
        };
        json!({
            "index": 0,
            "content": content,
            "tokens": [],
            "id_slot": slot,
            "stop": true,
            "model": self.model,
            "tokens_predicted": usage.completion_tokens,
            "tokens_evaluated": usage.prompt_tokens,
            "generation_settings": self.settings,
            "prompt": self.prompt,
            "has_new_line": content.contains('\n'),
            "truncated": false,
            "stop_type": stop_type,
            "stopping_word": stop_word.unwrap_or_default(),
            "tokens_cached": usage.prompt_tokens + usage.completion_tokens,
            "timings": timings(usage),
        })
    }
}

fn prob_json(p: &TokenProbs) -> Value {
    let token = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    json!({
        "token": token(&p.bytes),
        "bytes": p.bytes,
        "logprob": p.logprob,
        "top_logprobs": p.top.iter().map(|(id, b, lp)| json!({ "id": id, "token": token(b), "bytes": b, "logprob": lp })).collect::<Vec<_>>(),
    })
}

/// llama-server's stream: one object per token, the full response last, no `[DONE]`.
fn native_stream(
    generation: Generation,
    meta: NativeMeta,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let state = (Some(generation), meta, 0u32);
    let stream = futures::stream::unfold(state, |(generation, meta, n)| async move {
        let mut generation = generation?;
        loop {
            let event = match generation.next().await {
                Some(Ok(StreamEvent::Accepted { .. })) => continue,
                Some(Ok(StreamEvent::Token { text, id, probs })) => {
                    let mut body = json!({
                        "index": 0, "content": text, "tokens": [id], "stop": false, "id_slot": -1,
                        "tokens_predicted": n + 1, "tokens_evaluated": meta.n_prompt,
                    });
                    if let Some(p) = probs {
                        body["completion_probabilities"] = json!([prob_json(&p)]);
                    }
                    let event = Event::default().data(body.to_string());
                    return Some((Ok(event), (Some(generation), meta, n + 1)));
                }
                Some(Ok(StreamEvent::Done { finish_reason, usage, stop_word, slot })) => {
                    let mut body = meta.last("", finish_reason, &usage, stop_word, slot);
                    body["content"] = json!("");
                    Event::default().data(body.to_string())
                }
                Some(Err(e)) => Event::default().data(OpenAiError(e.into()).body().to_string()),
                None => Event::default().data(OpenAiError(EngineError::IncompleteGeneration.into()).body().to_string()),
            };
            return Some((Ok(event), (None, meta, n)));
        }
    });
    Sse::new(stream.boxed()).keep_alive(KeepAlive::default())
}

/// llama-server's fill-in-the-middle request: the model writes what goes between prefix and suffix.
#[derive(Debug, Deserialize, ToSchema)]
struct InfillRequest {
    #[serde(default)]
    input_prefix: String,
    #[serde(default)]
    input_suffix: String,
    /// Not supported: must be empty.
    #[serde(default)]
    input_extra: Vec<Value>,
    /// Text after the middle marker (llama-server: the start of the middle).
    #[serde(default)]
    prompt: String,
    #[serde(flatten)]
    options: NativeOptions,
}

/// Fill in the middle, for models with FIM tokens (code models); answers like `/completion`.
#[utoipa::path(
    post,
    path = "/infill",
    operation_id = "llama_infill",
    tag = "llama-server",
    request_body = InfillRequest,
    responses(
        (status = 200, description = "The completion, or its stream", content(
            (doc::NativeCompletion = "application/json"),
            (doc::NativeCompletionEvent = "text/event-stream"),
        )),
        (status = 400, description = "Invalid request, or a model without fill-in-the-middle tokens", body = OpenAiErrorBody),
        (status = 404, description = "No such instance (`MODEL_NOT_FOUND`)", body = OpenAiErrorBody),
        (status = 409, description = "The instance cannot start now (`INVALID_STATE`, `MODEL_NOT_AVAILABLE`, `NO_CAPACITY`, `PORT_IN_USE`)", body = OpenAiErrorBody),
        (status = 413, description = "The body is too large", body = OpenAiErrorBody),
        (status = 422, description = "A field has the wrong type (`INVALID_JSON`)", body = OpenAiErrorBody),
        (status = 500, description = "Generation failed", body = OpenAiErrorBody),
        (status = 503, description = "The instance is not running or is overloaded (`INSTANCE_NOT_RUNNING`, `OVERLOADED`, `START_TIMEOUT`, `MODEL_LOAD_FAILED`)", body = OpenAiErrorBody),
    ),
)]
async fn infill(
    State(state): State<AppState>,
    Extension(Pinned(name)): Extension<Pinned>,
    OaiJson(req): OaiJson<InfillRequest>,
) -> LlamaResult<Response> {
    let serving = lookup(&state, &name).await?;
    let info = serving.engine.info();
    let Some([pre, suf, mid]) = info.fim else {
        return Err(ApiError::bad_request(
            "this model has no fill-in-the-middle tokens (tokenizer.ggml.fim_pre/suf/mid_token_id); use a code model trained for infill",
        )
        .with_param("model")
        .into());
    };
    if !req.input_extra.is_empty() {
        return Err(ApiError::bad_request("input_extra is not supported").with_param("input_extra").into());
    }
    let engine = &serving.engine;
    let ids = |text: String| async move {
        engine.tokenize(text, false, false).await.map(|p| p.into_iter().map(|t| t.id).collect::<Vec<_>>())
    };
    // llama-server's layout: [BOS] <pre> prefix <suf> suffix <mid> prompt.
    let mut tokens = Vec::new();
    if info.add_bos {
        tokens.push(info.bos_id);
    }
    tokens.push(pre);
    tokens.extend(ids(req.input_prefix).await.map_err(ApiError::from)?);
    tokens.push(suf);
    tokens.extend(ids(req.input_suffix).await.map_err(ApiError::from)?);
    tokens.push(mid);
    tokens.extend(ids(req.prompt).await.map_err(ApiError::from)?);
    generate(serving.engine.clone(), name.to_string(), Prompt::Tokens(tokens), req.options).await
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct TokenizeRequest {
    content: String,
    /// Add BOS and the like.
    #[serde(default)]
    add_special: bool,
    /// Read special tokens' text as those tokens (default true).
    parse_special: Option<bool>,
    /// Answer `{id, piece}` objects instead of ids.
    #[serde(default)]
    with_pieces: bool,
}

/// The instance's tokens of `content`.
#[utoipa::path(
    post,
    path = "/tokenize",
    operation_id = "llama_tokenize",
    tag = "llama-server",
    request_body = TokenizeRequest,
    responses(
        (status = 200, description = "The tokens", body = doc::Tokens),
        (status = 400, description = "Invalid request", body = OpenAiErrorBody),
        (status = 404, description = "No such instance (`MODEL_NOT_FOUND`)", body = OpenAiErrorBody),
        (status = 409, description = "The instance cannot start now (`INVALID_STATE`, `MODEL_NOT_AVAILABLE`, `NO_CAPACITY`, `PORT_IN_USE`)", body = OpenAiErrorBody),
        (status = 413, description = "The body is too large", body = OpenAiErrorBody),
        (status = 422, description = "A field has the wrong type or is unknown (`INVALID_JSON`)", body = OpenAiErrorBody),
        (status = 503, description = "The instance is not running (`INSTANCE_NOT_RUNNING`, `START_TIMEOUT`, `MODEL_LOAD_FAILED`)", body = OpenAiErrorBody),
    ),
)]
async fn tokenize(
    State(state): State<AppState>,
    Extension(Pinned(name)): Extension<Pinned>,
    OaiJson(req): OaiJson<TokenizeRequest>,
) -> LlamaResult<Response> {
    let serving = lookup(&state, &name).await?;
    let pieces = serving
        .engine
        .tokenize(req.content, req.add_special, req.parse_special.unwrap_or(true))
        .await
        .map_err(ApiError::from)?;
    let tokens: Vec<Value> = if req.with_pieces {
        // A piece that is not whole UTF-8 is given as its bytes, as llama-server does.
        pieces
            .into_iter()
            .map(|p| match String::from_utf8(p.piece) {
                Ok(s) => json!({ "id": p.id, "piece": s }),
                Err(e) => json!({ "id": p.id, "piece": e.into_bytes() }),
            })
            .collect()
    } else {
        pieces.into_iter().map(|p| json!(p.id)).collect()
    };
    Ok(axum::Json(json!({ "tokens": tokens })).into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct DetokenizeRequest {
    tokens: Vec<i32>,
}

/// The text of token ids.
#[utoipa::path(
    post,
    path = "/detokenize",
    operation_id = "llama_detokenize",
    tag = "llama-server",
    request_body = DetokenizeRequest,
    responses(
        (status = 200, description = "The text", body = doc::Content),
        (status = 400, description = "A token id outside the vocabulary (`INVALID_TOKEN`)", body = OpenAiErrorBody),
        (status = 404, description = "No such instance (`MODEL_NOT_FOUND`)", body = OpenAiErrorBody),
        (status = 409, description = "The instance cannot start now (`INVALID_STATE`, `MODEL_NOT_AVAILABLE`, `NO_CAPACITY`, `PORT_IN_USE`)", body = OpenAiErrorBody),
        (status = 413, description = "The body is too large", body = OpenAiErrorBody),
        (status = 422, description = "A field has the wrong type or is unknown (`INVALID_JSON`)", body = OpenAiErrorBody),
        (status = 503, description = "The instance is not running (`INSTANCE_NOT_RUNNING`, `START_TIMEOUT`, `MODEL_LOAD_FAILED`)", body = OpenAiErrorBody),
    ),
)]
async fn detokenize(
    State(state): State<AppState>,
    Extension(Pinned(name)): Extension<Pinned>,
    OaiJson(req): OaiJson<DetokenizeRequest>,
) -> LlamaResult<Response> {
    let serving = lookup(&state, &name).await?;
    let content = serving.engine.detokenize(req.tokens).await.map_err(ApiError::from)?;
    Ok(axum::Json(json!({ "content": content })).into_response())
}

/// llama-server's embedding request.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = NativeEmbeddingRequest)]
struct EmbeddingRequest {
    /// Also accepted as `input`.
    #[serde(alias = "input")]
    content: PromptsIn,
    /// llama-server's `embd_normalize`: 2 = Euclidean (default), -1 = none.
    embd_normalize: Option<i32>,
}

/// Embeddings of each input, normalized as `embd_normalize` says.
#[utoipa::path(
    post,
    path = "/embedding",
    operation_id = "llama_embedding",
    tag = "llama-server",
    request_body = EmbeddingRequest,
    responses(
        (status = 200, description = "One vector per input", body = Vec<doc::NativeEmbedding>),
        (status = 400, description = "Invalid request, e.g. embeddings not enabled or an input too long", body = OpenAiErrorBody),
        (status = 404, description = "No such instance (`MODEL_NOT_FOUND`)", body = OpenAiErrorBody),
        (status = 409, description = "The instance cannot start now (`INVALID_STATE`, `MODEL_NOT_AVAILABLE`, `NO_CAPACITY`, `PORT_IN_USE`)", body = OpenAiErrorBody),
        (status = 413, description = "The body is too large", body = OpenAiErrorBody),
        (status = 422, description = "A field has the wrong type or is unknown (`INVALID_JSON`)", body = OpenAiErrorBody),
        (status = 500, description = "The engine failed", body = OpenAiErrorBody),
        (status = 503, description = "The instance is not running or is overloaded (`INSTANCE_NOT_RUNNING`, `OVERLOADED`, `START_TIMEOUT`, `MODEL_LOAD_FAILED`)", body = OpenAiErrorBody),
    ),
)]
async fn embedding(
    State(state): State<AppState>,
    Extension(Pinned(name)): Extension<Pinned>,
    OaiJson(req): OaiJson<EmbeddingRequest>,
) -> LlamaResult<Response> {
    let normalized = match req.embd_normalize.unwrap_or(2) {
        2 => true,
        -1 => false,
        other => {
            return Err(ApiError::bad_request(format!(
                "embd_normalize must be 2 (Euclidean) or -1 (none), got {other}"
            ))
            .with_param("embd_normalize")
            .into())
        }
    };
    let serving = lookup(&state, &name).await?;
    let inputs = req.content.into_prompts()?;
    let result = serving.engine.embed(inputs).await.map_err(ApiError::from)?;
    let items: Vec<Value> = result
        .vectors
        .into_iter()
        .enumerate()
        .map(|(index, mut v)| {
            if normalized {
                normalize(&mut v);
            }
            json!({ "index": index, "embedding": [v] })
        })
        .collect();
    Ok(axum::Json(items).into_response())
}

/// `/embeddings`: the same as `/embedding`.
#[utoipa::path(
    post,
    path = "/embeddings",
    operation_id = "llama_embeddings",
    tag = "llama-server",
    request_body = EmbeddingRequest,
    responses(
        (status = 200, description = "One vector per input", body = Vec<doc::NativeEmbedding>),
        (status = 400, description = "Invalid request, e.g. embeddings not enabled or an input too long", body = OpenAiErrorBody),
        (status = 404, description = "No such instance (`MODEL_NOT_FOUND`)", body = OpenAiErrorBody),
        (status = 409, description = "The instance cannot start now (`INVALID_STATE`, `MODEL_NOT_AVAILABLE`, `NO_CAPACITY`, `PORT_IN_USE`)", body = OpenAiErrorBody),
        (status = 413, description = "The body is too large", body = OpenAiErrorBody),
        (status = 422, description = "A field has the wrong type or is unknown (`INVALID_JSON`)", body = OpenAiErrorBody),
        (status = 500, description = "The engine failed", body = OpenAiErrorBody),
        (status = 503, description = "The instance is not running or is overloaded (`INSTANCE_NOT_RUNNING`, `OVERLOADED`, `START_TIMEOUT`, `MODEL_LOAD_FAILED`)", body = OpenAiErrorBody),
    ),
)]
async fn embeddings(
    state: State<AppState>,
    pinned: Extension<Pinned>,
    req: OaiJson<EmbeddingRequest>,
) -> LlamaResult<Response> {
    embedding(state, pinned, req).await
}

#[derive(Deserialize, ToSchema)]
struct TemplateRequest {
    messages: Vec<openai::MessageIn>,
}

/// The prompt the instance's chat template makes of `messages`.
#[utoipa::path(
    post,
    path = "/apply-template",
    operation_id = "llama_apply_template",
    tag = "llama-server",
    request_body = TemplateRequest,
    responses(
        (status = 200, description = "The rendered prompt", body = doc::RenderedPrompt),
        (status = 400, description = "Invalid messages, or the template could not render them", body = OpenAiErrorBody),
        (status = 404, description = "No such instance (`MODEL_NOT_FOUND`)", body = OpenAiErrorBody),
        (status = 409, description = "The instance cannot start now (`INVALID_STATE`, `MODEL_NOT_AVAILABLE`, `NO_CAPACITY`, `PORT_IN_USE`)", body = OpenAiErrorBody),
        (status = 413, description = "The body is too large", body = OpenAiErrorBody),
        (status = 422, description = "A field has the wrong type (`INVALID_JSON`)", body = OpenAiErrorBody),
        (status = 503, description = "The instance is not running (`INSTANCE_NOT_RUNNING`, `START_TIMEOUT`, `MODEL_LOAD_FAILED`)", body = OpenAiErrorBody),
    ),
)]
async fn apply_template(
    State(state): State<AppState>,
    Extension(Pinned(name)): Extension<Pinned>,
    OaiJson(req): OaiJson<TemplateRequest>,
) -> LlamaResult<Response> {
    let serving = lookup(&state, &name).await?;
    let messages = openai::flatten_messages(req.messages)?;
    let prompt = serving.template.render(&messages, true).map_err(|e| {
        ApiError::bad_request("The chat template could not render these messages").with_details(e.to_string())
    })?;
    Ok(axum::Json(json!({ "prompt": prompt })).into_response())
}

fn lora_json(adapters: Vec<crate::engine::LoraSpec>) -> Response {
    let list: Vec<Value> =
        adapters.into_iter().enumerate().map(|(id, a)| json!({ "id": id, "path": a.path, "scale": a.scale })).collect();
    axum::Json(list).into_response()
}

/// The instance's adapters (its `lora` option) and their current scales.
#[utoipa::path(
    get,
    path = "/lora-adapters",
    operation_id = "llama_lora_adapters",
    tag = "llama-server",
    responses(
        (status = 200, description = "The adapters", body = Vec<doc::LoraAdapter>),
        (status = 404, description = "No such instance (`INSTANCE_NOT_FOUND`)", body = OpenAiErrorBody),
        (status = 503, description = "The instance is not running (`INSTANCE_NOT_RUNNING`)", body = OpenAiErrorBody),
    ),
)]
async fn lora_adapters(
    State(state): State<AppState>,
    Extension(Pinned(name)): Extension<Pinned>,
) -> LlamaResult<Response> {
    let serving = running(&state, &name)?;
    Ok(lora_json(serving.engine.lora(None).await.map_err(ApiError::from)?))
}

/// Sets the instance's scales (ids not given keep theirs); requests admitted from now on use
/// them. Answers the new list.
#[utoipa::path(
    post,
    path = "/lora-adapters",
    operation_id = "llama_set_lora_adapters",
    tag = "llama-server",
    request_body = Vec<LoraScale>,
    responses(
        (status = 200, description = "The adapters with their new scales", body = Vec<doc::LoraAdapter>),
        (status = 400, description = "An unknown adapter id or a scale that is not finite (`INVALID_LORA`, `INVALID_REQUEST`)", body = OpenAiErrorBody),
        (status = 404, description = "No such instance (`INSTANCE_NOT_FOUND`)", body = OpenAiErrorBody),
        (status = 413, description = "The body is too large", body = OpenAiErrorBody),
        (status = 422, description = "A field has the wrong type or is unknown (`INVALID_JSON`)", body = OpenAiErrorBody),
        (status = 503, description = "The instance is not running (`INSTANCE_NOT_RUNNING`)", body = OpenAiErrorBody),
    ),
)]
async fn set_lora_adapters(
    State(state): State<AppState>,
    Extension(Pinned(name)): Extension<Pinned>,
    OaiJson(req): OaiJson<Vec<LoraScale>>,
) -> LlamaResult<Response> {
    let serving = running(&state, &name)?;
    let scales = lora_scales(req)?;
    Ok(lora_json(serving.engine.lora(Some(scales)).await.map_err(ApiError::from)?))
}

/// Reads the instance name of a proxied path (`…/instances/{name}/proxy/…`, `/llama-cpp/{name}/…`)
/// and pins the request to it.
pub async fn pin_from_path(
    OaiRawPathParams(params): OaiRawPathParams,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let name = params.iter().find(|(k, _)| *k == "name").map(|(_, v)| v.to_string());
    match name {
        Some(name) => {
            request.extensions_mut().insert(Pinned(name.into()));
            next.run(request).await
        }
        None => OpenAiError(ApiError::not_found("no instance in the path")).into_response(),
    }
}

impl From<InstanceError> for OpenAiError {
    fn from(e: InstanceError) -> Self {
        OpenAiError(e.into())
    }
}
