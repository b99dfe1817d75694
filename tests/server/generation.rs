//! Generation through the OpenAI-compatible routes: streaming, batching, cancellation, limits.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};

use crate::common::{greedy, parse_sse, server};

const PROMPTS: [&str; 4] = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village,",
    "The three primary colors are",
];

#[tokio::test]
async fn chat_completion_non_streaming() {
    let s = server();
    let model = s.shared().await;
    let (status, body) = s
        .post(
            "/v1/chat/completions",
            json!({ "model": model, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}], "max_tokens": 5 }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], model);
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(choice["message"]["content"].is_string());
    assert!(["stop", "length"].contains(&choice["finish_reason"].as_str().unwrap()));
    let usage = &body["usage"];
    let (p, c) = (usage["prompt_tokens"].as_u64().unwrap(), usage["completion_tokens"].as_u64().unwrap());
    assert!(p > 10, "ChatML-rendered prompt has more than 10 tokens: {usage}");
    assert!((1..=5).contains(&c), "{usage}");
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), p + c);
    if c < 5 {
        assert_eq!(choice["finish_reason"], "stop");
    } else {
        assert_eq!(choice["finish_reason"], "length");
    }
}

#[tokio::test]
async fn chat_completion_streaming_with_usage() {
    let s = server();
    let model = s.serial().await;
    let events = s
        .stream(
            "/v1/chat/completions",
            json!({ "model": model, "messages": [{"role": "user", "content": "Count: one, two,"}], "max_tokens": 6,
                    "temperature": 0, "stream": true, "stream_options": {"include_usage": true} }),
        )
        .await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"].as_array().unwrap().len(), 0, "usage comes in its own chunk");
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 6);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?.get("delta")?.get("content")?.as_str().map(String::from))
        .collect();

    let (status, whole) = s
        .post(
            "/v1/chat/completions",
            json!({ "model": model, "messages": [{"role": "user", "content": "Count: one, two,"}], "max_tokens": 6, "temperature": 0 }),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(streamed, whole["choices"][0]["message"]["content"].as_str().unwrap(), "stream and non-stream agree");
}

#[tokio::test]
async fn greedy_output_is_reproducible() {
    let s = server();
    let model = s.serial().await;
    let (a, _) = greedy(s, model, PROMPTS[0], 12).await;
    let (b, _) = greedy(s, model, PROMPTS[0], 12).await;
    assert!(!a.is_empty());
    assert_eq!(a, b);
}

/// Tokens of a greedy streamed completion, one SSE chunk per token (ASCII text, no stop
/// strings: nothing is held back, so chunks and tokens coincide).
async fn greedy_tokens(s: &crate::common::TestServer, model: &str, prompt: &str, n: u32) -> Vec<String> {
    let events = s
        .stream(
            "/v1/completions",
            json!({ "model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": true }),
        )
        .await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"].as_str().unwrap().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Four concurrent requests are all answered, were decoded together, and each batched greedy
/// completion starts with the same tokens as when generated alone. llama.cpp does not promise
/// bit-identical logits across batch compositions: with the unified KV pool (llama-server's
/// default) one prompt in six turned " red, blue, and" into " red, blue and" at the 4th token,
/// so the first 3 tokens are compared, as llama-server would pass; a sequence mixed up with
/// another shows at once as another prompt's words.
#[tokio::test]
async fn concurrent_requests_are_batched_without_mixing_sequences() {
    let s = server();
    let model = s.shared().await;
    let mut alone = Vec::new();
    for p in PROMPTS {
        alone.push(greedy_tokens(s, model, p, 8).await);
    }
    let before = s.get(&format!("/api/instances/{model}")).await.1["stats"]["decode_calls_total"].as_u64().unwrap();
    let together = futures::future::join_all(PROMPTS.iter().map(|p| greedy_tokens(s, model, p, 8))).await;
    let (_, inst) = s.get(&format!("/api/instances/{model}")).await;
    assert!(inst["stats"]["max_batch_sequences"].as_u64().unwrap() > 1, "requests shared decode steps: {inst}");
    let after = inst["stats"]["decode_calls_total"].as_u64().unwrap();
    assert!(after - before < 4 * 9, "4 x 8 tokens took fewer decode calls than one by one: {}", after - before);
    for ((solo, batched), prompt) in alone.iter().zip(&together).zip(PROMPTS) {
        assert!(solo.len() >= 3 && batched.len() >= 3, "{prompt:?}: {solo:?} / {batched:?}");
        assert_eq!(batched[..3], solo[..3], "{prompt:?}: batched {batched:?} vs alone {solo:?}");
    }
}

#[tokio::test]
async fn stop_strings_cut_exactly() {
    let s = server();
    let model = s.serial().await;
    let (full, _) = greedy(s, model, PROMPTS[2], 24).await;
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 12, "need some text to cut: {full:?}");
    // A stop string from the middle of the greedy text, likely spanning a token boundary.
    let stop: String = chars[6..10].iter().collect();
    let expected = &full[..full.find(&stop).unwrap()];
    for stream in [false, true] {
        let body = json!({ "model": model, "prompt": PROMPTS[2], "max_tokens": 24, "temperature": 0, "stop": [stop.clone(), "@@never@@"], "stream": stream });
        let text = if stream {
            let events = s.stream("/v1/completions", body).await;
            assert_eq!(events.last().unwrap(), "[DONE]");
            let chunks: Vec<Value> =
                events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
            assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "stop");
            chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap().to_string()).collect::<String>()
        } else {
            let (status, body) = s.post("/v1/completions", body).await;
            assert_eq!(status, 200);
            assert_eq!(body["choices"][0]["finish_reason"], "stop");
            body["choices"][0]["text"].as_str().unwrap().to_string()
        };
        assert_eq!(text, expected, "stream={stream}, stop={stop:?}, full={full:?}");
    }
}

