//! Remote nodes (llamactl's multi-node): two paddock processes on loopback, a main node whose
//! config names the other as node `w` (with auth on, so its key must be sent). An instance created
//! with `nodes: ["w"]` through the main lives on the worker, is started and chatted with through the
//! main (the official `openai` client, streaming and not), a dropped stream cancels on the worker,
//! and once the worker is killed the main answers 502 naming the node, quickly.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

#[path = "common/mod.rs"]
mod common;

use common::process::{client, Paddock};

async fn call(method: reqwest::Method, url: String, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let mut r = client().request(method, url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// The worker's view of `name`, with its admin key.
async fn on_worker(worker: &Paddock, key: &str, name: &str) -> (u16, Value) {
    call(reqwest::Method::GET, format!("{}/api/instances/{name}", worker.base), Some(key), None).await
}

const CLIENT: &str = r#"
import sys
from openai import OpenAI
base, model = sys.argv[1:3]
c = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
ids = [m.id for m in c.models.list().data]
assert model in ids, ids
messages = [{"role": "user", "content": "Say hello."}]
r = c.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
text = r.choices[0].message.content
assert text and 1 <= r.usage.completion_tokens <= 6, r
chunks = list(c.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0, stream=True))
streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
assert len(chunks) >= 2 and streamed == text, (streamed, text, len(chunks))
done = c.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0)
assert done.choices[0].text is not None and done.usage.completion_tokens <= 4, done
print("remote chat ok")
"#;

