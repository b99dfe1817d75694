//! The supervisor through the API: both create forms, updates, restart, start-all/stop-all,
//! graceful and forced stops, on-demand start, idle stop, eviction.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

use crate::common::{greedy, model_path, server, spawn_server, TestServer};

fn small() -> Value {
    json!({ "ctx_size": 256, "parallel": 1, "threads": 1 })
}

async fn wait_for(s: &TestServer, name: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, body) = s.get(&format!("/api/instances/{name}")).await;
        if check(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{name}: {what} never happened: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn llamactl_create_form_update_and_restart() {
    let s = server();
    let mut options = small();
    options["model"] = json!(model_path());
    let (status, body) = s
        .post(
            "/api/v1/instances/form2.v1",
            json!({ "backend_type": "llama_cpp", "backend_options": options, "auto_restart": false, "idle_timeout": 0, "on_demand_start": false }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let inst = &body["instance"];
    assert_eq!(inst["name"], "form2.v1", "dots are allowed in names");
    assert_eq!(inst["model_path"], model_path().to_str().unwrap());
    assert_eq!(inst["options"]["context_size"], 256);
    assert_eq!(inst["auto_restart"], false);
    assert_eq!(inst["on_demand_start"], false);
    assert_eq!(inst["max_restarts"], 3, "defaults fill what is not given");
    assert!(inst["pid"].as_u64().unwrap() > 0);

    let (status, body) =
        s.post("/api/instances/form2.v1", json!({ "backend_options": { "model": model_path() } })).await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = s.post("/api/instances/x", json!({ "backend_type": "vllm", "backend_options": {} })).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) =
        s.post("/api/instances/hf", json!({ "backend_options": { "hf_repo": "unsloth/gemma-3-270m-it-GGUF" } })).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["instance"]["hf_repo"], "unsloth/gemma-3-270m-it-GGUF");
    // Its model is fetched at start; this server's hub is a closed port, so the start fails
    // and says why (tests/hub.rs downloads from a local hub).
    let (status, body) = s.post("/api/instances/hf/start", json!({})).await;
    assert_eq!(status, 200, "{body}");
    let failed = s.wait_status("hf", "failed").await;
    assert!(failed.to_string().contains("cannot be reached"), "{failed}");

    // A partial update of a stopped instance applies at once.
    let (status, body) = s.put("/api/instances/form2.v1", json!({ "options": { "threads": 2 } })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["restart_required"], false);
    assert_eq!(body["instance"]["options"]["threads"], 2);
    assert_eq!(body["instance"]["options"]["context_size"], 256, "other options are kept");

    s.post("/api/instances/form2.v1/start", json!({})).await;
    s.wait_status("form2.v1", "running").await;
    // Updating a running instance applies on restart (llamactl's form is accepted by PUT too).
    let (status, body) = s.put("/api/instances/form2.v1", json!({ "backend_options": { "ctx_size": 512 } })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["restart_required"], true);
    assert!(body["message"].as_str().unwrap().contains("restart"));
    assert_eq!(
        s.get("/api/instances/form2.v1").await.1["model"]["n_ctx"],
        256,
        "still the old context until restarted"
    );
    let (status, body) = s.post("/api/instances/form2.v1/restart", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "starting");
    let running = s.wait_status("form2.v1", "running").await;
    assert_eq!(running["model"]["n_ctx"], 512, "the update applied on restart");

    // llama-server flags by their names: supported ones become options, others are refused by name.
    let (status, body) = s.put("/api/instances/form2.v1", json!({ "extra": { "fa": "off", "ctx-size": 512 } })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["instance"]["options"]["flash_attn"], "off");
    let (status, body) = s.put("/api/instances/form2.v1", json!({ "extra": { "mlock": true } })).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "INVALID_OPTIONS");
    assert!(body["details"].as_str().unwrap().contains("`mlock`"), "{body}");

    let (status, body) = s.put("/api/instances/form2.v1", json!({ "options": { "parallel": 0 } })).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "INVALID_OPTIONS");
    let (status, body) = s.put("/api/instances/nope", json!({ "options": {} })).await;
    assert_eq!(status, 404, "{body}");

    let (status, body) = s.post("/api/instances/form2.v1/stop", json!({ "force": true })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "stopped");
    assert_eq!(s.delete("/api/instances/form2.v1").await.0, 200);
    assert_eq!(s.delete("/api/instances/hf").await.0, 200);
}

