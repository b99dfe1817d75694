//! The HTTP side: a target's streaming completion request, timed chunk by chunk; the probe that
//! checks a target answers before the run; and `/tokenize` for prompt calibration.

use std::str::FromStr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};

use super::stats::RequestRecord;
use super::workload::Job;
use super::BenchError;

/// Which OpenAI route the requests go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// `/v1/completions`: the prompt is sent as is.
    Completions,
    /// `/v1/chat/completions`: the prompt is one user message (the template adds tokens).
    Chat,
}

/// `name=URL[,model=M][,api-key=K]` as given on the command line.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetSpec {
    pub name: String,
    pub url: String,
    pub model: Option<String>,
    pub api_key: Option<String>,
}

impl FromStr for TargetSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let head = parts.next().unwrap_or_default();
        let (name, url) = head
            .split_once('=')
            .ok_or_else(|| format!("'{s}' is not NAME=URL[,model=M][,api-key=K]: the name is missing"))?;
        if name.is_empty() || url.is_empty() {
            return Err(format!("'{s}' is not NAME=URL[,model=M][,api-key=K]: empty name or URL"));
        }
        let mut spec = TargetSpec { name: name.into(), url: url.into(), model: None, api_key: None };
        for part in parts {
            match part.split_once('=') {
                Some(("model", m)) => spec.model = Some(m.into()),
                Some(("api-key" | "api_key", k)) => spec.api_key = Some(k.into()),
                _ => return Err(format!("'{part}' in '{s}': expected model=M or api-key=K")),
            }
        }
        Ok(spec)
    }
}

/// A server under test, with its own connection pool.
#[derive(Clone)]
pub struct Target {
    pub name: String,
    /// Without a trailing slash; routes are appended (`/v1/completions`).
    pub base: String,
    /// Sent as `model`; servers of one model (llama-server) ignore it.
    pub model: String,
    api_key: Option<String>,
    client: reqwest::Client,
}

