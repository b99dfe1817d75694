//! llama-server's routes of an instance, answered by paddock in-process.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

use crate::common::{parse_sse, server, TestServer};

/// A route of instance `name` under llamactl's `/llama-cpp/{name}` prefix.
fn lc(name: &str, path: &str) -> String {
    format!("/llama-cpp/{name}{path}")
}

/// The error shape of these routes: OpenAI's `error` object plus paddock's top-level
/// `code` and `details`.
fn assert_error_shape(body: &Value) {
    assert!(body["code"].is_string(), "top-level code: {body}");
    assert!(body["details"].is_string(), "top-level details: {body}");
    assert!(body["error"].is_object(), "error object: {body}");
    assert!(body["error"]["message"].is_string(), "error.message: {body}");
    assert!(body["error"]["type"].is_string(), "error.type: {body}");
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array().unwrap_or_else(|| panic!("an array: {v}")).iter().map(|t| t.as_i64().expect("an integer")).collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap_or_else(|| panic!("an array: {v}")).iter().map(|x| x.as_f64().expect("a number")).collect()
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>() / (norm(a) * norm(b))
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).expect("valid base64")
}

/// `/metrics` of `name`, as metric name → value; checks the text format on the way.
async fn metrics(s: &TestServer, name: &str) -> (String, HashMap<String, f64>) {
    let resp = s.client.get(s.url(&lc(name, "/metrics"))).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let ctype = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ctype.starts_with("text/plain"), "{ctype}");
    let text = resp.text().await.unwrap();
    let mut values = HashMap::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let mut parts = line.split_whitespace();
        let (Some(name), Some(value), None) = (parts.next(), parts.next(), parts.next()) else {
            panic!("a metric line is `name value`: {line:?}");
        };
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("a number in {line:?}"));
        values.insert(name.to_string(), value);
    }
    (text, values)
}

/// A native non-stream completion that must succeed.
async fn complete(s: &TestServer, name: &str, body: Value) -> Value {
    let (status, resp) = s.post(&lc(name, "/completion"), body.clone()).await;
    assert_eq!(status, 200, "{body} -> {resp}");
    resp
}

/// POST that must fail with 400 in the llama routes' error shape; returns the body.
async fn bad_request(s: &TestServer, path: &str, body: Value) -> Value {
    let (status, resp) = s.post(path, body.clone()).await;
    assert_eq!(status, 400, "{path} {body} -> {resp}");
    assert_error_shape(&resp);
    resp
}