#[tokio::test]
async fn utf8_survives_streaming() {
    let s = server();
    let model = s.serial().await;
    let prompt = "日本の首都は東京です。東京は";
    let (whole, _) = greedy(s, model, prompt, 24).await;
    assert!(!whole.is_ascii(), "the model continues in Japanese: {whole:?}");
    assert!(!whole.contains('\u{FFFD}'), "no broken characters: {whole:?}");
    let events = s
        .stream(
            "/v1/completions",
            json!({ "model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": true }),
        )
        .await;
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    assert!(!streamed.contains('\u{FFFD}'));
    assert_eq!(streamed, whole);
}

#[tokio::test]
async fn prompt_over_the_context_is_a_400_with_both_numbers() {
    let s = server();
    let model = s.shared().await;
    let prompt = "word ".repeat(600);
    let (status, body) = s.post("/v1/completions", json!({ "model": model, "prompt": prompt, "max_tokens": 4 })).await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    assert!(message.contains("512") && message.contains("60"), "both numbers: {message}");
    // The instance is unharmed.
    let (text, _) = greedy(s, model, PROMPTS[0], 2).await;
    assert!(!text.is_empty());
}

#[tokio::test]
async fn openai_errors_for_unknown_model_and_bad_parameters() {
    let s = server();
    let (status, body) = s
        .post("/v1/chat/completions", json!({ "model": "nope", "messages": [{"role": "user", "content": "hi"}] }))
        .await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["code"], "model_not_found");
    assert_eq!(body["error"]["param"], "model");
    assert!(body["error"]["message"].as_str().unwrap().contains("nope"));

    let model = s.shared().await;
    let (status, body) = s.post("/v1/completions", json!({ "model": model, "prompt": "x", "temperature": -1 })).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "temperature");
    let (status, body) =
        s.post("/v1/completions", json!({ "model": model, "prompt": [999999999], "max_tokens": 1 })).await;
    assert_eq!(status, 400, "token outside the vocabulary never reaches llama.cpp: {body}");
    assert_eq!(body["error"]["code"], "invalid_token");
    let (status, body) = s.post("/v1/chat/completions", json!({ "model": model })).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("messages"));
}

#[tokio::test]
async fn models_lists_every_instance() {
    let s = server();
    let model = s.shared().await;
    let (status, body) = s.get("/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(body["object"], "list");
    let entry = body["data"].as_array().unwrap().iter().find(|m| m["id"] == model).cloned().unwrap();
    assert_eq!(entry["object"], "model");
    assert_eq!(entry["owned_by"], "paddock");
}

#[tokio::test]
async fn a_stopped_instance_without_on_demand_start_answers_503() {
    let s = server();
    let (status, _) = s
        .post(
            "/api/instances",
            json!({ "name": "idle", "model_path": crate::common::model_path(), "on_demand_start": false }),
        )
        .await;
    assert_eq!(status, 201);
    let (status, body) = s.post("/v1/completions", json!({ "model": "idle", "prompt": "x" })).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["type"], "server_error");
}