/// A graceful stop lets an in-flight generation finish; a forced one cuts it.
#[tokio::test]
async fn graceful_stop_drains_and_force_cancels() {
    let s = server();
    for (name, force) in [("drain", false), ("force", true)] {
        let create = json!({ "name": name, "model_path": model_path(), "on_demand_start": false, "options": { "ctx_size": 512, "parallel": 1, "threads": 1 } });
        assert_eq!(s.post("/api/instances", create).await.0, 201);
        s.post(&format!("/api/instances/{name}/start"), json!({})).await;
        s.wait_status(name, "running").await;
        let req =
            json!({ "model": name, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "stream": true });
        let resp = s.client.post(s.url("/v1/completions")).json(&req).send().await.unwrap();
        let mut body = resp.bytes_stream();
        body.next().await.unwrap().unwrap(); // generation under way
        let stop_path = format!("/api/instances/{name}/stop");
        let stop = s.post(&stop_path, json!({ "force": force, "timeout": 60 }));
        let (stopped, rest) = futures::join!(stop, async {
            let mut text = String::new();
            while let Some(chunk) = body.next().await {
                text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            }
            text
        });
        assert_eq!(stopped.0, 200, "{:?}", stopped.1);
        assert_eq!(stopped.1["status"], "stopped");
        if force {
            assert!(rest.contains("\"error\""), "a forced stop ends the stream with an error event: {rest}");
        } else {
            assert!(rest.contains("\"finish_reason\":\"length\""), "the request ran to its end: {rest}");
        }
        assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");
        assert_eq!(s.delete(&format!("/api/instances/{name}")).await.0, 200);
    }
}

#[tokio::test]
async fn start_all_and_stop_all_report_each_instance() {
    let s = spawn_server(|_| {});
    for name in ["a1", "a2"] {
        let (status, _) =
            s.post("/api/instances", json!({ "name": name, "model_path": model_path(), "options": small() })).await;
        assert_eq!(status, 201);
    }
    let (status, body) = s.post("/api/instances/start-all", json!({})).await;
    assert_eq!(status, 200);
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "{body}");
    assert!(results.iter().all(|r| r["status"] == "starting"), "{body}");
    s.wait_status("a1", "running").await;
    s.wait_status("a2", "running").await;
    let (status, body) = s.post("/api/v1/instances/stop-all", json!({})).await;
    assert_eq!(status, 200);
    assert!(body["results"].as_array().unwrap().iter().all(|r| r["status"] == "stopped"), "{body}");
    let (_, list) = s.get("/api/instances").await;
    assert!(list["instances"].as_array().unwrap().iter().all(|i| i["status"] == "stopped"));
}

/// A /v1 request for a stopped instance starts it; an idle one stops by itself; health checks
/// and management reads do not count as activity.
#[tokio::test]
async fn on_demand_start_and_idle_stop() {
    let s = server();
    let name = "ondemand";
    let (status, body) = s
        .post(
            "/api/instances",
            json!({ "name": name, "model_path": model_path(), "idle_timeout": 0.03, "options": small() }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (text, body) = greedy(s, name, "The capital of France is", 2).await;
    assert_eq!(body["usage"]["completion_tokens"], 2, "{text:?}");
    assert_eq!(s.get(&format!("/api/instances/{name}")).await.1["status"], "running");
    // 0.03 min = 1.8 s without inference traffic; polling health and GET meanwhile must not keep
    // it up. It is parked: context freed, weights kept for its next request.
    let parked = wait_for(s, name, "idle stop", |b| b["status"] == "parked").await;
    assert!(parked.get("model").is_none(), "{parked}");
    let (_, health) = s.get(&format!("/api/instances/{name}/health")).await;
    assert_eq!(health["status"], "parked");
    let (_, logs) = s.get(&format!("/api/instances/{name}/logs")).await;
    assert!(logs["logs"].as_array().unwrap().iter().any(|l| l["message"] == "idle timeout reached; parking"));
    // The next request brings it back on the kept weights.
    let (_, body) = greedy(s, name, "The capital of France is", 1).await;
    assert_eq!(body["usage"]["completion_tokens"], 1);
    let back = s.get(&format!("/api/instances/{name}")).await.1;
    assert_eq!(back["model"]["weights_reused"], true, "{back}");
    // A user's stop frees the weights; a parked or stopped instance can be deleted.
    let (status, body) = s.post(&format!("/api/instances/{name}/stop"), json!({})).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("stopped")), "{body}");
    assert_eq!(s.delete(&format!("/api/instances/{name}")).await.0, 200);
}

