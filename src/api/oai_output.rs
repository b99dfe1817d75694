//! Turning engine generations into OpenAI responses: whole (`choices` with messages or texts),
//! or streamed as SSE chunks; `n` choices, log-probabilities, and tool calls parsed back out of
//! the text.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use serde::Serialize;
use serde_json::{json, Value};

use super::error::{ApiError, OpenAiError};
use super::tools::ValidTools;
use crate::engine::{EngineError, FinishReason, Generation, StreamEvent, TokenProbs, Usage};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Chat,
    Completion,
}

/// What every response of one request shares.
pub struct Output {
    pub id: String,
    pub model: String,
    pub created: u64,
    pub kind: Kind,
    /// Top log-probabilities asked for per token (None: no `logprobs`).
    pub logprobs: Option<u32>,
    /// Tools offered to the model (chat only); its text is parsed for calls.
    pub tools: Option<Arc<ValidTools>>,
    pub include_usage: bool,
}

impl Output {
    pub fn new(model: String, kind: Kind) -> Self {
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let prefix = if kind == Kind::Chat { "chatcmpl" } else { "cmpl" };
        Output {
            id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
            model,
            created,
            kind,
            logprobs: None,
            tools: None,
            include_usage: false,
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": crate::build::fingerprint(),
            "choices": choices,
        })
    }

    /// One log-probability entry per token, in the route's shape.
    fn logprob_entries(&self, probs: &[Box<TokenProbs>], text_offset: &mut usize) -> Value {
        let token = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        match self.kind {
            Kind::Chat => {
                let content: Vec<Value> = probs
                    .iter()
                    .map(|p| {
                        let top: Vec<Value> = p
                            .top
                            .iter()
                            .map(|(_, b, lp)| json!({ "token": token(b), "logprob": lp, "bytes": b }))
                            .collect();
                        json!({ "token": token(&p.bytes), "logprob": p.logprob, "bytes": p.bytes, "top_logprobs": top })
                    })
                    .collect();
                json!({ "content": content })
            }
            Kind::Completion => {
                let mut offsets = Vec::with_capacity(probs.len());
                for p in probs {
                    offsets.push(*text_offset);
                    *text_offset += token(&p.bytes).len();
                }
                json!({
                    "tokens": probs.iter().map(|p| token(&p.bytes)).collect::<Vec<_>>(),
                    "token_logprobs": probs.iter().map(|p| p.logprob).collect::<Vec<_>>(),
                    "top_logprobs": probs.iter().map(|p| {
                        p.top.iter().map(|(_, b, lp)| (token(b), json!(lp))).collect::<serde_json::Map<_, _>>()
                    }).collect::<Vec<_>>(),
                    "text_offset": offsets,
                })
            }
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

/// Usage over all choices: the prompt counts once (OpenAI's accounting), outputs add up.
fn usage_out(usages: &[Usage]) -> UsageOut {
    let prompt = usages.first().map_or(0, |u| u.prompt_tokens);
    let completion: u32 = usages.iter().map(|u| u.completion_tokens).sum();
    UsageOut {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        prompt_tokens_details: CachedOut { cached_tokens: usages.first().map_or(0, |u| u.cached_tokens) },
    }
}

/// llama-server's `timings` object, which benchmark tools read.
pub fn timings(u: &Usage) -> Value {
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

fn finish_str(finish: FinishReason, called: bool) -> &'static str {
    match (finish, called) {
        (_, true) => "tool_calls",
        (FinishReason::Stop, false) => "stop",
        (FinishReason::Length, false) => "length",
    }
}

/// A finished choice's message: content, or tool calls parsed from the text.
fn message(output: &Output, text: String) -> (Value, bool) {
    if let Some(tools) = &output.tools {
        let parsed = tools.parse(&text);
        if !parsed.tool_calls.is_empty() {
            return (json!({ "role": "assistant", "content": parsed.content, "tool_calls": parsed.tool_calls }), true);
        }
    }
    (json!({ "role": "assistant", "content": text }), false)
}

/// Runs every choice to its end and answers with one JSON body.
pub async fn complete(generations: Vec<Generation>, output: Output) -> Result<axum::Json<Value>, ApiError> {
    let mut collected = Vec::with_capacity(generations.len());
    for generation in generations {
        collected.push(collect(generation));
    }
    let results = futures::future::try_join_all(collected).await?;
    let mut choices = Vec::with_capacity(results.len());
    let mut usages = Vec::with_capacity(results.len());
    for (index, (text, probs, finish, usage)) in results.into_iter().enumerate() {
        let logprobs = match output.logprobs {
            Some(_) => output.logprob_entries(&probs, &mut 0),
            None => Value::Null,
        };
        choices.push(match output.kind {
            Kind::Chat => {
                let (message, called) = message(&output, text);
                json!({ "index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_str(finish, called) })
            }
            Kind::Completion => {
                json!({ "index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_str(finish, false) })
            }
        });
        usages.push(usage);
    }
    let mut body = output.envelope(false, Value::Array(choices));
    body["usage"] = serde_json::to_value(usage_out(&usages)).unwrap_or_default();
    body["timings"] = usages.first().map(timings).unwrap_or_default();
    Ok(axum::Json(body))
}

type Collected = (String, Vec<Box<TokenProbs>>, FinishReason, Usage);

async fn collect(mut generation: Generation) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut probs = Vec::new();
    while let Some(event) = generation.next().await {
        match event? {
            StreamEvent::Token { text: t, probs: p, .. } => {
                text.push_str(&t);
                probs.extend(p);
            }
            StreamEvent::Done { finish_reason, usage, .. } => return Ok((text, probs, finish_reason, usage)),
            StreamEvent::Accepted { .. } => {}
        }
    }
    Err(EngineError::IncompleteGeneration.into())
}

/// Whether a choice's text is streamed as it comes, or held to be parsed for tool calls.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Tools are offered and no text has shown what the answer is yet.
    Undecided,
    Streaming,
    /// The text looks like a tool call: held until the end.
    Holding,
}

struct ChoiceState {
    first: bool,
    mode: Mode,
    held: String,
    text_offset: usize,
}

/// Text that may open a tool call in one of the formats the parser knows.
fn may_open_call(text: &str) -> bool {
    let t = text.trim_start();
    ["{", "[", "<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "```"]
        .iter()
        .any(|p| t.starts_with(p) || p.starts_with(t))
}

struct Streamer {
    output: Output,
    choices: Vec<ChoiceState>,
    usages: Vec<Option<Usage>>,
}

impl Streamer {
    fn chunk(&self, index: usize, delta: Value, logprobs: Value, finish: Option<&str>) -> Event {
        let choice = match self.output.kind {
            Kind::Chat => json!({ "index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish }),
            Kind::Completion => json!({
                "index": index, "text": delta.get("content").cloned().unwrap_or(json!("")),
                "logprobs": logprobs, "finish_reason": finish,
            }),
        };
        let mut body = self.output.envelope(true, json!([choice]));
        if self.output.include_usage {
            body["usage"] = Value::Null;
        }
        Event::default().data(body.to_string())
    }

    fn content_delta(&mut self, index: usize, text: &str) -> Value {
        let st = &mut self.choices[index];
        let mut delta = json!({ "content": text });
        if std::mem::take(&mut st.first) && self.output.kind == Kind::Chat {
            delta["role"] = json!("assistant");
        }
        delta
    }

    /// Events for one engine event of choice `index`.
    fn on_event(&mut self, index: usize, event: Result<StreamEvent, EngineError>, out: &mut Vec<Event>) {
        match event {
            Ok(StreamEvent::Accepted { .. }) => {}
            Ok(StreamEvent::Token { text, probs, .. }) => {
                let logprobs = match (&probs, self.output.logprobs) {
                    (Some(p), Some(_)) => {
                        let mut offset = self.choices[index].text_offset;
                        let v = self.output.logprob_entries(std::slice::from_ref(p), &mut offset);
                        self.choices[index].text_offset = offset;
                        v
                    }
                    _ => Value::Null,
                };
                let st = &mut self.choices[index];
                if st.mode == Mode::Undecided {
                    st.held.push_str(&text);
                    if st.held.trim().is_empty() {
                        return;
                    }
                    st.mode = if may_open_call(&st.held) { Mode::Holding } else { Mode::Streaming };
                    if st.mode == Mode::Streaming {
                        let held = std::mem::take(&mut st.held);
                        let delta = self.content_delta(index, &held);
                        out.push(self.chunk(index, delta, logprobs, None));
                    }
                    return;
                }
                if st.mode == Mode::Holding {
                    st.held.push_str(&text);
                    return;
                }
                if !text.is_empty() || st.first || !logprobs.is_null() {
                    let delta = self.content_delta(index, &text);
                    out.push(self.chunk(index, delta, logprobs, None));
                }
            }
            Ok(StreamEvent::Done { finish_reason, usage, .. }) => {
                let held = std::mem::take(&mut self.choices[index].held);
                let mut called = false;
                if !held.is_empty() {
                    let (message, has_calls) = message(&self.output, held.clone());
                    called = has_calls;
                    let mut delta = if has_calls {
                        let calls: Vec<Value> = message["tool_calls"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .enumerate()
                            .map(|(i, c)| {
                                let mut c = c.clone();
                                c["index"] = json!(i);
                                c
                            })
                            .collect();
                        json!({ "content": message["content"], "tool_calls": calls })
                    } else {
                        json!({ "content": held })
                    };
                    if std::mem::take(&mut self.choices[index].first) && self.output.kind == Kind::Chat {
                        delta["role"] = json!("assistant");
                    }
                    out.push(self.chunk(index, delta, Value::Null, None));
                }
                let delta = if std::mem::take(&mut self.choices[index].first) && self.output.kind == Kind::Chat {
                    json!({ "role": "assistant", "content": "" })
                } else {
                    json!({})
                };
                out.push(self.chunk(index, delta, Value::Null, Some(finish_str(finish_reason, called))));
                self.usages[index] = Some(usage);
                if self.usages.iter().all(Option::is_some) {
                    let usages: Vec<Usage> = self.usages.iter().flatten().copied().collect();
                    if self.output.include_usage {
                        let mut body = self.output.envelope(true, json!([]));
                        body["usage"] = serde_json::to_value(usage_out(&usages)).unwrap_or_default();
                        body["timings"] = timings(&usages[0]);
                        out.push(Event::default().data(body.to_string()));
                    }
                    out.push(Event::default().data("[DONE]"));
                }
            }
            Err(e) => out.extend(error_events(OpenAiError(ApiError::from(e)))),
        }
    }
}

/// The SSE response over every choice. The stream owns the generations: when the client goes
/// away axum drops the stream, their channels close, and the engine frees the slots.
pub fn stream(generations: Vec<Generation>, output: Output) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    Sse::new(events(generations, output)).keep_alive(KeepAlive::default())
}

/// An error as the last events of a stream that had already begun.
pub fn error_events(e: OpenAiError) -> Vec<Event> {
    vec![Event::default().data(e.body().to_string()), Event::default().data("[DONE]")]
}

/// The events of [`stream`].
pub fn events(generations: Vec<Generation>, output: Output) -> impl Stream<Item = Result<Event, Infallible>> + Send {
    let n = generations.len();
    let mode = if output.tools.is_some() { Mode::Undecided } else { Mode::Streaming };
    let streamer = Streamer {
        choices: (0..n).map(|_| ChoiceState { first: true, mode, held: String::new(), text_offset: 0 }).collect(),
        usages: vec![None; n],
        output,
    };
    let merged = futures::stream::select_all(generations.into_iter().enumerate().map(|(i, g)| {
        futures::stream::unfold(g, |mut g| async move { g.next().await.map(|e| (e, g)) })
            .chain(futures::stream::once(async { Err(EngineError::IncompleteGeneration) }))
            .map(move |e| (i, e))
            .boxed()
    }));
    // Each choice's stream ends after Done; a stream that ends without one gets the trailing
    // IncompleteGeneration above, which is dropped once that choice is done.
    let events = merged
        .scan((streamer, false), |(streamer, failed), (i, event)| {
            // A choice is done once its usage is in; after an error the stream has ended.
            if *failed || streamer.usages[i].is_some() {
                return futures::future::ready(Some(Vec::new()));
            }
            *failed = event.is_err();
            let mut out = Vec::new();
            streamer.on_event(i, event, &mut out);
            futures::future::ready(Some(out))
        })
        .flat_map(|events| futures::stream::iter(events.into_iter().map(Ok)));
    events
}
