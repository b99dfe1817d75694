//! OpenAI-compatible routes: `/v1/models`, `/v1/chat/completions`, `/v1/completions`,
//! `/v1/embeddings`.
//!
//! `model` names the instance. Everything that can be refused — unknown model, stopped
//! instance, bad parameters, a prompt over the context, a full queue — is refused before the
//! response starts, so it gets a real status; only failures during generation become an error
//! event inside the stream, followed by `[DONE]`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::doc::{self, OpenAiErrorBody};
use super::error::{ApiError, OaiJson, OpenAiError};
use super::oai_output::{self, Kind, Output};
use super::params::GenerationFields;
use super::tools::{self, ToolChoiceIn, ToolIn, ValidTools};
use super::AppState;
use crate::auth::{AuthError, Need, Principal};
use crate::engine::chat::ChatMessage;
use crate::engine::{Engine, GenerateRequest, Generation, Prompt};
use crate::instance::{InstanceError, Serving};

/// The routes, each with its `#[utoipa::path]`.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(models))
        .routes(routes!(chat_completions))
        .routes(routes!(completions))
        .routes(routes!(embeddings))
}

type OaiResult<T> = Result<T, OpenAiError>;

/// The instances, as models (`model` takes their names); under an instance's routes, that instance only.
#[utoipa::path(
    get,
    path = "/models",
    operation_id = "list_models",
    tag = "openai",
    responses((status = 200, description = "The models", body = doc::ModelList)),
)]
async fn models(State(state): State<AppState>, caller: Caller) -> impl IntoResponse {
    let data: Vec<Value> = state
        .registry
        .list()
        .into_iter()
        .filter(|i| caller.sees(&i.name))
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

/// The instance named by `model`, started first if it is stopped and allows on-demand starts.
pub async fn lookup(state: &AppState, model: &str) -> Result<Serving, ApiError> {
    let timeout = Duration::from_secs(state.config.read().on_demand_start_timeout);
    state.registry.serving_or_start(model, timeout).await.map_err(|e| match e {
        InstanceError::NotFound(_) => {
            ApiError::new(StatusCode::NOT_FOUND, "MODEL_NOT_FOUND", format!("The model '{model}' does not exist"))
                .with_param("model")
        }
        other => ApiError::from(other),
    })
}

/// Fields both generation routes share besides sampling.
#[derive(Debug, Default, Deserialize, ToSchema)]
struct CommonFields {
    /// Choices to generate (1 to 16), each in its own slot.
    #[schema(minimum = 1, maximum = 16)]
    n: Option<u32>,
    /// Answer with server-sent events.
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    #[serde(flatten)]
    generation: GenerationFields,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
struct StreamOptions {
    /// End the stream with a chunk that carries `usage`.
    #[serde(default)]
    include_usage: bool,
}

/// Most choices one request may ask for: each takes a slot.
const MAX_CHOICES: u32 = 16;
/// OpenAI's limit on `top_logprobs`.
const MAX_TOP_LOGPROBS: u32 = 20;

impl CommonFields {
    fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }

    fn n(&self) -> Result<u32, ApiError> {
        match self.n.unwrap_or(1) {
            n @ 1..=MAX_CHOICES => Ok(n),
            n => Err(ApiError::bad_request(format!("n must be between 1 and {MAX_CHOICES}, got {n}")).with_param("n")),
        }
    }
}

fn max_tokens(value: Option<u32>, param: &'static str) -> Result<Option<u32>, ApiError> {
    match value {
        Some(0) => Err(ApiError::bad_request(format!("{param} must be at least 1")).with_param(param)),
        v => Ok(v),
    }
}

/// Admits `n` generations of one prompt. Choice i with a fixed seed uses seed + i, so choices
/// differ but the request stays reproducible. If any is refused, those admitted are dropped
/// (cancelled) and the refusal is the answer.
async fn generate_n(engine: &Engine, request: GenerateRequest, n: u32) -> Result<Vec<Generation>, ApiError> {
    let mut generations = Vec::with_capacity(n as usize);
    for i in 0..n {
        let mut r = request.clone();
        r.sampling.seed = r.sampling.seed.map(|s| s.wrapping_add(i));
        generations.push(engine.generate(r).await.map_err(ApiError::from)?);
    }
    Ok(generations)
}

/// Answers once `work` (finding or starting the instance, validating, admitting) is done. A
/// stream still waiting after [`FIRST_BYTE_WITHIN`] (its model is being swapped in) is answered
/// at once and kept alive with SSE comments, so clients do not time out; what went wrong after
/// that comes as an error event, the way errors during generation do.
async fn respond(
    work: impl Future<Output = OaiResult<(Vec<Generation>, Output)>> + Send + 'static,
    stream: bool,
) -> OaiResult<Response> {
    if !stream {
        let (generations, output) = work.await?;
        return Ok(oai_output::complete(generations, output).await?.into_response());
    }
    let mut work = Box::pin(work);
    if let Ok(ready) = tokio::time::timeout(FIRST_BYTE_WITHIN, &mut work).await {
        let (generations, output) = ready?;
        return Ok(oai_output::stream(generations, output).into_response());
    }
    let events = futures::stream::once(work).flat_map(|ready| match ready {
        Ok((generations, output)) => oai_output::events(generations, output).left_stream(),
        Err(e) => futures::stream::iter(oai_output::error_events(e).into_iter().map(Ok)).right_stream(),
    });
    let keep_alive = KeepAlive::new().interval(FIRST_BYTE_WITHIN).text("waiting for the model to start");
    Ok(Sse::new(events).keep_alive(keep_alive).into_response())
}

/// The longest a stream waits before its first byte (see [`respond`]).
const FIRST_BYTE_WITHIN: Duration = Duration::from_secs(3);

/// OpenAI's chat completion request.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatRequest {
    /// The instance.
    model: String,
    messages: Vec<MessageIn>,
    /// Most tokens to generate (default: until the end of the slot's context).
    #[schema(minimum = 1)]
    max_tokens: Option<u32>,
    /// Preferred over `max_tokens` when both are given.
    #[schema(minimum = 1)]
    max_completion_tokens: Option<u32>,
    logprobs: Option<bool>,
    /// Top log-probabilities per token (needs `logprobs`), at most 20.
    #[schema(maximum = 20)]
    top_logprobs: Option<u32>,
    tools: Option<Vec<ToolIn>>,
    tool_choice: Option<ToolChoiceIn>,
    parallel_tool_calls: Option<bool>,
    #[serde(flatten)]
    common: CommonFields,
}