impl Target {
    pub fn new(spec: &TargetSpec, default_model: &str, timeout: Duration) -> Result<Target, BenchError> {
        let invalid = |why: String| BenchError::InvalidTarget { name: spec.name.clone(), why };
        let url = reqwest::Url::parse(&spec.url).map_err(|e| invalid(format!("'{}' is not a URL: {e}", spec.url)))?;
        if url.scheme() != "http" {
            return Err(invalid(format!("'{}': only http:// URLs are supported", spec.url)));
        }
        // Accept the base as people copy it: with or without `/v1`.
        let base = spec.url.trim_end_matches('/').trim_end_matches("/v1").to_string();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(timeout)
            // llama-server (cpp-httplib) closes a kept-alive connection after 5 s idle, and
            // targets sit idle that long while the others take their turn: such connections are
            // dropped here first. (A close can still race a request; `run` sends it again.)
            .pool_idle_timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| invalid(format!("cannot build an HTTP client: {e}")))?;
        Ok(Target {
            name: spec.name.clone(),
            base,
            model: spec.model.clone().unwrap_or_else(|| default_model.to_string()),
            api_key: spec.api_key.clone(),
            client,
        })
    }

    fn post(&self, path: &str, body: &Value) -> reqwest::RequestBuilder {
        let mut request = self.client.post(format!("{}{path}", self.base)).json(body);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        request
    }

    fn body(&self, endpoint: Endpoint, job: &Job, temperature: Option<f32>, stream: bool) -> Value {
        let mut body = json!({
            "model": self.model,
            "max_tokens": job.max_tokens,
            "stream": stream,
            // Both paddock and llama-server take it: every request generates exactly
            // max_tokens, so output lengths do not depend on what the model says.
            "ignore_eos": true,
        });
        if stream {
            body["stream_options"] = json!({ "include_usage": true });
        }
        match endpoint {
            Endpoint::Completions => body["prompt"] = json!(job.prompt),
            Endpoint::Chat => body["messages"] = json!([{ "role": "user", "content": job.prompt }]),
        }
        if let Some(t) = temperature {
            body["temperature"] = json!(t);
        }
        body
    }

    fn path(endpoint: Endpoint) -> &'static str {
        match endpoint {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }

    /// One non-streamed request of one token: the target is up and takes our requests. Errors
    /// say which target, at which URL, and what went wrong.
    pub async fn probe(&self, endpoint: Endpoint) -> Result<(), ProbeError> {
        let job = Job { prompt: "Hello".into(), prompt_tokens: 2, max_tokens: 1 };
        let response = self.post(Self::path(endpoint), &self.body(endpoint, &job, None, false)).send().await;
        let response = response.map_err(|e| ProbeError::Unreachable(error_chain(&e)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        let text: String = text.chars().take(300).collect();
        Err(ProbeError::Status(status.as_u16(), text))
    }

    /// The same server asked for another `model` (one of a multi-model server's), sharing the
    /// connection pool.
    pub fn with_model(&self, model: &str) -> Target {
        Target { model: model.to_string(), ..self.clone() }
    }

    /// GET `path` answers 2xx.
    pub async fn get(&self, path: &str) -> Result<(), ProbeError> {
        self.get_json(path).await.map(|_| ())
    }

    /// GET `path`'s JSON body (Null if it is not JSON), if it answers 2xx.
    pub async fn get_json(&self, path: &str) -> Result<Value, ProbeError> {
        let mut request = self.client.get(format!("{}{path}", self.base));
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|e| ProbeError::Unreachable(error_chain(&e)))?;
        Self::answer(response).await
    }

    /// POST `body` to `path`; its JSON answer if it is 2xx.
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Value, ProbeError> {
        let response = self.post(path, body).send().await.map_err(|e| ProbeError::Unreachable(error_chain(&e)))?;
        Self::answer(response).await
    }

    async fn answer(response: reqwest::Response) -> Result<Value, ProbeError> {
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if status.is_success() {
            return Ok(serde_json::from_str(&text).unwrap_or(Value::Null));
        }
        Err(ProbeError::Status(status.as_u16(), text.chars().take(300).collect()))
    }

    /// Token count of `text` by the target's own tokenizer, if it has llama-server's
    /// `/tokenize` (at its root, or paddock's per-instance `/llama-cpp/{model}/tokenize`).
    pub async fn count_tokens(&self, text: &str) -> Option<usize> {
        let body = json!({ "content": text, "add_special": true });
        for path in ["/tokenize".to_string(), format!("/llama-cpp/{}/tokenize", self.model)] {
            let Ok(response) = self.post(&path, &body).send().await else { continue };
            if !response.status().is_success() {
                continue;
            }
            if let Ok(v) = response.json::<Value>().await {
                if let Some(tokens) = v["tokens"].as_array() {
                    return Some(tokens.len());
                }
            }
        }
        None
    }

    /// Runs one streamed request and times it. Never fails: failures are in the record.
    pub async fn run(&self, endpoint: Endpoint, job: &Job, temperature: Option<f32>, t0: Instant) -> RequestRecord {
        let start = Instant::now();
        let mut record = RequestRecord {
            start_s: start.duration_since(t0).as_secs_f64(),
            prompt_tokens_requested: job.prompt_tokens,
            max_tokens: job.max_tokens,
            ..Default::default()
        };
        let body = self.body(endpoint, job, temperature, true);
        let mut start = start;
        let mut result = self.stream(endpoint, &body, start, &mut record).await;
        // A server may close an idle kept-alive connection just as a request goes out on it
        // (llama-server did, a few times in a hundred requests): nothing was answered, so the
        // request is sent once more, on a new connection, and timed from there.
        if matches!(&result, Err(e) if e.contains("connection closed before message completed")) {
            record.resent = true;
            start = Instant::now();
            result = self.stream(endpoint, &body, start, &mut record).await;
        }
        if let Err(e) = result {
            record.error = Some(e);
        }
        record.e2e_ms = ms(start.elapsed());
        if let (None, Some(ttft)) = (&record.error, record.ttft_ms) {
            if record.output_tokens > 1 {
                record.tpot_ms = Some((record.e2e_ms - ttft) / (record.output_tokens - 1) as f64);
            }
        }
        record
    }

    async fn stream(
        &self,
        endpoint: Endpoint,
        body: &Value,
        start: Instant,
        record: &mut RequestRecord,
    ) -> Result<(), String> {
        let response = self.post(Self::path(endpoint), body).send().await.map_err(|e| error_chain(&e))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(format!("HTTP {}: {}", status.as_u16(), text.chars().take(200).collect::<String>()));
        }
        let mut bytes = response.bytes_stream();
        let mut sse = SseBuffer::default();
        let mut last_text: Option<Instant> = None;
        let mut chunks = 0u32;
        let mut usage: Option<Value> = None;
        let mut done = false;
        while let Some(piece) = bytes.next().await {
            let piece = piece.map_err(|e| format!("stream broke: {}", error_chain(&e)))?;
            let now = Instant::now();
            for data in sse.push(&piece) {
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let v: Value = serde_json::from_str(&data).map_err(|e| format!("bad SSE data ({e}): {data}"))?;
                if let Some(error) = v.get("error") {
                    return Err(format!("error event: {error}"));
                }
                if v.get("usage").is_some_and(|u| !u.is_null()) {
                    usage = v.get("usage").cloned();
                }
                let text = match endpoint {
                    Endpoint::Completions => v.pointer("/choices/0/text"),
                    Endpoint::Chat => v.pointer("/choices/0/delta/content"),
                };
                if text.and_then(Value::as_str).is_some_and(|t| !t.is_empty()) {
                    chunks += 1;
                    match last_text {
                        None => record.ttft_ms = Some(ms(now - start)),
                        Some(prev) => record.gaps_ms.push(ms(now - prev)),
                    }
                    last_text = Some(now);
                }
            }
        }
        if !done {
            return Err("the stream ended without [DONE]".into());
        }
        match usage {
            Some(u) => {
                let count = |key: &str| u[key].as_u64().map(|n| n as u32);
                record.prompt_tokens = count("prompt_tokens").unwrap_or(0);
                record.output_tokens = count("completion_tokens").unwrap_or(chunks);
            }
            None => {
                record.usage_missing = true;
                record.output_tokens = chunks;
            }
        }
        if record.output_tokens == 0 {
            return Err("no output tokens".into());
        }
        Ok(())
    }
}

