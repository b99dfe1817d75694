//! OpenAI-compatible routes: `/v1/models`, `/v1/chat/completions`, `/v1/completions`.
//!
//! `model` names the instance. Everything that can be refused — unknown model, stopped
//! instance, bad parameters, a prompt over the context, a full queue — is refused before the
//! response starts, so it gets a real status; only failures during generation become an error
//! event inside the stream, followed by `[DONE]`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::Router;
use futures::Stream;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::error::{ApiError, OaiJson, OpenAiError};
use super::AppState;
use crate::engine::chat::ChatMessage;
use crate::engine::{FinishReason, GenerateRequest, Generation, Prompt, SamplingParams, StreamEvent, Usage};
use crate::instance::{InstanceError, Serving};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/models", get(models))
        .route("/chat/completions", post(chat_completions))
        .route("/completions", post(completions))
}

type OaiResult<T> = Result<T, OpenAiError>;

async fn models(State(state): State<AppState>, pinned: Option<Extension<Pinned>>) -> impl IntoResponse {
    let data: Vec<Value> = state
        .registry
        .list()
        .into_iter()
        .filter(|i| pinned.as_ref().is_none_or(|Extension(Pinned(name))| i.name == **name))
        .map(|i| {
            json!({
                "id": i.name,
                "object": "model",
                "created": i.created_at.timestamp(),
                "owned_by": "paddock",
                "status": i.status,
            })
        })
        .collect();
    axum::Json(json!({ "object": "list", "data": data }))
}

/// Sampling fields shared by both generation routes (OpenAI's, plus llama-server's extras).
#[derive(Debug, Default, Deserialize)]
pub struct SamplingFields {
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i32>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
    repeat_last_n: Option<i32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    seed: Option<i64>,
    stop: Option<StopField>,
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

const MAX_STOP_STRINGS: usize = 16;

impl SamplingFields {
    fn validate(&self) -> Result<(SamplingParams, Vec<String>), ApiError> {
        let d = SamplingParams::default();
        let bad = |param: &'static str, msg: String| ApiError::bad_request(msg).with_param(param);
        let check = |param: &'static str, v: Option<f32>, lo: f32, hi: f32, default: f32| -> Result<f32, ApiError> {
            match v {
                None => Ok(default),
                Some(x) if x.is_finite() && x >= lo && x <= hi => Ok(x),
                Some(x) => Err(bad(param, format!("{param} must be between {lo} and {hi}, got {x}"))),
            }
        };
        let params = SamplingParams {
            temperature: check("temperature", self.temperature, 0.0, 100.0, d.temperature)?,
            top_p: check("top_p", self.top_p, 0.0, 1.0, d.top_p)?,
            min_p: check("min_p", self.min_p, 0.0, 1.0, d.min_p)?,
            repeat_penalty: check("repeat_penalty", self.repeat_penalty, 0.0, 100.0, d.repeat_penalty)?,
            presence_penalty: check("presence_penalty", self.presence_penalty, -2.0, 2.0, d.presence_penalty)?,
            frequency_penalty: check("frequency_penalty", self.frequency_penalty, -2.0, 2.0, d.frequency_penalty)?,
            top_k: match self.top_k {
                Some(k) if k < 0 => return Err(bad("top_k", format!("top_k must be 0 (off) or more, got {k}"))),
                Some(k) => k,
                None => d.top_k,
            },
            repeat_last_n: match self.repeat_last_n {
                Some(n) if n < 0 => {
                    return Err(bad("repeat_last_n", format!("repeat_last_n must be 0 or more, got {n}")))
                }
                Some(n) => n,
                None => d.repeat_last_n,
            },
            seed: match self.seed {
                None => None,
                Some(s) if s < 0 => None, // llama-server: -1 = random
                Some(s) => {
                    Some(u32::try_from(s).map_err(|_| bad("seed", format!("seed must fit in 32 bits, got {s}")))?)
                }
            },
        };
        if self.n.is_some_and(|n| n != 1) {
            return Err(bad("n", "only n = 1 is supported".into()));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP_STRINGS {
            return Err(bad("stop", format!("at most {MAX_STOP_STRINGS} stop strings, got {}", stop.len())));
        }
        Ok((params, stop))
    }

    fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }
}

fn max_tokens(value: Option<u32>, param: &'static str) -> Result<Option<u32>, ApiError> {
    match value {
        Some(0) => Err(ApiError::bad_request(format!("{param} must be at least 1")).with_param(param)),
        v => Ok(v),
    }
}