/// A chat message.
#[derive(Debug, Deserialize, ToSchema)]
pub struct MessageIn {
    /// `system`, `user`, `assistant`, `tool`, or any role the model's template knows.
    role: String,
    #[serde(default)]
    content: Option<ContentIn>,
    /// An assistant turn's calls, OpenAI-shaped.
    tool_calls: Option<Vec<Value>>,
    tool_call_id: Option<String>,
    name: Option<String>,
}

/// Text, or content parts of which only `text` ones are supported.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
enum ContentIn {
    Text(String),
    Parts(Vec<PartIn>),
}

#[derive(Debug, Deserialize, ToSchema)]
struct PartIn {
    /// Only `text` is supported.
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

pub fn flatten_messages(messages: Vec<MessageIn>) -> Result<Vec<ChatMessage>, ApiError> {
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
            let tool_calls = m.tool_calls.map(|calls| Value::Array(calls.into_iter().map(decode_arguments).collect()));
            Ok(ChatMessage { role: m.role, content, tool_calls, tool_call_id: m.tool_call_id, name: m.name })
        })
        .collect()
}

/// OpenAI sends a call's arguments as JSON text; templates expect the object.
fn decode_arguments(mut call: Value) -> Value {
    if let Some(args) = call.pointer_mut("/function/arguments") {
        if let Some(obj) = args.as_str().and_then(|s| serde_json::from_str::<Value>(s).ok()) {
            *args = obj;
        }
    }
    call
}

