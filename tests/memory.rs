//! The memory budget, against the real binary's resident memory: the estimates match what
//! llama.cpp really holds, instances of one GGUF share its weights, parked instances come back
//! without reloading and with their cached prompts, and a start that cannot fit is refused
//! with the arithmetic.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

mod common;

use common::process::Paddock;

const MIB: f64 = (1u64 << 20) as f64;

/// A config with the rate limits off (tests poll faster than people) and `extra` lines.
async fn start(data: &Path, extra: &str) -> Paddock {
    let yaml = format!("rate_limits: {{management: null, heavy: null}}\n{extra}");
    std::fs::write(data.join("paddock.yaml"), yaml).unwrap();
    Paddock::start(data, &[]).await
}

async fn create(p: &Paddock, name: &str, model: &Path, options: Value) -> Value {
    let body = json!({ "model_path": model, "options": options, "on_demand_start": true });
    let (status, body) = p.post(&format!("/api/instances/{name}"), body).await;
    assert_eq!(status, 201, "{body}");
    body["instance"].clone()
}

/// A completion of a couple of tokens; returns its usage.
async fn complete(p: &Paddock, model: &str, prompt: &str) -> Value {
    let body = json!({ "model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0 });
    let (status, body) = p.post("/v1/completions", body).await;
    assert_eq!(status, 200, "{body}");
    body["usage"].clone()
}

/// A prompt of about `words` tokens.
fn prompt(words: usize, seed: &str) -> String {
    let vocabulary =
        ["river", "stone", "lantern", "orchard", "copper", "meadow", "harbor", "violet", "engine", "cloud"];
    let mut text = format!("{seed}:");
    for i in 0..words {
        text.push(' ');
        text.push_str(vocabulary[(i * 7 + seed.len()) % vocabulary.len()]);
    }
    text
}

fn total(instance: &Value) -> u64 {
    instance["memory"]["total"].as_u64().unwrap_or_else(|| panic!("no memory estimate: {instance}"))
}

/// A copy of the test model under another name: a different file, so nothing can share it.
fn model_copy(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::copy(common::model_path(), &path).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn estimates_match_resident_memory_and_instances_of_one_gguf_share_its_weights() {
    let model = common::model_path();
    for (ctx, parallel) in [(2048, 1), (16384, 4)] {
        let data = tempfile::tempdir().unwrap();
        let p = start(data.path(), "").await;
        let before = p.rss();
        create(&p, "a", &model, json!({ "ctx_size": ctx, "parallel": parallel })).await;
        complete(&p, "a", &prompt(500, "measure")).await;
        let a = p.wait_status("a", "running").await;
        let (measured, estimate) = ((p.rss() - before) as f64, total(&a) as f64);
        println!("ctx {ctx} × {parallel}: resident {:.0} MiB, estimate {:.0} MiB", measured / MIB, estimate / MIB);
        assert!(
            (measured - estimate).abs() <= 0.1 * measured,
            "at ctx {ctx}, parallel {parallel}: estimate {:.0} MiB vs resident {:.0} MiB: {}",
            estimate / MIB,
            measured / MIB,
            a["memory"]
        );
        assert_eq!(a["memory"]["weights_shared_with"], json!([]));
        if ctx != 2048 {
            continue;
        }

        // Three more instances of the same GGUF, with other contexts and slots.
        let one = p.rss() - before;
        for (name, options) in [
            ("b", json!({ "ctx_size": 2048, "parallel": 2 })),
            ("c", json!({ "ctx_size": 1024, "parallel": 1 })),
            ("d", json!({ "ctx_size": 4096, "parallel": 4 })),
        ] {
            create(&p, name, &model, options).await;
            complete(&p, name, &prompt(200, name)).await;
            let view = p.wait_status(name, "running").await;
            assert_eq!(view["model"]["weights_reused"], true, "{name} loaded the weights again");
            assert_eq!(view["model"]["load_ms"], 0);
        }
        let four = p.rss() - before;
        println!("4 instances of one GGUF: {:.0} MiB; one: {:.0} MiB", four as f64 / MIB, one as f64 / MIB);
        // The weights once, then a context each: far below four separate copies (4×).
        assert!(four < one * 18 / 10, "4 instances take {} MiB, one takes {} MiB", four >> 20, one >> 20);
        let (_, d) = p.get("/api/instances/d").await;
        assert_eq!(d["memory"]["weights_shared_with"], json!(["a", "b", "c"]));
        let (_, status) = p.get("/api/system/status").await;
        let budget = &status["memory_budget"];
        // Counted once in the budget too.
        assert_eq!(budget["weights"], d["memory"]["weights"], "{budget}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn parked_instances_return_fast_with_their_prompts_and_a_start_that_cannot_fit_says_why() {
    let models = tempfile::tempdir().unwrap();
    let (first, second) = (common::model_path(), model_copy(models.path(), "other.gguf"));
    let data = tempfile::tempdir().unwrap();
    let p = start(data.path(), "max_running_instances: 1\n").await;
    let options = json!({ "ctx_size": 2048, "parallel": 2 });
    create(&p, "a", &first, options.clone()).await;
    create(&p, "b", &second, options).await;

    // A cold start, then a long prompt.
    let cold = Instant::now();
    let (status, _) = p.post("/api/instances/a/start", json!({})).await;
    assert_eq!(status, 200);
    let a = p.wait_status("a", "running").await;
    let cold = cold.elapsed();
    assert!(a["model"]["load_ms"].as_u64().unwrap() > 0);
    let long = prompt(400, "conversation");
    let usage = complete(&p, "a", &long).await;
    let n_long = usage["prompt_tokens"].as_u64().unwrap();
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);

    // b starts on demand: a gives way, parked, with its prompt saved.
    complete(&p, "b", &prompt(50, "other")).await;
    let parked = p.wait_status("a", "parked").await;
    assert!(parked.get("model").is_none(), "a parked instance has no context: {parked}");
    let (_, logs) = p.get("/api/instances/a/logs?lines=50").await;
    assert!(logs.to_string().contains("parked to make room for 'b' (max_running_instances 1)"), "{logs}");

    // a comes back on its kept weights, and its prompt was restored: only the new part is
    // decoded.
    let warm = Instant::now();
    let (status, _) = p.post("/api/instances/a/start", json!({})).await;
    assert_eq!(status, 200);
    let a = p.wait_status("a", "running").await;
    let warm = warm.elapsed();
    println!("start: cold {cold:?}, parked {warm:?}");
    assert_eq!(a["model"]["weights_reused"], true);
    assert_eq!(a["model"]["load_ms"], 0);
    assert!(warm < cold, "a parked start ({warm:?}) was not faster than a cold one ({cold:?})");
    let follow_up = format!("{long} and then some more words");
    let usage = complete(&p, "a", &follow_up).await;
    let cached = usage["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(cached + 1 >= n_long, "only {cached} of the {n_long} prompt tokens were reused after the park: {usage}");
    assert!(usage["prompt_tokens"].as_u64().unwrap() - cached <= 10, "{usage}");
    assert!(!data.path().join("kv/a/state.json").exists(), "restored state is removed");
    assert!(data.path().join("kv/b/state.json").exists(), "b was parked with its prompt saved");

    // A budget below what a (running) and b (parked) hold already: b's context does not fit,
    // and a may not be evicted. The refusal gives the arithmetic.
    let (status, body) = p.put("/api/instances/a", json!({ "evictable": false })).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) =
        p.put("/api/config", json!({ "memory_budget": "600MiB", "max_running_instances": null })).await;
    assert_eq!(status, 200, "{body}");
    let (status, dry) =
        p.post("/api/instances/c?dry_run=true", json!({ "model_path": second, "options": { "ctx_size": 2048 } })).await;
    assert_eq!(status, 200, "{dry}");
    assert_eq!(dry["fits_now"], false, "{dry}");
    assert_eq!(dry["memory"]["weights_shared_with"], json!(["b"]), "b's parked weights would serve it: {dry}");
    assert_eq!(p.get("/api/instances/c").await.0, 404, "a dry run creates nothing");
    let (status, err) = p.post("/api/instances/b/start", json!({})).await;
    assert_eq!(status, 409, "{err}");
    assert_eq!(err["code"], "INSUFFICIENT_MEMORY", "{err}");
    let details = err["details"].as_str().unwrap();
    assert!(details.contains("memory_budget is 600.0 MiB"), "{details}");
    assert!(details.contains("'a'") && details.contains("evictable: false"), "{details}");
    assert!(details.contains("weights already loaded"), "b's own parked weights are not counted again: {details}");
    assert!(details.contains("more would be needed"), "{details}");
    assert_eq!(p.get("/api/instances/b").await.1["status"], "parked");
    assert_eq!(p.get("/api/instances/a").await.1["status"], "running");
    let usage = complete(&p, "a", &follow_up).await;
    assert!(usage["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() > 0);

    // A budget for both sets of weights and one context: b starts, and a (evictable again) is
    // parked by the budget, not the count.
    p.put("/api/instances/a", json!({ "evictable": true })).await;
    p.put("/api/config", json!({ "memory_budget": "800MiB", "max_running_instances": null })).await;
    let (status, body) = p.post("/api/instances/b/start", json!({})).await;
    assert_eq!(status, 200, "{body}");
    p.wait_status("b", "running").await;
    p.wait_status("a", "parked").await;
    let (_, logs) = p.get("/api/instances/a/logs?lines=50").await;
    assert!(logs.to_string().contains("within memory_budget (800 MiB)"), "{logs}");
    // Both sets of weights stay loaded: a's next start is again only a context.
    let (_, status) = p.get("/api/system/status").await;
    assert_eq!(status["instances"]["parked"], 1, "{status}");
    assert!(status["memory_budget"]["used"].as_u64().unwrap() <= 800 << 20, "{status}");
}

/// Swaps a least-recently-used cache of `capacity` models makes serving `sequence` in order:
/// what a server that starts each request's model as it comes (FIFO) does.
fn fifo_swaps(sequence: &[&str], capacity: usize) -> usize {
    let mut resident: Vec<&str> = Vec::new();
    let mut swaps = 0;
    for &m in sequence {
        if let Some(i) = resident.iter().position(|&r| r == m) {
            resident.remove(i);
        } else if resident.len() == capacity {
            resident.remove(0);
            swaps += 1;
        }
        resident.push(m);
    }
    swaps
}

#[tokio::test(flavor = "multi_thread")]
async fn interleaved_requests_for_models_that_do_not_fit_together_are_served_in_runs() {
    let models = tempfile::tempdir().unwrap();
    let files = [common::model_path(), model_copy(models.path(), "b.gguf"), model_copy(models.path(), "c.gguf")];
    let data = tempfile::tempdir().unwrap();
    // Two of these instances fit (≈ 390 MiB each), three do not.
    let max_wait = 20.0;
    let p = start(data.path(), &format!("memory_budget: 1000MiB\nswap_max_wait: {max_wait}\nswap_min_resident: 0.5\n"))
        .await;
    let names = ["a", "b", "c"];
    for (name, file) in names.iter().zip(&files) {
        create(&p, name, file, json!({ "ctx_size": 512, "parallel": 2 })).await;
    }
    let (_, a) = p.get("/api/instances/a").await;
    let one = total(&a);
    assert!(2 * one <= 1000 << 20 && 3 * one > 1000 << 20, "{}", a["memory"]);

    // A B C A B C …, each a few milliseconds after the one before, all in flight at once.
    let sequence: Vec<&str> = names.iter().cycle().take(12).copied().collect();
    let started = Instant::now();
    let requests = sequence.iter().enumerate().map(|(i, &model)| {
        let base = p.base.clone();
        async move {
            tokio::time::sleep(std::time::Duration::from_millis(30 * i as u64)).await;
            let sent = Instant::now();
            let body = json!({ "model": model, "prompt": prompt(20, model), "max_tokens": 8, "ignore_eos": true });
            let r = common::process::client().post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap();
            (model, status, body, sent.elapsed())
        }
    });
    let results = futures::future::join_all(requests).await;
    let elapsed = started.elapsed();
    for (model, status, body, took) in &results {
        assert_eq!(*status, 200, "{model}: {body}");
        // Every stream complete: nothing was cut by a swap.
        assert_eq!(body["usage"]["completion_tokens"], 8, "{model}: {body}");
        assert_eq!(body["choices"][0]["finish_reason"], "length", "{model}: {body}");
        // The wait is bounded: at most the maximum, then a load and the generation.
        assert!(took.as_secs_f64() < max_wait + 20.0, "{model} took {took:?}");
    }
    let (_, status) = p.get("/api/system/status").await;
    let swaps = status["scheduler"]["swaps"].as_u64().unwrap() as usize;
    let fifo = fifo_swaps(&sequence, 2);
    println!("12 interleaved requests over 3 models that fit 2 at a time: {swaps} swaps (FIFO: {fifo}) in {elapsed:?}");
    assert!(swaps < fifo, "{swaps} swaps, as many as FIFO's {fifo}");
    assert!(swaps <= 2, "served in runs, a swap or two at most: {swaps}");
    assert!(status["memory_budget"]["used"].as_u64().unwrap() <= 1000 << 20, "{status}");
    assert_eq!(status["scheduler"]["waiting"], json!({}), "{status}");
}

/// A streamed request whose model must wait for another to finish is answered at once and kept
/// alive, then streams normally; the stream it waited for is not cut.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_waiting_for_a_swap_gets_its_first_byte_early_and_cuts_nothing() {
    let models = tempfile::tempdir().unwrap();
    let (first, second) = (common::model_path(), model_copy(models.path(), "second.gguf"));
    let data = tempfile::tempdir().unwrap();
    let p = start(data.path(), "max_running_instances: 1\nswap_max_wait: 600\non_demand_start_timeout: 600\n").await;
    create(&p, "long", &first, json!({ "ctx_size": 1024, "parallel": 1 })).await;
    create(&p, "next", &second, json!({ "ctx_size": 1024, "parallel": 1 })).await;
    complete(&p, "long", "warm up").await;

    let base = p.base.clone();
    // Generous: the other tests of this file load the machine too.
    let patient = || reqwest::Client::builder().timeout(std::time::Duration::from_secs(600)).build().unwrap();
    let busy = tokio::spawn(async move {
        let body = json!({ "model": "long", "prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": true });
        let r = patient().post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
        let body: Value = r.json().await.unwrap();
        (body, Instant::now())
    });
    p.wait_status("long", "running").await;
    // The wait shows on the live events.
    let ws_url = format!("{}/api/ws", p.base.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    let waiting_seen = tokio::spawn(async move {
        loop {
            let Some(Ok(msg)) = futures::StreamExt::next(&mut ws).await else { return false };
            let Ok(event) = serde_json::from_str::<Value>(msg.to_text().unwrap_or("")) else { continue };
            if event["type"] == "scheduler" && event["data"]["waiting"]["next"] == 1 {
                return true;
            }
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let sent = Instant::now();
    let body = json!({ "model": "next", "prompt": "Hello", "max_tokens": 3, "stream": true });
    let response = patient().post(format!("{}/v1/completions", p.base)).json(&body).send().await.unwrap();
    let headers_after = sent.elapsed();
    let headers_at = Instant::now();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    let (long, long_done) = busy.await.unwrap();
    println!("first byte after {headers_after:?}; the long generation ended {:?} later", long_done - headers_at);
    assert!(headers_at < long_done, "the waiting stream got its first byte only after the long one ended");
    assert!(text.contains(": waiting for the model to start"), "{text}");
    assert!(text.contains("[DONE]") && !text.contains("\"error\""), "{text}");
    assert_eq!(long["usage"]["completion_tokens"], 300, "the long generation was cut: {long}");
    assert_eq!(p.get("/api/instances/long").await.1["status"], "parked");
    let seen = tokio::time::timeout(std::time::Duration::from_secs(10), waiting_seen).await;
    assert!(matches!(seen, Ok(Ok(true))), "no scheduler event with the waiting request");
}

/// Engines that stop leave nothing resident behind: two instances taking turns under
/// `max_running_instances: 1`, each request making the other give way, keep the process's
/// resident memory flat. Two ways:
/// - parked: instances of one GGUF; each swap frees the other's context and starts this one on
///   a new engine thread with a new context;
/// - cold: copies of the GGUF and a budget that holds one, so each swap also frees the other's
///   weights and loads this one's from disk.
///
/// glibc used to keep each dead engine's buffers in its malloc arenas: measured here, parked
/// swaps went 486 → 661 MiB over 10 (+30 MiB a swap once its mmap threshold had risen) and
/// cold ones leaked about 10 MiB each, until paddock returned them after each teardown
/// (`engine::heap`). Freeing the old weights while the new ones load, in the arena the new
/// engine allocates in, scattered its blocks and cost ~3 MiB a cold swap (`free_weights`):
/// too little for 12 swaps to tell from the noise; `paddock bench --swap-cold` shows it.
#[tokio::test(flavor = "multi_thread")]
async fn swapping_instances_does_not_grow_resident_memory() {
    let model = common::model_path();
    let copies = tempfile::tempdir().unwrap();
    let copy = model_copy(copies.path(), "copy.gguf");
    // 64 MiB is two swaps' worth of the old parked leak; 32 MiB, three of the old cold one.
    for (how, b_model, extra, allowed) in
        [("parked", &model, "", 64.0), ("cold", &copy, "memory_budget: \"600MiB\"\n", 32.0)]
    {
        let data = tempfile::tempdir().unwrap();
        let p = start(data.path(), &format!("max_running_instances: 1\n{extra}")).await;
        let options = json!({ "ctx_size": 2048, "parallel": 4, "threads": 2 });
        create(&p, "a", &model, options.clone()).await;
        create(&p, "b", b_model, options).await;
        let mut resident = Vec::new();
        for i in 0..12 {
            let name = ["a", "b"][i % 2];
            complete(&p, name, &prompt(100, &format!("swap {i}"))).await;
            resident.push(p.rss() as f64 / MIB);
        }
        println!("{how}: resident MiB after each swap: {resident:.0?}");
        let logs = p.get("/api/instances/a/logs?lines=50").await.1.to_string();
        assert_eq!(
            logs.contains("weights were freed to make room"),
            how == "cold",
            "{how}: the swaps were not what the test means: {logs}"
        );
        // The first swaps settle the allocator (each engine thread's arena once used, the first
        // instance parked once); from there on nothing may accumulate.
        // The median of the last three: a swap's figure swings by ±20 MiB (which arena the new
        // engine got, what the old one's thread had not yet returned).
        let settled = resident[2].max(resident[3]);
        let mut tail = resident[resident.len() - 3..].to_vec();
        tail.sort_by(f64::total_cmp);
        let last = tail[1];
        assert!(
            last - settled <= allowed,
            "{how}: resident memory grew from {settled:.0} to {last:.0} MiB over {} swaps: {resident:.0?}",
            resident.len()
        );
    }
}