#[tokio::test]
async fn an_instance_on_a_remote_node_is_managed_and_served_through_the_main_node() {
    let model = common::model_path();
    let (worker_data, main_data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut worker = Paddock::start(worker_data.path(), &["--admin-password", "worker-admin-password"]).await;
    let (_, login) = call(
        reqwest::Method::POST,
        format!("{}/api/auth/login", worker.base),
        None,
        Some(json!({ "username": "admin", "password": "worker-admin-password" })),
    )
    .await;
    let token = login["token"].as_str().expect("a login token").to_string();
    let (_, created) = call(
        reqwest::Method::POST,
        format!("{}/api/auth/keys", worker.base),
        Some(&token),
        Some(json!({ "name": "main", "kind": "management", "role": "admin" })),
    )
    .await;
    let key = created["key"].as_str().expect("an API key").to_string();
    std::fs::write(
        main_data.path().join("paddock.yaml"),
        format!(
            "local_node: main\nnodes:\n  main: {{address: ''}}\n  w: {{address: '{}', api_key: '{key}'}}\n",
            worker.base
        ),
    )
    .unwrap();
    let main = Paddock::start(main_data.path(), &[]).await;

    // A node that is not configured is refused by name, and nothing is created.
    let body = |nodes: Value| json!({ "name": "far", "model_path": model, "options": { "ctx_size": 2048, "parallel": 1, "threads": 2 }, "nodes": nodes });
    let (status, refused) = main.post("/api/instances", body(json!(["nowhere"]))).await;
    assert_eq!((status, refused["code"].as_str()), (400, Some("UNKNOWN_NODE")), "{refused}");
    assert!(refused["details"].as_str().unwrap().contains("'nowhere'"), "{refused}");

    // Created through the main, it lives on the worker (whose auth refuses callers without the key).
    let (status, created) = main.post("/api/instances", body(json!(["w"]))).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["instance"]["node"], "w", "{created}");
    assert_eq!(on_worker(&worker, &key, "far").await.0, 200);
    assert_eq!(on_worker(&worker, "wrong", "far").await.0, 401);
    let (_, listed) = main.get("/api/instances").await;
    let far: Vec<&Value> = listed["instances"].as_array().unwrap().iter().filter(|i| i["name"] == "far").collect();
    assert_eq!(far.len(), 1, "{listed}");
    assert_eq!((far[0]["node"].as_str(), far[0]["status"].as_str()), (Some("w"), Some("stopped")), "{listed}");
    // Its name is taken here too.
    let (status, taken) = main.post("/api/instances", body(json!(["main"]))).await;
    assert_eq!((status, taken["code"].as_str()), (409, Some("INSTANCE_EXISTS")), "{taken}");
    // An update is forwarded (and may not move it).
    let (status, moved) = main.put("/api/instances/far", json!({ "nodes": ["main"] })).await;
    assert_eq!((status, moved["code"].as_str()), (400, Some("INVALID_NODES")), "{moved}");
    let (status, updated) = main.put("/api/instances/far", json!({ "idle_timeout": 30 })).await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(on_worker(&worker, &key, "far").await.1["idle_timeout"], 30.0);

    // Started through the main.
    let (status, started) = main.post("/api/instances/far/start", json!({})).await;
    assert_eq!(status, 200, "{started}");
    let running = main.wait_status("far", "running").await;
    assert_eq!(running["node"], "w");
    assert_eq!(on_worker(&worker, &key, "far").await.1["status"], "running");

    let (status, nodes) = main.get("/api/nodes").await;
    assert_eq!(status, 200, "{nodes}");
    assert_eq!(nodes["local_node"], "main");
    let w = &nodes["nodes"][0];
    assert_eq!((w["name"].as_str(), w["health"].as_str()), (Some("w"), Some("healthy")), "{nodes}");
    assert_eq!((w["instances"]["total"].as_u64(), w["instances"]["running"].as_u64()), (Some(1), Some(1)), "{nodes}");
    assert_eq!(w["placed"], 1);
    assert!(w["latency_ms"].as_f64().unwrap() < 2000.0 && w["version"].is_string(), "{nodes}");

    // The official client, through the main.
    let python = std::env::var_os("PADDOCK_TEST_PYTHON").expect("PADDOCK_TEST_PYTHON must name a python with openai");
    let out = std::process::Command::new(python).args(["-c", CLIENT, &main.base, "far"]).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("remote chat ok"), "openai client failed:\n{stdout}\n{stderr}");

    // A stream the client drops is cancelled on the worker: its slot frees at once and the
    // generation (which would run ~1500 tokens) stops growing.
    let engine = |v: &Value, k: &str| v["stats"][k].as_u64().unwrap_or(0);
    let before = engine(&on_worker(&worker, &key, "far").await.1, "generated_tokens_total");
    let response = client()
        .post(format!("{}/v1/completions", main.base))
        .json(&json!({ "model": "far", "prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": true, "stream": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut seen = String::new();
    while seen.matches("data:").count() < 3 {
        seen.push_str(&String::from_utf8_lossy(&stream.next().await.expect("more events").unwrap()));
    }
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(5);
    let after = loop {
        let view = on_worker(&worker, &key, "far").await.1;
        if engine(&view, "slots_busy") == 0 {
            break engine(&view, "generated_tokens_total");
        }
        assert!(Instant::now() < deadline, "the dropped stream still generates on the worker: {view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let settled = engine(&on_worker(&worker, &key, "far").await.1, "generated_tokens_total");
    assert_eq!(settled, after, "generation went on after the client left");
    assert!(after - before < 1000, "{} tokens generated for a dropped stream", after - before);

    // The worker dies mid-stream: the stream through the main ends with an error event naming the
    // node, then [DONE].
    let response = client()
        .post(format!("{}/v1/completions", main.base))
        .json(&json!({ "model": "far", "prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": true, "stream": true }))
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    let mut seen = String::new();
    while seen.matches("data:").count() < 2 {
        seen.push_str(&String::from_utf8_lossy(&stream.next().await.expect("more events").unwrap()));
    }
    worker.kill9();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), stream.next()).await.expect("the stream ends")
    {
        seen.push_str(&String::from_utf8_lossy(&chunk.expect("the main ends its stream cleanly")));
    }
    assert!(seen.contains("NODE_UNAVAILABLE") && seen.contains("'w'"), "{seen}");
    assert!(seen.trim_end().ends_with("data: [DONE]"), "{seen}");

    // Once it is gone, the main answers 502 naming the node, fast, and reports it down.
    let started = Instant::now();
    let (status, failed) = call(
        reqwest::Method::POST,
        format!("{}/v1/chat/completions", main.base),
        None,
        Some(json!({ "model": "far", "messages": [{ "role": "user", "content": "hi" }], "max_tokens": 4 })),
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert_eq!(status, 502, "{failed}");
    assert!(failed["error"]["message"].as_str().unwrap().contains("'w'"), "{failed}");
    let (status, failed) = main.post("/api/instances/far/stop", json!({})).await;
    assert_eq!((status, failed["code"].as_str()), (502, Some("NODE_UNAVAILABLE")), "{failed}");
    assert!(failed["error"].as_str().unwrap().contains("'w'") && failed["details"].is_string(), "{failed}");
    let started = Instant::now();
    let (_, down) = main.get("/api/nodes/w").await;
    assert_eq!(down["health"], "unreachable", "{down}");
    let (_, listed) = main.get("/api/instances").await;
    assert!(started.elapsed() < Duration::from_secs(8), "took {:?}", started.elapsed());
    let far = listed["instances"].as_array().unwrap().iter().find(|i| i["name"] == "far").cloned().unwrap();
    assert_eq!((far["node"].as_str(), far["status"].as_str()), (Some("w"), Some("unknown")), "{listed}");

    // The record survives a restart of the main: the instance is still routed to its node.
    drop(main);
    let main = Paddock::start(main_data.path(), &[]).await;
    let (status, failed) = main.get("/api/instances/far").await;
    assert_eq!((status, failed["code"].as_str()), (502, Some("NODE_UNAVAILABLE")), "{failed}");
}