/// Set on routers served on an instance's own port: requests go to that instance whatever
/// `model` they name, as they would with a llama-server.
#[derive(Clone)]
pub struct Pinned(pub Arc<str>);

/// Who calls a `/v1` route, and the instance the route is pinned to, if any.
pub struct Caller {
    pinned: Option<Arc<str>>,
    principal: Option<Principal>,
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Caller {
            pinned: parts.extensions.get::<Pinned>().map(|Pinned(name)| name.clone()),
            principal: parts.extensions.get::<Principal>().cloned(),
        })
    }
}

impl Caller {
    /// Points `model` at the pinned instance if there is one, and checks the caller may use
    /// it. Without a principal (a router the guard did not wrap) nothing is allowed.
    fn target(&self, model: &mut String) -> Result<(), ApiError> {
        if let Some(name) = &self.pinned {
            *model = name.to_string();
        }
        match &self.principal {
            Some(p) => p.check(Need::Inference(Some(model))).map_err(|e| ApiError::from(e).with_param("model")),
            None => Err(ApiError::from(AuthError::Unauthenticated("no credentials were checked".into()))),
        }
    }

    fn sees(&self, instance: &str) -> bool {
        self.pinned.as_deref().is_none_or(|p| p == instance)
            && self.principal.as_ref().is_some_and(|p| p.may_use(instance))
    }
}

/// A chat completion of the instance named by `model`: one JSON body, or with `stream` server-sent
/// events of `ChatCompletionChunk`s ending with `data: [DONE]`.
#[utoipa::path(
    post,
    path = "/chat/completions",
    operation_id = "create_chat_completion",
    tag = "openai",
    request_body = ChatRequest,
    responses(
        (status = 200, description = "The completion, or its stream", content(
            (doc::ChatCompletion = "application/json"),
            (doc::ChatCompletionEvent = "text/event-stream"),
        )),
        (status = 400, description = "Invalid request, e.g. a prompt over the context or bad parameters", body = OpenAiErrorBody),
        (status = 404, description = "No such model (`MODEL_NOT_FOUND`)", body = OpenAiErrorBody),
        (status = 502, description = "The model is an instance on a remote node that cannot be reached (`NODE_UNAVAILABLE`)", body = OpenAiErrorBody),
        (status = 409, description = "The instance cannot start now (`INVALID_STATE`, `MODEL_NOT_AVAILABLE`, `NO_CAPACITY`, `PORT_IN_USE`)", body = OpenAiErrorBody),
        (status = 413, description = "The body is too large", body = OpenAiErrorBody),
        (status = 422, description = "A field has the wrong type (`INVALID_JSON`)", body = OpenAiErrorBody),
        (status = 500, description = "Generation failed", body = OpenAiErrorBody),
        (status = 503, description = "The instance is not running or is overloaded (`INSTANCE_NOT_RUNNING`, `OVERLOADED`, `START_TIMEOUT`, `MODEL_LOAD_FAILED`)", body = OpenAiErrorBody),
    ),
)]
async fn chat_completions(
    State(state): State<AppState>,
    caller: Caller,
    OaiJson(mut req): OaiJson<ChatRequest>,
) -> OaiResult<Response> {
    caller.target(&mut req.model)?;
    let stream = req.common.stream;
    respond(chat_generations(state, req), stream).await
}