/// With max_running_instances 1, starting another instance parks the least recently used one;
/// a non-evictable one blocks the start with the reason.
#[tokio::test]
async fn eviction_under_max_running_instances() {
    let s = spawn_server(|c| c.max_running_instances = Some(1));
    for name in ["e1", "e2"] {
        s.post("/api/instances", json!({ "name": name, "model_path": model_path(), "options": small() })).await;
    }
    s.post(
        "/api/instances",
        json!({ "name": "pinned", "model_path": model_path(), "evictable": false, "options": small() }),
    )
    .await;
    s.post("/api/instances/e1/start", json!({})).await;
    s.wait_status("e1", "running").await;
    // On-demand start of e2 parks e1.
    let (text, body) = greedy(&s, "e2", "Hello", 1).await;
    assert_eq!(body["usage"]["completion_tokens"], 1, "{text:?}");
    assert_eq!(s.get("/api/instances/e1").await.1["status"], "parked");
    let (_, logs) = s.get("/api/instances/e1/logs").await;
    assert!(logs["logs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["message"].as_str().unwrap().starts_with("parked to make room for 'e2'")));
    // Changing a parked instance frees its weights (they may not fit the new options).
    let (status, body) = s.put("/api/instances/e1", json!({ "options": { "seed": 7 } })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["instance"]["status"], "stopped", "{body}");

    s.post("/api/instances/e2/stop", json!({})).await;
    s.post("/api/instances/pinned/start", json!({})).await;
    s.wait_status("pinned", "running").await;
    let (status, body) = s.post("/api/instances/e1/start", json!({})).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "NO_CAPACITY");
    assert!(body["details"].as_str().unwrap().contains("pinned"), "{body}");
}

/// A stop while the model loads cancels the load and answers once stopped, so the seed's
/// lifecycle example (start, stop, delete) works without waiting in between.
#[tokio::test]
async fn stop_during_load_answers_stopped_and_delete_follows() {
    let s = server();
    let (status, _) =
        s.post("/api/instances", json!({ "name": "quick", "model_path": model_path(), "options": small() })).await;
    assert_eq!(status, 201);
    let (status, body) = s.post("/api/instances/quick/start", json!({})).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("starting")));
    let (status, body) = s.post("/api/instances/quick/stop", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "stopped", "{body}");
    let (status, body) = s.delete("/api/instances/quick").await;
    assert_eq!(status, 200, "{body}");
}

/// PUT /api/config validates, saves the file, applies live what can be, and says what waits.
#[tokio::test]
async fn config_update_applies_live_and_saves() {
    let s = spawn_server(|_| {});
    let (status, body) = s.put("/api/config", json!({ "max_running_instances": 1, "port": 9999 })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["applied"], json!(["max_running_instances"]));
    assert_eq!(body["restart_required"], json!(["port"]));
    let (_, live) = s.get("/api/config").await;
    assert_eq!(live["max_running_instances"], 1);
    assert_ne!(live["port"], 9999, "the port changes only after a restart");
    let saved =
        std::fs::read_to_string(std::path::Path::new(live["data_dir"].as_str().unwrap()).join("paddock.yaml")).unwrap();
    assert!(saved.contains("port: 9999") && saved.contains("max_running_instances: 1"), "{saved}");

    let (status, body) = s.put("/api/config", json!({ "max_running_instances": 0 })).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "INVALID_CONFIG");
    let (status, body) = s.put("/api/config", json!({ "max_runing_instances": 2 })).await;
    assert!(status == 400 || status == 422, "{status} {body}");
    assert!(body["details"].as_str().unwrap().contains("max_runing_instances"), "{body}");
}