/// A client that drops its stream frees the slot at the next step; with one slot, the next
/// request is served without the dropped one running to its max_tokens. A full queue is a 503.
#[tokio::test]
async fn dropped_stream_frees_the_slot_and_a_full_queue_is_refused() {
    let s = server();
    let name = "solo";
    s.running_instance(name, json!({ "context_size": 1024, "parallel": 1, "queue_size": 1, "threads": 2 })).await;
    let long = json!({ "model": name, "prompt": PROMPTS[2], "max_tokens": 900, "stream": true, "temperature": 1.0 });

    let first = s.client.post(s.url("/v1/completions")).json(&long).send().await.unwrap();
    assert_eq!(first.status().as_u16(), 200);
    let mut first_body = first.bytes_stream();
    let chunk = first_body.next().await.unwrap().unwrap();
    assert!(!parse_sse(std::str::from_utf8(&chunk).unwrap()).is_empty());

    // The slot is busy; one more may wait; the next is refused before any streaming.
    let waiting = s.client.post(s.url("/v1/completions")).json(&long).send();
    let waiting = tokio::spawn(waiting);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = s.post("/v1/completions", json!({ "model": name, "prompt": "x", "max_tokens": 1 })).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "overloaded");

    // Drop both long streams; a short request is then served.
    drop(first_body);
    let waiting = waiting.await.unwrap().unwrap();
    assert_eq!(waiting.status().as_u16(), 200);
    drop(waiting);
    // The server notices a gone client when its next token cannot be written.
    s.wait_idle(name).await;
    let (text, body) = greedy(s, name, PROMPTS[0], 3).await;
    assert_eq!(body["usage"]["completion_tokens"], 3, "{text:?}");
    let (_, inst) = s.get(&format!("/api/instances/{name}")).await;
    let generated = inst["stats"]["generated_tokens_total"].as_u64().unwrap();
    assert!(generated < 900, "the dropped streams did not run to max_tokens: {generated} tokens generated");
    assert_eq!(inst["stats"]["slots_busy"], 0);
    // The engine thread's own CPU time is measured (Linux), and finished requests give a speed.
    assert!(inst["stats"]["cpu_time_ms"].as_u64().unwrap() > 0, "{inst}");
    let cpu = inst["stats"]["cpu_usage"].as_f64().unwrap();
    assert!(cpu > 0.0 && cpu <= 100.0, "{inst}");
    assert!(inst["stats"]["tokens_per_second"].as_f64().unwrap() > 0.0, "{inst}");
}

/// A decode step is one physical batch (`ubatch_size`, llama-server's `-ub`): a prompt is
/// computed in steps of that many tokens, and sampled from as soon as its last step is done
/// rather than after the other prompts of a larger batch. A physical batch too small to hold
/// one token per slot is refused by name.
#[tokio::test]
async fn prompts_are_decoded_one_physical_batch_per_step() {
    let s = server();
    let name = "ubatch";
    let inst =
        s.running_instance(name, json!({ "context_size": 512, "parallel": 2, "threads": 2, "ubatch_size": 4 })).await;
    assert_eq!(inst["options"]["ubatch_size"], 4, "{inst}");
    assert_eq!(inst["model"]["n_ubatch"], 4, "{inst}");
    let calls =
        || async { s.get(&format!("/api/instances/{name}")).await.1["stats"]["decode_calls_total"].as_u64().unwrap() };
    let before = calls().await;
    let (_, body) = greedy(s, name, PROMPTS[2], 1).await;
    let prompt = body["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 4, "the prompt spans several steps: {body}");
    assert_eq!(calls().await - before, prompt.div_ceil(4), "{prompt} prompt tokens, 4 per step");

    // llama-server's spelling, in `extra`.
    let body = json!({ "model_path": crate::common::model_path(), "options": { "parallel": 4 }, "extra": { "ub": 2 } });
    let (status, body) = s.post("/api/instances/ub.small", body).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "INVALID_OPTIONS");
    assert!(body["details"].as_str().unwrap().contains("ubatch_size"), "{body}");
}

/// The second request with the same long prefix decodes only the new part.
#[tokio::test]
async fn prompt_prefix_is_reused() {
    let s = server();
    let name = "prefix";
    s.running_instance(name, json!({ "context_size": 1024, "parallel": 2, "threads": 2 })).await;
    let system = "You are a careful assistant. ".repeat(12);
    let ask = |q: &str| {
        json!({ "model": name, "max_tokens": 2, "temperature": 0,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}] })
    };
    let (status, first) = s.post("/v1/chat/completions", ask("What is two plus two?")).await;
    assert_eq!(status, 200);
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let (status, second) = s.post("/v1/chat/completions", ask("Name a color.")).await;
    assert_eq!(status, 200);
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    let prompt = second["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(cached > 60 && cached < prompt, "shared system prompt reused: {cached} of {prompt}");
    assert_eq!(second["timings"]["prompt_n"].as_u64().unwrap(), prompt - cached);
}