async fn chat_generations(state: AppState, req: ChatRequest) -> OaiResult<(Vec<Generation>, Output)> {
    let serving = lookup(&state, &req.model).await?;
    let n = req.common.n()?;
    let include_usage = req.common.include_usage();
    let max_tokens = max_tokens(req.max_completion_tokens.or(req.max_tokens), "max_tokens")?;
    let top = match (req.logprobs, req.top_logprobs) {
        (_, Some(t)) if t > MAX_TOP_LOGPROBS => {
            return Err(ApiError::bad_request(format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}"))
                .with_param("top_logprobs")
                .into())
        }
        (Some(true), t) => Some(t.unwrap_or(0)),
        (_, Some(_)) => {
            return Err(ApiError::bad_request("top_logprobs needs logprobs: true").with_param("logprobs").into())
        }
        _ => None,
    };
    let tools = tools::validate(req.tools, req.tool_choice, req.parallel_tool_calls)
        .map_err(|e| ApiError::bad_request(e.message.clone()).with_param(e.param))?
        .map(Arc::new);
    let mut valid = req.common.generation.validate(&serving.engine).await?;
    let mut messages = flatten_messages(req.messages)?;
    let rendered = render_chat(&serving, &mut messages, tools.as_deref())?;
    if let Some(schema) = tools.as_ref().and_then(|t| t.grammar_schema()) {
        if valid.grammar.is_some() {
            return Err(ApiError::bad_request(
                "a forced tool call cannot be combined with response_format or a grammar",
            )
            .with_param("tool_choice")
            .into());
        }
        valid.grammar = Some(super::params::schema_text_grammar(&schema)?);
    }
    let request = valid.into_request(Prompt::Text(rendered), max_tokens, top.map_or(0, |t| t.max(1)));
    let generations = generate_n(&serving.engine, request, n).await?;
    let mut output = Output::new(req.model, Kind::Chat);
    output.logprobs = top;
    output.tools = tools;
    output.include_usage = include_usage;
    Ok((generations, output))
}

/// Renders the conversation. Tools go to templates that use them; for the others they are
/// described in a system message (first, or merged into an existing one).
fn render_chat(
    serving: &Serving,
    messages: &mut Vec<ChatMessage>,
    tools: Option<&ValidTools>,
) -> Result<String, ApiError> {
    let template = &serving.template;
    let tools_json = tools.map(ValidTools::openai_tools_json);
    // A forced call is grammar-constrained to the generic format, so the model must be told
    // that format even when its template knows another.
    let pass_tools = tools.is_some_and(|t| t.grammar_schema().is_none()) && template.mentions_tools();
    if let (Some(tools), false) = (tools, pass_tools) {
        let prompt = tools.system_prompt();
        match messages.first_mut() {
            Some(m) if m.role == "system" => m.content = format!("{}\n\n{prompt}", m.content),
            _ => messages.insert(0, ChatMessage::new("system", prompt)),
        }
    }
    let rendered =
        template.render_with_tools(messages, true, if pass_tools { tools_json.as_ref() } else { None }).map_err(
            |e| ApiError::bad_request("The chat template could not render these messages").with_details(e.to_string()),
        )?;
    let info = serving.engine.info();
    // The tokenizer adds BOS itself; a template that writes it too would double it (llama-server strips it the same way).
    Ok(match rendered.strip_prefix(info.bos_token.as_str()) {
        Some(rest) if info.add_bos && !info.bos_token.is_empty() => rest.to_string(),
        _ => rendered,
    })
}

/// OpenAI's (legacy) completion request.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CompletionRequest {
    /// The instance.
    model: String,
    prompt: PromptIn,
    /// Most tokens to generate (default 16).
    #[schema(minimum = 1)]
    max_tokens: Option<u32>,
    /// OpenAI's legacy completions: how many top log-probabilities per token (at most 5).
    #[schema(maximum = 5)]
    logprobs: Option<u32>,
    /// Not supported: `true` is refused.
    echo: Option<bool>,
    /// Not supported here (use the instance's `/infill`): refused.
    suffix: Option<String>,
    #[serde(flatten)]
    common: CommonFields,
}

/// One prompt: a text, token ids, or a list of exactly one text.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PromptIn {
    Text(String),
    Tokens(Vec<i32>),
    Texts(Vec<String>),
}

impl PromptIn {
    /// One prompt: a list of several is refused rather than silently cut to its first.
    pub fn single(self) -> Result<Prompt, ApiError> {
        match self {
            PromptIn::Text(t) => Ok(Prompt::Text(t)),
            PromptIn::Tokens(t) => Ok(Prompt::Tokens(t)),
            PromptIn::Texts(mut v) if v.len() == 1 => Ok(Prompt::Text(v.remove(0))),
            PromptIn::Texts(_) => {
                Err(ApiError::bad_request("only one prompt per request is supported").with_param("prompt"))
            }
        }
    }
}