/// An instance's own `port` answers its routes while it runs, whatever `model` a client names
/// (as a llama-server would); a port in use fails the start with 409; stopping closes the port.
#[tokio::test]
async fn an_instance_serves_its_own_port_while_running() {
    let s = server();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let create = |name: &str| json!({ "name": name, "model_path": model_path(), "port": port, "options": small() });
    assert_eq!(s.post("/api/instances", create("ported")).await.0, 201);
    assert_eq!(s.post("/api/instances", create("clash")).await.0, 201);
    s.post("/api/instances/ported/start", json!({})).await;
    s.wait_status("ported", "running").await;

    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let health = loop {
        match s.client.get(format!("{base}/health")).send().await {
            Ok(r) => break r.json::<Value>().await.unwrap(),
            Err(e) => assert!(Instant::now() < deadline, "port never opened: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(health["status"], "ok");
    let r = s
        .client
        .post(format!("{base}/v1/completions"))
        .json(&json!({ "model": "whatever-the-client-says", "prompt": "Hello", "max_tokens": 2 }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["model"], "ported", "{body}");
    let models: Value = s.client.get(format!("{base}/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"].as_array().unwrap().len(), 1, "{models}");

    let (status, body) = s.post("/api/instances/clash/start", json!({})).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "PORT_IN_USE");
    assert!(body["details"].as_str().unwrap().contains(&port.to_string()), "{body}");
    assert_eq!(s.get("/api/instances/clash").await.1["status"], "stopped");

    s.post("/api/instances/ported/stop", json!({})).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.client.get(format!("{base}/health")).send().await.is_ok() {
        assert!(Instant::now() < deadline, "port still open after stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Freed: the other instance may now take it.
    let (status, body) = s.post("/api/instances/clash/start", json!({})).await;
    assert_eq!(status, 200, "{body}");
    s.wait_status("clash", "running").await;
    s.post("/api/instances/clash/stop", json!({ "force": true })).await;
}

/// A group's max_running parks only the group's members; others keep running.
#[tokio::test]
async fn a_group_cap_parks_within_the_group() {
    let s = spawn_server(|c| {
        c.groups.insert("big".into(), paddock::config::GroupLimits { max_running: 1 });
    });
    for (name, group) in [("g1", json!("big")), ("g2", json!("big")), ("solo", Value::Null)] {
        let mut body = json!({ "name": name, "model_path": model_path(), "options": small() });
        if !group.is_null() {
            body["group"] = group;
        }
        let (status, body) = s.post("/api/instances", body).await;
        assert_eq!(status, 201, "{body}");
    }
    assert_eq!(s.get("/api/instances/g1").await.1["group"], "big");
    for name in ["g1", "solo"] {
        s.post(&format!("/api/instances/{name}/start"), json!({})).await;
        s.wait_status(name, "running").await;
    }
    let (status, body) = s.post("/api/instances/g2/start", json!({})).await;
    assert_eq!(status, 200, "{body}");
    s.wait_status("g2", "running").await;
    assert_eq!(s.get("/api/instances/g1").await.1["status"], "parked");
    assert_eq!(s.get("/api/instances/solo").await.1["status"], "running");
    let (_, logs) = s.get("/api/instances/g1/logs").await;
    assert!(logs.to_string().contains("parked to make room for 'g2' (group 'big' max_running 1)"), "{logs}");
    // Leaving the group lifts the cap.
    let (status, body) = s.put("/api/instances/g1", json!({ "group": "" })).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["instance"].get("group").is_none(), "{body}");
    s.post("/api/instances/g1/start", json!({})).await;
    s.wait_status("g1", "running").await;
    assert_eq!(s.get("/api/instances/g2").await.1["status"], "running");
}