#[tokio::test(flavor = "multi_thread")]
async fn tokenize_and_detokenize_round_trip() {
    let s = server();
    let m = s.shared().await;
    let text = "Hello world";

    let (status, body) = s.post(&lc(m, "/tokenize"), json!({ "content": text })).await;
    assert_eq!(status, 200, "{body}");
    let tokens = ints(&body["tokens"]);
    assert!(!tokens.is_empty() && tokens.len() <= text.len(), "{body}");

    let (status, body) = s.post(&lc(m, "/detokenize"), json!({ "tokens": tokens })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["content"], text);

    // Pieces: the same ids, whose texts concatenate to the input.
    let (status, body) = s.post(&lc(m, "/tokenize"), json!({ "content": text, "with_pieces": true })).await;
    assert_eq!(status, 200, "{body}");
    let pieces = body["tokens"].as_array().unwrap();
    assert_eq!(pieces.len(), tokens.len(), "{body}");
    let ids: Vec<i64> = pieces.iter().map(|p| p["id"].as_i64().expect("id")).collect();
    assert_eq!(ids, tokens);
    let joined: String = pieces.iter().map(|p| p["piece"].as_str().expect("a text piece")).collect();
    assert_eq!(joined, text);

    // add_special prepends BOS, the token of props' bos_token.
    let (status, body) = s.post(&lc(m, "/tokenize"), json!({ "content": text, "add_special": true })).await;
    assert_eq!(status, 200, "{body}");
    let with_bos = ints(&body["tokens"]);
    assert_eq!(with_bos.len(), tokens.len() + 1, "{body}");
    assert_eq!(with_bos[1..], tokens[..]);
    let (_, props) = s.get(&lc(m, "/props")).await;
    let bos = props["bos_token"].as_str().expect("bos_token");
    let (status, body) = s.post(&lc(m, "/tokenize"), json!({ "content": bos })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(ints(&body["tokens"]), [with_bos[0]], "the BOS text parses as the BOS token");

    // The other prefixes answer the same.
    for prefix in [format!("/api/instances/{m}/proxy"), format!("/api/v1/instances/{m}/proxy")] {
        let (status, body) = s.post(&format!("{prefix}/tokenize"), json!({ "content": text })).await;
        assert_eq!(status, 200, "{prefix}: {body}");
        assert_eq!(ints(&body["tokens"]), tokens, "{prefix}");
        let (status, body) = s.post(&format!("{prefix}/detokenize"), json!({ "tokens": tokens })).await;
        assert_eq!(status, 200, "{prefix}: {body}");
        assert_eq!(body["content"], text, "{prefix}");
    }

    // Ids outside the vocabulary are refused, not rendered.
    for bad in [99_999_999, -1] {
        let body = bad_request(s, &lc(m, "/detokenize"), json!({ "tokens": [tokens[0], bad] })).await;
        assert_eq!(body["code"], "INVALID_TOKEN", "{body}");
        assert!(!body["details"].as_str().unwrap().is_empty(), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn native_completion_reports_llama_server_fields_and_reuses_the_prefix() {
    let s = server();
    let m = s.serial().await;
    let prompt = "Paddock native completion test. The three largest planets of the solar system are";
    let request = json!({ "prompt": prompt, "n_predict": 4, "temperature": 0 });

    let first = complete(s, m, request.clone()).await;
    assert!(first["content"].is_string(), "{first}");
    let predicted = first["tokens_predicted"].as_u64().expect("tokens_predicted");
    assert!((1..=4).contains(&predicted), "{first}");
    assert!(first["tokens_evaluated"].as_u64().expect("tokens_evaluated") > 0, "{first}");
    assert_eq!(first["stop"], true);
    let want_stop = if predicted == 4 { "limit" } else { "eos" };
    assert_eq!(first["stop_type"], want_stop, "{first}");
    assert_eq!(first["generation_settings"]["n_predict"], 4, "{first}");
    assert_eq!(first["timings"]["predicted_n"].as_u64(), Some(predicted), "{first}");
    assert_eq!(first["id_slot"], 0, "{first}");
    assert_eq!(first["prompt"], prompt, "{first}");
    assert_eq!(first["model"], m, "{first}");

    // Greedy: the same text again, and the prompt's KV is reused.
    let second = complete(s, m, request.clone()).await;
    assert_eq!(second["content"], first["content"], "greedy is deterministic on a 1-slot instance");
    assert_eq!(second["tokens_evaluated"], first["tokens_evaluated"]);
    let cached = second["timings"]["cache_n"].as_u64().expect("cache_n");
    assert!(cached > 0, "the prompt prefix was reused: {second}");
    assert_eq!(
        second["timings"]["prompt_n"].as_u64().unwrap() + cached,
        second["tokens_evaluated"].as_u64().unwrap(),
        "{second}"
    );

    // cache_prompt: false evaluates the whole prompt.
    let mut uncached = request.clone();
    uncached["cache_prompt"] = json!(false);
    let third = complete(s, m, uncached).await;
    assert_eq!(third["timings"]["cache_n"], 0, "{third}");
    assert_eq!(third["timings"]["prompt_n"], third["tokens_evaluated"], "{third}");
}

#[tokio::test(flavor = "multi_thread")]
async fn native_completion_stops_at_a_stop_word() {
    let s = server();
    let m = s.serial().await;
    let prompt = "Once upon a time, in a small village by the sea,";
    let full = complete(s, m, json!({ "prompt": prompt, "n_predict": 8, "temperature": 0 })).await;
    let text = full["content"].as_str().unwrap().to_string();
    // A word of the greedy text (not its first, so the cut text is not empty).
    let words: Vec<&str> = text.split_whitespace().collect();
    assert!(!words.is_empty(), "need some greedy text to cut: {text:?}");
    let stop = words.get(1).or(words.first()).unwrap().to_string();
    let expected = &text[..text.find(&stop).unwrap()];

    let body = complete(
        s,
        m,
        json!({ "prompt": prompt, "n_predict": 8, "temperature": 0, "stop": ["@@never@@", stop.clone()] }),
    )
    .await;
    assert_eq!(body["stop_type"], "word", "{body}");
    assert_eq!(body["stopping_word"], stop.as_str(), "{body}");
    let content = body["content"].as_str().unwrap();
    assert!(!content.contains(&stop), "the stop word is not part of the content: {body}");
    assert_eq!(content, expected, "greedy text up to the stop word: {body}");
    assert_eq!(body["generation_settings"]["stop"], json!(["@@never@@", stop]), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn native_stream_sends_tokens_then_the_full_response_without_done() {
    let s = server();
    let m = s.serial().await;
    let prompt = "The recipe for a simple tomato soup starts with";
    let events = s
        .stream(&lc(m, "/completion"), json!({ "prompt": prompt, "n_predict": 6, "temperature": 0, "stream": true }))
        .await;
    assert!(events.len() >= 2, "tokens and a final event: {events:?}");
    assert!(events.iter().all(|e| e != "[DONE]"), "llama-server's native stream has no [DONE]: {events:?}");
    let chunks: Vec<Value> = events.iter().map(|e| serde_json::from_str(e).expect("JSON event")).collect();
    let (last, tokens) = chunks.split_last().unwrap();
    let mut streamed = String::new();
    for c in tokens {
        assert_eq!(c["stop"], false, "{c}");
        streamed.push_str(c["content"].as_str().unwrap_or_else(|| panic!("content: {c}")));
    }
    assert_eq!(last["stop"], true, "{last}");
    assert!(last["timings"].is_object(), "{last}");
    assert!(["limit", "eos"].contains(&last["stop_type"].as_str().unwrap()), "{last}");
    let predicted = last["tokens_predicted"].as_u64().unwrap();
    assert!((1..=6).contains(&predicted), "{last}");
    assert_eq!(tokens.len() as u64, predicted, "one event per token: {events:?}");

    let whole = complete(s, m, json!({ "prompt": prompt, "n_predict": 6, "temperature": 0 })).await;
    assert_eq!(streamed, whole["content"].as_str().unwrap(), "stream and non-stream agree");
    assert_eq!(last["tokens_predicted"], whole["tokens_predicted"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn token_prompts_work_and_bad_requests_are_refused() {
    let s = server();
    let m = s.shared().await;
    let (status, body) = s.post(&lc(m, "/tokenize"), json!({ "content": "Water boils at", "add_special": true })).await;
    assert_eq!(status, 200, "{body}");
    let ids = ints(&body["tokens"]);
    let body = complete(s, m, json!({ "prompt": ids, "n_predict": 2, "temperature": 0 })).await;
    assert_eq!(body["tokens_evaluated"].as_u64(), Some(ids.len() as u64), "the ids are the prompt: {body}");
    assert!(body["tokens_predicted"].as_u64().unwrap() >= 1, "{body}");
    assert!(body["prompt"].as_str().unwrap().contains("Water boils at"), "the prompt, detokenized: {body}");

    let path = lc(m, "/completion");
    let body = bad_request(s, &path, json!({ "prompt": [ids[0], 99_999_999], "n_predict": 2 })).await;
    assert_eq!(body["code"], "INVALID_TOKEN", "{body}");
    bad_request(s, &path, json!({ "prompt": [ids[0], -3], "n_predict": 2 })).await;
    let body = bad_request(s, &path, json!({ "prompt": [], "n_predict": 2 })).await;
    assert_eq!(body["code"], "EMPTY_PROMPT", "{body}");
    for n in [-5, 0, 2_000_000] {
        let body = bad_request(s, &path, json!({ "prompt": "Hi", "n_predict": n })).await;
        assert_eq!(body["error"]["param"], "n_predict", "{body}");
    }
    let body = bad_request(s, &path, json!({ "prompt": "Hi", "n_predict": 2, "id_slot": 99 })).await;
    assert_eq!(body["error"]["param"], "id_slot", "{body}");
    let body = bad_request(s, &path, json!({ "prompt": "Hi", "n_predict": 2, "n_probs": 1000 })).await;
    assert_eq!(body["error"]["param"], "n_probs", "{body}");
}

/// An empty text prompt is refused like an empty list of ids, though the tokenizer's BOS makes
/// its token list non-empty: there is nothing to continue.
#[tokio::test(flavor = "multi_thread")]
async fn empty_text_prompt_is_refused() {
    let s = server();
    let m = s.shared().await;
    let body = bad_request(s, &lc(m, "/completion"), json!({ "prompt": "", "n_predict": 2 })).await;
    assert_eq!(body["code"], "EMPTY_PROMPT", "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn n_probs_gives_sorted_top_logprobs_per_token() {
    let s = server();
    let m = s.shared().await;
    let body = complete(
        s,
        m,
        json!({ "prompt": "The first three letters of the alphabet are", "n_predict": 3, "temperature": 0, "n_probs": 3 }),
    )
    .await;
    let predicted = body["tokens_predicted"].as_u64().unwrap() as usize;
    let probs =
        body["completion_probabilities"].as_array().unwrap_or_else(|| panic!("completion_probabilities: {body}"));
    assert_eq!(probs.len(), predicted, "one entry per generated token: {body}");
    let mut bytes = Vec::new();
    for p in probs {
        assert!(p["token"].is_string(), "{p}");
        let b: Vec<u8> = ints(&p["bytes"]).into_iter().map(|b| u8::try_from(b).expect("a byte")).collect();
        bytes.extend_from_slice(&b);
        let logprob = p["logprob"].as_f64().expect("logprob");
        assert!(logprob <= 0.0, "{p}");
        let top = p["top_logprobs"].as_array().expect("top_logprobs");
        assert_eq!(top.len(), 3, "{p}");
        let lps: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().expect("top logprob")).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]), "sorted by logprob, most likely first: {p}");
        assert!(lps.iter().all(|&lp| lp <= 0.0), "{p}");
        for t in top {
            assert!(t["id"].is_i64() && t["token"].is_string() && t["bytes"].is_array(), "{t}");
        }
        // Greedy picks the most likely token.
        assert!((logprob - lps[0]).abs() < 1e-6, "the chosen token is the top one: {p}");
        assert_eq!(p["token"], top[0]["token"], "{p}");
    }
    assert_eq!(String::from_utf8_lossy(&bytes), body["content"].as_str().unwrap(), "the tokens' bytes are the content");

    // Streamed: each token event carries its own entry.
    let events = s
        .stream(
            &lc(m, "/completion"),
            json!({ "prompt": "One, two, three,", "n_predict": 2, "temperature": 0, "n_probs": 2, "stream": true }),
        )
        .await;
    let chunks: Vec<Value> = events.iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let (_, tokens) = chunks.split_last().unwrap();
    assert!(!tokens.is_empty());
    for c in tokens {
        let probs = c["completion_probabilities"].as_array().unwrap_or_else(|| panic!("{c}"));
        assert_eq!(probs.len(), 1, "{c}");
        assert_eq!(probs[0]["top_logprobs"].as_array().unwrap().len(), 2, "{c}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn grammars_and_json_schemas_constrain_the_output() {
    let s = server();
    let m = s.shared().await;
    let path = lc(m, "/completion");
    let body = complete(
        s,
        m,
        json!({ "prompt": "Is the sky blue? Answer:", "n_predict": 8, "temperature": 0, "grammar": "root ::= (\"yes\" | \"no\")" }),
    )
    .await;
    let content = body["content"].as_str().unwrap();
    assert!(content == "yes" || content == "no", "{body}");
    assert_eq!(body["stop_type"], "eos", "the grammar ends the output: {body}");

    let body = bad_request(s, &path, json!({ "prompt": "x", "n_predict": 2, "grammar": "root ::= (" })).await;
    assert_eq!(body["code"], "INVALID_GRAMMAR", "{body}");

    let schema = json!({ "type": "object", "properties": { "ok": { "type": "boolean" } }, "required": ["ok"], "additionalProperties": false });
    let body = complete(
        s,
        m,
        json!({ "prompt": "Reply in JSON. Is water wet?\n", "n_predict": 40, "temperature": 0, "json_schema": schema }),
    )
    .await;
    assert_eq!(body["stop_type"], "eos", "a tight schema finishes well within 40 tokens: {body}");
    let content = body["content"].as_str().unwrap();
    let parsed: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("JSON output ({e}): {content:?}"));
    let object = parsed.as_object().unwrap_or_else(|| panic!("an object: {parsed}"));
    assert!(object["ok"].is_boolean() && object.len() == 1, "{parsed}");

    let body = bad_request(s, &path, json!({ "prompt": "x", "n_predict": 2, "json_schema": { "type": 5 } })).await;
    assert_eq!(body["error"]["param"], "json_schema", "{body}");
    let body = bad_request(
        s,
        &path,
        json!({ "prompt": "x", "n_predict": 2, "grammar": "root ::= \"a\"", "json_schema": { "type": "object" } }),
    )
    .await;
    assert_eq!(body["error"]["param"], "grammar", "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn props_and_slots_describe_the_instance() {
    let s = server();
    let m = s.shared().await;
    let (status, props) = s.get(&lc(m, "/props")).await;
    assert_eq!(status, 200, "{props}");
    assert_eq!(props["total_slots"], 4, "{props}");
    assert_eq!(props["n_ctx"], 2048, "{props}");
    assert!(props["model_path"].as_str().unwrap().ends_with(".gguf"), "{props}");
    assert!(props["chat_template"].as_str().is_some_and(|t| !t.is_empty()), "{props}");
    assert_eq!(props["default_generation_settings"]["n_ctx"], 512, "{props}");
    let temperature = props["default_generation_settings"]["params"]["temperature"].as_f64().unwrap();
    assert!((temperature - 0.8).abs() < 1e-6, "llama-server's default temperature: {props}");
    assert_eq!(props["embeddings"], true, "{props}");

    let (status, slots) = s.get(&lc(m, "/slots")).await;
    assert_eq!(status, 200, "{slots}");
    let slots = slots.as_array().unwrap();
    assert_eq!(slots.len(), 4);
    for (i, slot) in slots.iter().enumerate() {
        assert_eq!(slot["id"], i, "{slot}");
        assert_eq!(slot["n_ctx"], 512, "{slot}");
        assert!(slot["is_processing"].is_boolean(), "{slot}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn slots_show_a_running_request() {
    let s = server();
    let name = "slots-probe";
    s.running_instance(name, json!({ "context_size": 1024, "parallel": 1, "threads": 2 })).await;
    let long = json!({ "prompt": "Write a long story about a lighthouse keeper.", "n_predict": 500, "temperature": 1.0,
                      "ignore_eos": true, "stream": true });
    let resp = s.client.post(s.url(&lc(name, "/completion"))).json(&long).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut stream = resp.bytes_stream();
    let chunk = stream.next().await.unwrap().unwrap();
    let first: Value = serde_json::from_str(&parse_sse(std::str::from_utf8(&chunk).unwrap())[0]).unwrap();
    assert_eq!(first["stop"], false, "{first}");

    let (status, slots) = s.get(&lc(name, "/slots")).await;
    assert_eq!(status, 200, "{slots}");
    let slot = &slots[0];
    assert_eq!(slots.as_array().unwrap().len(), 1, "{slots}");
    assert_eq!(slot["is_processing"], true, "{slot}");
    assert!(slot["next_token"]["n_decoded"].as_u64().unwrap() >= 1, "{slot}");
    assert!(slot["n_prompt_tokens"].as_u64().unwrap() > 0, "{slot}");
    assert!(slot["prompt"].as_str().unwrap().contains("lighthouse keeper"), "{slot}");
    assert!((temperature_of(slot) - 1.0).abs() < 1e-6, "the running request's settings: {slot}");

    // The dropped client frees the slot.
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, slots) = s.get(&lc(name, "/slots")).await;
        if slots[0]["is_processing"] == false {
            assert!(slots[0]["n_cached"].as_u64().unwrap() > 0, "the KV stays as a cache: {slots}");
            break;
        }
        assert!(Instant::now() < deadline, "the slot stayed busy after the client left: {slots}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, inst) = s.get(&format!("/api/instances/{name}")).await;
    assert!(
        inst["stats"]["generated_tokens_total"].as_u64().unwrap() < 500,
        "the dropped stream was cancelled: {inst}"
    );
    let (status, body) = s.post(&format!("/api/instances/{name}/stop"), json!({})).await;
    assert_eq!(status, 200, "{body}");
}

fn temperature_of(slot: &Value) -> f64 {
    slot["params"]["temperature"].as_f64().unwrap_or_else(|| panic!("params.temperature: {slot}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_tokens() {
    let s = server();
    let m = s.shared().await;
    let (text, before) = metrics(s, m).await;
    assert!(text.contains("# TYPE llamacpp:prompt_tokens_total counter"), "{text}");
    assert!(text.contains("# TYPE llamacpp:tokens_predicted_total counter"), "{text}");
    assert!(text.contains("# TYPE llamacpp:kv_cache_usage_ratio gauge"), "{text}");
    for name in ["llamacpp:requests_processing", "llamacpp:kv_cache_usage_ratio", "llamacpp:tokens_predicted_total"] {
        assert!(before.contains_key(name), "{name} in {text}");
    }
    let ratio = before["llamacpp:kv_cache_usage_ratio"];
    assert!((0.0..=1.0).contains(&ratio), "{text}");
    assert!(before["llamacpp:requests_processing"] >= 0.0, "{text}");

    let body = complete(s, m, json!({ "prompt": "Metrics test: the moon is", "n_predict": 3 })).await;
    let predicted = body["tokens_predicted"].as_f64().unwrap();
    assert!(predicted >= 1.0);
    let (_, after) = metrics(s, m).await;
    let grown = after["llamacpp:tokens_predicted_total"] - before["llamacpp:tokens_predicted_total"];
    assert!(grown >= predicted, "tokens_predicted_total grew by {grown}, at least this request's {predicted}");
    assert!(
        after["llamacpp:prompt_tokens_total"] > before["llamacpp:prompt_tokens_total"]
            || body["timings"]["prompt_n"] == 0
    );
    assert!(after["llamacpp:n_decode_total"] > before["llamacpp:n_decode_total"]);
    assert!((0.0..=1.0).contains(&after["llamacpp:kv_cache_usage_ratio"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn embeddings_native_and_openai() {
    let s = server();
    let m = s.shared().await;
    let (status, body) = s.post(&lc(m, "/embedding"), json!({ "content": "hello" })).await;
    assert_eq!(status, 200, "{body}");
    let items = body.as_array().unwrap_or_else(|| panic!("a list: {body}"));
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["index"], 0);
    let outer = items[0]["embedding"].as_array().unwrap();
    assert_eq!(outer.len(), 1, "llama-server nests the pooled vector: {}", items[0]);
    let unit = floats(&outer[0]);
    assert!(unit.len() > 100, "{}", unit.len());
    assert!((norm(&unit) - 1.0).abs() < 1e-3, "normalized by default: {}", norm(&unit));

    let (status, body) = s.post(&lc(m, "/embedding"), json!({ "content": "hello", "embd_normalize": -1 })).await;
    assert_eq!(status, 200, "{body}");
    let raw = floats(&body[0]["embedding"][0]);
    assert_eq!(raw.len(), unit.len());
    assert!((norm(&raw) - 1.0).abs() > 1e-3, "not normalized: norm {}", norm(&raw));
    assert!(cosine(&raw, &unit) > 0.999, "the same direction: {}", cosine(&raw, &unit));
    bad_request(s, &lc(m, "/embedding"), json!({ "content": "hello", "embd_normalize": 7 })).await;

    let input = ["The cat sat on the mat.", "A cat is sitting on a mat.", "Quarterly revenue grew by eight percent."];
    let (status, body) = s.post("/v1/embeddings", json!({ "model": m, "input": input })).await;
    assert_eq!(status, 200, "{body}");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 3, "{body}");
    let vectors: Vec<Vec<f64>> = data.iter().map(|d| floats(&d["embedding"])).collect();
    for (i, (d, v)) in data.iter().zip(&vectors).enumerate() {
        assert_eq!(d["index"], i);
        assert_eq!(v.len(), unit.len());
    }
    let (similar, unrelated) = (cosine(&vectors[0], &vectors[1]), cosine(&vectors[0], &vectors[2]));
    assert!(similar > unrelated, "cats are closer to cats ({similar}) than to revenue ({unrelated})");

    let (status, body) =
        s.post("/v1/embeddings", json!({ "model": m, "input": input[0], "encoding_format": "base64" })).await;
    assert_eq!(status, 200, "{body}");
    let encoded = body["data"][0]["embedding"].as_str().unwrap_or_else(|| panic!("a base64 string: {body}"));
    let dim = unit.len();
    assert_eq!(encoded.len(), 4 * (4 * dim).div_ceil(3), "base64 of {dim} f32s");
    let bytes = base64_decode(encoded);
    assert_eq!(bytes.len(), 4 * dim);
    let decoded: Vec<f64> = bytes.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect();
    assert!((norm(&decoded) - 1.0).abs() < 1e-3, "{}", norm(&decoded));
    assert!(cosine(&decoded, &vectors[0]) > 0.999, "the same vector as the float answer");

    // Refusals: an instance without embeddings, and no input.
    let serial = s.serial().await;
    let body = bad_request(s, "/v1/embeddings", json!({ "model": serial, "input": "hello" })).await;
    assert!(body["error"]["message"].as_str().unwrap().contains("embeddings"), "{body}");
    let body = bad_request(s, &lc(serial, "/embedding"), json!({ "content": "hello" })).await;
    assert!(body["error"]["message"].as_str().unwrap().contains("embeddings"), "{body}");
    bad_request(s, "/v1/embeddings", json!({ "model": m, "input": [] })).await;
    bad_request(s, &lc(m, "/embedding"), json!({ "content": [] })).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn infill_needs_fim_tokens() {
    let s = server();
    let m = s.shared().await;
    let body = bad_request(
        s,
        &lc(m, "/infill"),
        json!({ "input_prefix": "def add(a, b):\n    ", "input_suffix": "\n", "n_predict": 4 }),
    )
    .await;
    assert!(body["error"]["message"].as_str().unwrap().contains("fill-in-the-middle"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn apply_template_renders_the_chat_prompt() {
    let s = server();
    let m = s.shared().await;
    let (status, body) = s
        .post(&lc(m, "/apply-template"), json!({ "messages": [{ "role": "user", "content": "hi there, paddock" }] }))
        .await;
    assert_eq!(status, 200, "{body}");
    let prompt = body["prompt"].as_str().unwrap_or_else(|| panic!("a prompt: {body}"));
    assert!(prompt.contains("hi there, paddock"), "{prompt:?}");
    assert!(prompt.len() > "hi there, paddock".len(), "the template adds its markup: {prompt:?}");
    bad_request(s, &lc(m, "/apply-template"), json!({ "messages": [] })).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn slot_state_saves_erases_and_restores() {
    let s = server();
    let name = "slot-files";
    s.running_instance(name, json!({ "context_size": 512, "parallel": 1, "threads": 2 })).await;
    let request = json!({ "prompt": "Slot file test: a list of the seven days of the week: Monday,", "n_predict": 4, "temperature": 0 });
    let first = complete(s, name, request.clone()).await;
    let evaluated = first["tokens_evaluated"].as_u64().unwrap();
    let slot_path = |action: &str| lc(name, &format!("/slots/0?action={action}"));

    let (status, saved) = s.post(&slot_path("save"), json!({ "filename": "s1.bin" })).await;
    assert_eq!(status, 200, "{saved}");
    assert_eq!(saved["id_slot"], 0, "{saved}");
    assert_eq!(saved["filename"], "s1.bin", "{saved}");
    let n_saved = saved["n_saved"].as_u64().unwrap();
    assert!(n_saved >= evaluated, "the prompt and output were saved: {saved} ({evaluated} prompt tokens)");
    assert!(saved["n_written"].as_u64().unwrap() > 0, "{saved}");

    let (status, erased) = s.post(&slot_path("erase"), json!({})).await;
    assert_eq!(status, 200, "{erased}");
    assert_eq!(erased["n_erased"].as_u64(), Some(n_saved), "{erased}");
    let (_, slots) = s.get(&lc(name, "/slots")).await;
    assert_eq!(slots[0]["n_cached"], 0, "{slots}");

    let (status, restored) = s.post(&slot_path("restore"), json!({ "filename": "s1.bin" })).await;
    assert_eq!(status, 200, "{restored}");
    assert_eq!(restored["n_restored"].as_u64(), Some(n_saved), "{restored}");
    assert!(restored["n_read"].as_u64().unwrap() > 0, "{restored}");
    let (_, slots) = s.get(&lc(name, "/slots")).await;
    assert_eq!(slots[0]["n_cached"].as_u64(), Some(n_saved), "{slots}");

    let again = complete(s, name, request.clone()).await;
    let cached = again["timings"]["cache_n"].as_u64().unwrap();
    assert!(cached > 0, "the restored KV serves the prompt: {again}");
    assert_eq!(again["tokens_evaluated"].as_u64(), Some(evaluated));

    // The llamactl proxy prefix reads the slot id, not the instance name.
    let (status, erased) = s.post(&format!("/api/instances/{name}/proxy/slots/0?action=erase"), json!({})).await;
    assert_eq!(status, 200, "{erased}");
    assert!(erased["n_erased"].as_u64().unwrap() > 0, "{erased}");

    // File names name one file of the slot directory.
    for bad in ["../x.bin", "a/b.bin", ".hidden", "", "..", "a\\b.bin"] {
        for action in ["save", "restore"] {
            let body = bad_request(s, &slot_path(action), json!({ "filename": bad })).await;
            assert_eq!(body["error"]["param"], "filename", "{action} {bad:?}: {body}");
        }
    }
    bad_request(s, &slot_path("save"), json!({})).await;
    let body = bad_request(s, &slot_path("restore"), json!({ "filename": "never-saved.bin" })).await;
    assert_eq!(body["code"], "SLOT_FILE", "{body}");
    let body = bad_request(s, &slot_path("bogus"), json!({ "filename": "s1.bin" })).await;
    assert_eq!(body["error"]["param"], "action", "{body}");
    let body = bad_request(s, &lc(name, "/slots/7?action=erase"), json!({})).await;
    assert_eq!(body["code"], "INVALID_SLOT", "{body}");
    bad_request(s, &lc(name, "/slots/zero?action=erase"), json!({})).await;

    let (status, body) = s.post(&format!("/api/instances/{name}/stop"), json!({})).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_routes_under_the_prefix_are_pinned_to_the_instance() {
    let s = server();
    let m = s.shared().await;
    let (status, body) = s
        .post(
            &lc(m, "/v1/chat/completions"),
            json!({ "model": "anything", "messages": [{ "role": "user", "content": "Hi" }], "max_tokens": 2 }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], m, "{body}");
    assert!(body["choices"][0]["message"]["content"].is_string(), "{body}");

    let (status, body) = s
        .post(
            &format!("/api/instances/{m}/proxy/v1/completions"),
            json!({ "model": "nope", "prompt": "Hi", "max_tokens": 1 }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], m, "{body}");

    let (status, body) = s.get(&lc(m, "/v1/models")).await;
    assert_eq!(status, 200, "{body}");
    let ids: Vec<&str> = body["data"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [m], "only the pinned instance: {body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_of_known_and_unknown_instances() {
    let s = server();
    let m = s.shared().await;
    let (status, body) = s.get(&lc(m, "/health")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({ "status": "ok" }));
    let (status, body) = s.get(&format!("/api/v1/instances/{m}/proxy/health")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ok");

    let (status, body) = s.get(&lc("no-such-instance", "/health")).await;
    assert_eq!(status, 404, "{body}");
    assert_error_shape(&body);
    let (status, body) = s.get("/api/instances/no-such-instance/proxy/health").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = s.post(&lc("no-such-instance", "/tokenize"), json!({ "content": "x" })).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = s.get(&lc(m, "/no-such-route")).await;
    assert_eq!(status, 404, "{body}");
}