/// OpenAI's default for `/v1/completions`.
const DEFAULT_COMPLETION_TOKENS: u32 = 16;
/// OpenAI's limit on completions' `logprobs`.
const MAX_COMPLETION_LOGPROBS: u32 = 5;

/// A completion of `prompt` by the instance named by `model`: one JSON body, or with `stream`
/// server-sent events of `Completion` chunks ending with `data: [DONE]`.
#[utoipa::path(
    post,
    path = "/completions",
    operation_id = "create_completion",
    tag = "openai",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion, or its stream", content(
            (doc::Completion = "application/json"),
            (doc::CompletionEvent = "text/event-stream"),
        )),
        (status = 400, description = "Invalid request, e.g. a prompt over the context or bad parameters", body = OpenAiErrorBody),
        (status = 404, description = "No such model (`MODEL_NOT_FOUND`)", body = OpenAiErrorBody),
        (status = 502, description = "The model is an instance on a remote node that cannot be reached (`NODE_UNAVAILABLE`)", body = OpenAiErrorBody),
        (status = 409, description = "The instance cannot start now (`INVALID_STATE`, `MODEL_NOT_AVAILABLE`, `NO_CAPACITY`, `PORT_IN_USE`)", body = OpenAiErrorBody),
        (status = 413, description = "The body is too large", body = OpenAiErrorBody),
        (status = 422, description = "A field has the wrong type (`INVALID_JSON`)", body = OpenAiErrorBody),
        (status = 500, description = "Generation failed", body = OpenAiErrorBody),
        (status = 503, description = "The instance is not running or is overloaded (`INSTANCE_NOT_RUNNING`, `OVERLOADED`, `START_TIMEOUT`, `MODEL_LOAD_FAILED`)", body = OpenAiErrorBody),
    ),
)]
async fn completions(
    State(state): State<AppState>,
    caller: Caller,
    OaiJson(mut req): OaiJson<CompletionRequest>,
) -> OaiResult<Response> {
    caller.target(&mut req.model)?;
    let stream = req.common.stream;
    respond(completion_generations(state, req), stream).await
}

async fn completion_generations(state: AppState, req: CompletionRequest) -> OaiResult<(Vec<Generation>, Output)> {
    let serving = lookup(&state, &req.model).await?;
    if req.echo == Some(true) {
        return Err(ApiError::bad_request("echo is not supported").with_param("echo").into());
    }
    if req.suffix.is_some() {
        return Err(ApiError::bad_request("suffix is not supported here; use the instance's /infill route")
            .with_param("suffix")
            .into());
    }
    if req.logprobs.is_some_and(|l| l > MAX_COMPLETION_LOGPROBS) {
        return Err(ApiError::bad_request(format!("logprobs must be at most {MAX_COMPLETION_LOGPROBS}"))
            .with_param("logprobs")
            .into());
    }
    let n = req.common.n()?;
    let include_usage = req.common.include_usage();
    let max_tokens = max_tokens(Some(req.max_tokens.unwrap_or(DEFAULT_COMPLETION_TOKENS)), "max_tokens")?;
    let prompt = req.prompt.single()?;
    let valid = req.common.generation.validate(&serving.engine).await?;
    let request = valid.into_request(prompt, max_tokens, req.logprobs.map_or(0, |l| l.max(1)));
    let generations = generate_n(&serving.engine, request, n).await?;
    let mut output = Output::new(req.model, Kind::Completion);
    output.logprobs = req.logprobs;
    output.include_usage = include_usage;
    Ok((generations, output))
}

/// OpenAI's embeddings request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingRequest {
    /// The instance (its `embeddings` option must be on).
    model: String,
    input: PromptsIn,
    /// `float` (default) or `base64`.
    #[schema(value_type = Option<EncodingFormat>)]
    encoding_format: Option<String>,
    /// Accepted for compatibility; vectors always have the model's size.
    dimensions: Option<u32>,
    user: Option<String>,
}

/// How embedding vectors are encoded.
#[derive(serde::Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)] // documents the values `encoding_format` takes
enum EncodingFormat {
    Float,
    Base64,
}