/// The instance named by `model`, started first if it is stopped and allows on-demand starts.
async fn lookup(state: &AppState, model: &str) -> Result<Serving, ApiError> {
    let timeout = Duration::from_secs(state.config.read().on_demand_start_timeout);
    state.registry.serving_or_start(model, timeout).await.map_err(|e| match e {
        InstanceError::NotFound(_) => {
            ApiError::new(StatusCode::NOT_FOUND, "MODEL_NOT_FOUND", format!("The model '{model}' does not exist"))
                .with_param("model")
        }
        other => ApiError::from(other),
    })
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    model: String,
    messages: Vec<MessageIn>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    #[serde(flatten)]
    sampling: SamplingFields,
}

#[derive(Debug, Deserialize)]
struct MessageIn {
    role: String,
    #[serde(default)]
    content: Option<ContentIn>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ContentIn {
    Text(String),
    Parts(Vec<PartIn>),
}

#[derive(Debug, Deserialize)]
struct PartIn {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

fn flatten_messages(messages: Vec<MessageIn>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty").with_param("messages"));
    }
    messages
        .into_iter()
        .map(|m| {
            let content = match m.content {
                None => String::new(),
                Some(ContentIn::Text(t)) => t,
                Some(ContentIn::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(ApiError::bad_request(format!(
                                    "content parts of type '{kind}' are not supported; only text"
                                ))
                                .with_param("messages"))
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage { role: m.role, content })
        })
        .collect()
}

/// Set on routers served on an instance's own port: requests go to that instance whatever
/// `model` they name, as they would with a llama-server.
#[derive(Clone)]
pub struct Pinned(pub Arc<str>);

fn pin(pinned: Option<Extension<Pinned>>, model: &mut String) {
    if let Some(Extension(Pinned(name))) = pinned {
        *model = name.to_string();
    }
}

async fn chat_completions(
    State(state): State<AppState>,
    pinned: Option<Extension<Pinned>>,
    OaiJson(mut req): OaiJson<ChatRequest>,
) -> OaiResult<Response> {
    pin(pinned, &mut req.model);
    let serving = lookup(&state, &req.model).await?;
    let (sampling, stop) = req.sampling.validate()?;
    let max_tokens = max_tokens(req.max_completion_tokens.or(req.max_tokens), "max_tokens")?;
    let messages = flatten_messages(req.messages)?;
    let rendered = serving.template.render(&messages, true).map_err(|e| {
        ApiError::bad_request("The chat template could not render these messages").with_details(e.to_string())
    })?;
    let info = serving.engine.info();
    // The tokenizer adds BOS itself; a template that writes it too would double it (llama-server strips it the same way).
    let prompt = match rendered.strip_prefix(info.bos_token.as_str()) {
        Some(rest) if info.add_bos && !info.bos_token.is_empty() => rest.to_string(),
        _ => rendered,
    };
    let request = GenerateRequest { prompt: Prompt::Text(prompt), sampling, stop, max_tokens };
    let generation = serving.engine.generate(request).await.map_err(ApiError::from)?;
    let meta = ResponseMeta::new("chatcmpl", req.model, Kind::Chat);
    if req.sampling.stream {
        Ok(sse(generation, meta, req.sampling.include_usage()).into_response())
    } else {
        Ok(complete(generation, meta).await?.into_response())
    }
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    model: String,
    prompt: PromptIn,
    max_tokens: Option<u32>,
    #[serde(flatten)]
    sampling: SamplingFields,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptIn {
    Text(String),
    Tokens(Vec<i32>),
    Texts(Vec<String>),
}

/// OpenAI's default for `/v1/completions`.
const DEFAULT_COMPLETION_TOKENS: u32 = 16;

async fn completions(
    State(state): State<AppState>,
    pinned: Option<Extension<Pinned>>,
    OaiJson(mut req): OaiJson<CompletionRequest>,
) -> OaiResult<Response> {
    pin(pinned, &mut req.model);
    let serving = lookup(&state, &req.model).await?;
    let (sampling, stop) = req.sampling.validate()?;
    let max_tokens = max_tokens(Some(req.max_tokens.unwrap_or(DEFAULT_COMPLETION_TOKENS)), "max_tokens")?;
    let prompt = match req.prompt {
        PromptIn::Text(t) => Prompt::Text(t),
        PromptIn::Tokens(t) => Prompt::Tokens(t),
        PromptIn::Texts(mut v) if v.len() == 1 => Prompt::Text(v.remove(0)),
        PromptIn::Texts(_) => {
            return Err(ApiError::bad_request("only one prompt per request is supported").with_param("prompt").into())
        }
    };
    let generation = serving
        .engine
        .generate(GenerateRequest { prompt, sampling, stop, max_tokens })
        .await
        .map_err(ApiError::from)?;
    let meta = ResponseMeta::new("cmpl", req.model, Kind::Completion);
    if req.sampling.stream {
        Ok(sse(generation, meta, req.sampling.include_usage()).into_response())
    } else {
        Ok(complete(generation, meta).await?.into_response())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

struct ResponseMeta {
    id: String,
    model: String,
    created: u64,
    kind: Kind,
}

impl ResponseMeta {
    fn new(prefix: &str, model: String, kind: Kind) -> Self {
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        ResponseMeta { id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()), model, created, kind }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }
}

#[derive(Serialize)]
struct UsageOut {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
    prompt_tokens_details: CachedOut,
}

#[derive(Serialize)]
struct CachedOut {
    cached_tokens: u32,
}

fn usage_out(u: &Usage) -> UsageOut {
    UsageOut {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        total_tokens: u.prompt_tokens + u.completion_tokens,
        prompt_tokens_details: CachedOut { cached_tokens: u.cached_tokens },
    }
}

/// llama-server's `timings` object, which benchmark tools read.
fn timings(u: &Usage) -> Value {
    let per_s = |n: u32, ms: f64| if ms > 0.0 { n as f64 * 1e3 / ms } else { 0.0 };
    let prompt_n = u.prompt_tokens - u.cached_tokens;
    json!({
        "cache_n": u.cached_tokens,
        "prompt_n": prompt_n,
        "prompt_ms": u.prompt_ms,
        "prompt_per_second": per_s(prompt_n, u.prompt_ms),
        "predicted_n": u.completion_tokens,
        "predicted_ms": u.generation_ms,
        "predicted_per_second": per_s(u.completion_tokens.saturating_sub(1), u.generation_ms),
    })
}

fn choice(kind: Kind, text: &str, finish: Option<FinishReason>, chunk: bool, first: bool) -> Value {
    match (kind, chunk) {
        (Kind::Chat, false) => json!({
            "index": 0, "message": { "role": "assistant", "content": text }, "logprobs": null, "finish_reason": finish,
        }),
        (Kind::Chat, true) => {
            let delta = match (first, finish.is_some() && text.is_empty()) {
                (true, _) => json!({ "role": "assistant", "content": text }),
                (false, true) => json!({}),
                (false, false) => json!({ "content": text }),
            };
            json!({ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish })
        }
        (Kind::Completion, _) => json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": finish }),
    }
}

async fn complete(generation: Generation, meta: ResponseMeta) -> Result<axum::Json<Value>, ApiError> {
    let (text, finish, usage) = generation.collect().await?;
    Ok(axum::Json(json!({
        "id": meta.id,
        "object": meta.object(false),
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": crate::build::fingerprint(),
        "choices": [choice(meta.kind, &text, Some(finish), false, false)],
        "usage": usage_out(&usage),
        "timings": timings(&usage),
    })))
}

struct StreamState {
    generation: Option<Generation>,
    meta: ResponseMeta,
    include_usage: bool,
    first: bool,
    out: VecDeque<Event>,
}

impl StreamState {
    fn chunk(&mut self, text: &str, finish: Option<FinishReason>) {
        let mut body = json!({
            "id": self.meta.id,
            "object": self.meta.object(true),
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": crate::build::fingerprint(),
            "choices": [choice(self.meta.kind, text, finish, true, self.first)],
        });
        if self.include_usage {
            body["usage"] = Value::Null;
        }
        self.first = false;
        self.out.push_back(Event::default().data(body.to_string()));
    }

    fn finish(&mut self, finish: FinishReason, usage: &Usage) {
        self.chunk("", Some(finish));
        if self.include_usage {
            let body = json!({
                "id": self.meta.id,
                "object": self.meta.object(true),
                "created": self.meta.created,
                "model": self.meta.model,
                "choices": [],
                "usage": usage_out(usage),
                "timings": timings(usage),
            });
            self.out.push_back(Event::default().data(body.to_string()));
        }
        self.out.push_back(Event::default().data("[DONE]"));
        self.generation = None;
    }

    fn fail(&mut self, error: ApiError) {
        self.out.push_back(Event::default().data(OpenAiError(error).body().to_string()));
        self.out.push_back(Event::default().data("[DONE]"));
        self.generation = None;
    }
}

/// The SSE response. The stream owns the `Generation`: when the client goes away axum drops
/// the stream, the generation's channel closes, and the engine frees the slot at its next step.
fn sse(
    generation: Generation,
    meta: ResponseMeta,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let state = StreamState { generation: Some(generation), meta, include_usage, first: true, out: VecDeque::new() };
    let stream = futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(event) = st.out.pop_front() {
                return Some((Ok(event), st));
            }
            let generation = st.generation.as_mut()?;
            match generation.next().await {
                Some(Ok(StreamEvent::Token { text, .. })) => {
                    if !text.is_empty() || st.first {
                        st.chunk(&text, None);
                    }
                }
                Some(Ok(StreamEvent::Done { finish_reason, usage })) => st.finish(finish_reason, &usage),
                Some(Ok(StreamEvent::Accepted { .. })) => {}
                Some(Err(e)) => st.fail(e.into()),
                None => st.fail(crate::engine::EngineError::IncompleteGeneration.into()),
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