/// Why a probe failed.
#[derive(Debug)]
pub enum ProbeError {
    Unreachable(String),
    Status(u16, String),
}

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeError::Unreachable(e) => write!(f, "cannot connect: {e}"),
            ProbeError::Status(s, body) => write!(f, "answered HTTP {s}: {body}"),
        }
    }
}

/// reqwest's errors hide their cause ("error sending request"); the chain names it.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Splits a byte stream into SSE `data` payloads, whatever the network's read boundaries.
#[derive(Default)]
pub struct SseBuffer {
    buf: Vec<u8>,
}

impl SseBuffer {
    /// Appends `bytes` and returns the data of every event now complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some((end, sep)) = find_blank_line(&self.buf) {
            let event: Vec<u8> = self.buf.drain(..end + sep).collect();
            let event = String::from_utf8_lossy(&event[..end]);
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                out.push(data.join("\n"));
            }
        }
        out
    }
}

/// The end of the first event: its length and the separator's (`\n\n` or `\r\n\r\n`).
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_specs_parse_with_options_and_refuse_what_they_cannot_mean() {
        let t: TargetSpec = "ls=http://127.0.0.1:8081,model=gemma,api-key=k".parse().unwrap();
        assert_eq!(t.name, "ls");
        assert_eq!(t.url, "http://127.0.0.1:8081");
        assert_eq!((t.model.as_deref(), t.api_key.as_deref()), (Some("gemma"), Some("k")));
        assert!("http://x".parse::<TargetSpec>().is_err());
        assert!("a=http://x,color=red".parse::<TargetSpec>().unwrap_err().contains("color=red"));
    }

    #[test]
    fn targets_take_the_base_url_with_or_without_v1_and_only_http() {
        let spec = |url: &str| TargetSpec { name: "a".into(), url: url.into(), model: None, api_key: None };
        let t = Target::new(&spec("http://127.0.0.1:8080/v1/"), "m", Duration::from_secs(1)).unwrap();
        assert_eq!(t.base, "http://127.0.0.1:8080");
        assert_eq!(t.model, "m");
        let e = Target::new(&spec("nonsense"), "m", Duration::from_secs(1)).err().unwrap().to_string();
        assert!(e.contains("'nonsense' is not a URL"), "{e}");
        let e = Target::new(&spec("https://x"), "m", Duration::from_secs(1)).err().unwrap().to_string();
        assert!(e.contains("only http://"), "{e}");
    }

    #[test]
    fn sse_events_are_found_across_read_boundaries() {
        let mut sse = SseBuffer::default();
        assert!(sse.push(b"data: {\"a\"").is_empty());
        assert_eq!(sse.push(b":1}\n\ndata: [DO"), vec!["{\"a\":1}"]);
        assert_eq!(sse.push(b"NE]\r\n\r\n: keep-alive\n\n"), vec!["[DONE]"]);
        assert!(sse.buf.is_empty());
    }
}