/// One input or several (at most 2048, none empty); each a text or a list of token ids.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PromptsIn {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i32>),
    TokenLists(Vec<Vec<i32>>),
}

/// Most inputs in one embedding request (OpenAI's limit).
const MAX_EMBEDDING_INPUTS: usize = 2048;

impl PromptsIn {
    pub fn into_prompts(self) -> Result<Vec<Prompt>, ApiError> {
        let prompts: Vec<Prompt> = match self {
            PromptsIn::Text(t) => vec![Prompt::Text(t)],
            PromptsIn::Texts(v) => v.into_iter().map(Prompt::Text).collect(),
            PromptsIn::Tokens(t) => vec![Prompt::Tokens(t)],
            PromptsIn::TokenLists(v) => v.into_iter().map(Prompt::Tokens).collect(),
        };
        if prompts.is_empty() || prompts.len() > MAX_EMBEDDING_INPUTS {
            return Err(ApiError::bad_request(format!(
                "input must hold between 1 and {MAX_EMBEDDING_INPUTS} items, got {}",
                prompts.len()
            ))
            .with_param("input"));
        }
        for (i, p) in prompts.iter().enumerate() {
            let empty = match p {
                Prompt::Text(t) => t.is_empty(),
                Prompt::Tokens(t) => t.is_empty(),
            };
            if empty {
                return Err(ApiError::bad_request(format!("input {i} is empty")).with_param("input"));
            }
        }
        Ok(prompts)
    }
}

/// L2-normalized, as OpenAI's and llama-server's embeddings are.
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// Embeddings of each input by the instance named by `model`, L2-normalized.
#[utoipa::path(
    post,
    path = "/embeddings",
    operation_id = "create_embeddings",
    tag = "openai",
    request_body = EmbeddingRequest,
    responses(
        (status = 200, description = "One vector per input", body = doc::EmbeddingList),
        (status = 400, description = "Invalid request, e.g. embeddings not enabled or an input too long", body = OpenAiErrorBody),
        (status = 404, description = "No such model (`MODEL_NOT_FOUND`)", body = OpenAiErrorBody),
        (status = 502, description = "The model is an instance on a remote node that cannot be reached (`NODE_UNAVAILABLE`)", body = OpenAiErrorBody),
        (status = 409, description = "The instance cannot start now (`INVALID_STATE`, `MODEL_NOT_AVAILABLE`, `NO_CAPACITY`, `PORT_IN_USE`)", body = OpenAiErrorBody),
        (status = 413, description = "The body is too large", body = OpenAiErrorBody),
        (status = 422, description = "A field has the wrong type or is unknown (`INVALID_JSON`)", body = OpenAiErrorBody),
        (status = 500, description = "The engine failed", body = OpenAiErrorBody),
        (status = 503, description = "The instance is not running or is overloaded (`INSTANCE_NOT_RUNNING`, `OVERLOADED`, `START_TIMEOUT`, `MODEL_LOAD_FAILED`)", body = OpenAiErrorBody),
    ),
)]
async fn embeddings(
    State(state): State<AppState>,
    caller: Caller,
    OaiJson(mut req): OaiJson<EmbeddingRequest>,
) -> OaiResult<Response> {
    caller.target(&mut req.model)?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!("encoding_format must be float or base64, got '{other}'"))
                .with_param("encoding_format")
                .into())
        }
    };
    let _ = (req.dimensions, req.user);
    let serving = lookup(&state, &req.model).await?;
    let inputs = req.input.into_prompts()?;
    let result = serving.engine.embed(inputs).await.map_err(ApiError::from)?;
    let data: Vec<Value> = result
        .vectors
        .into_iter()
        .enumerate()
        .map(|(index, mut v)| {
            normalize(&mut v);
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({ "object": "embedding", "index": index, "embedding": embedding })
        })
        .collect();
    Ok(axum::Json(json!({
        "object": "list",
        "data": data,
        "model": req.model,
        "usage": { "prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens },
    }))
    .into_response())
}
