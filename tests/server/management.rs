//! Instance management through the HTTP API: lifecycle, errors, failure reporting.

use serde_json::{json, Value};

use crate::common::{model_path, server};

fn assert_error_shape(body: &Value, code: &str) {
    assert_eq!(body["code"], code, "{body}");
    assert!(body["error"].as_str().is_some_and(|s| !s.is_empty()), "{body}");
    assert!(body["details"].is_string(), "{body}");
}

#[tokio::test]
async fn instance_lifecycle_create_start_stop_delete() {
    let s = server();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (status, body) = s
        .post(
            "/api/instances",
            json!({ "name": "life", "model_path": model_path(), "port": port, "options": { "ctx_size": 512, "parallel": 1, "threads": 1 } }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["message"], "Instance created successfully");
    assert_eq!(body["instance"]["name"], "life");
    assert_eq!(body["instance"]["status"], "stopped");
    assert_eq!(body["instance"]["port"], port);
    assert_eq!(body["instance"]["options"]["context_size"], 512, "llama-server's ctx_size is stored as context_size");

    let (status, body) = s.post("/api/instances", json!({ "name": "life", "model_path": model_path() })).await;
    assert_eq!(status, 409);
    assert_error_shape(&body, "INSTANCE_EXISTS");

    let (status, body) = s.get("/api/instances").await;
    assert_eq!(status, 200);
    assert!(body["instances"].as_array().unwrap().iter().any(|i| i["name"] == "life"));

    let (status, body) = s.post("/api/instances/life/start", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "starting");
    let running = s.wait_status("life", "running").await;
    assert_eq!(running["model"]["n_ctx"], 512);
    assert_eq!(running["model"]["n_ctx_slot"], 512);
    assert!(running["model"]["n_params"].as_u64().unwrap() > 100_000_000, "{running}");

    let (status, health) = s.get("/api/instances/life/health").await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "healthy", "{health}");
    assert_eq!(health["checks"]["response"], "ok", "{health}");
    assert_eq!(health["checks"]["port"], "open", "{health}");

    let (status, body) = s.post("/api/instances/life/start", json!({})).await;
    assert_eq!(status, 409, "starting a running instance: {body}");
    assert_error_shape(&body, "INVALID_STATE");
    let (status, body) = s.delete("/api/instances/life").await;
    assert_eq!(status, 409, "deleting a running instance: {body}");
    assert_error_shape(&body, "INSTANCE_RUNNING");

    let (status, body) = s.get("/api/instances/life/logs?lines=50").await;
    assert_eq!(status, 200);
    let logs = body["logs"].as_array().unwrap();
    assert!(logs.iter().any(|l| l["message"] == "running"), "lifecycle events in the log: {body}");
    assert!(
        logs.iter().any(|l| l["message"].as_str().unwrap().contains("llama_")),
        "llama.cpp's own log lines reach the instance's buffer: {body}"
    );

    let (status, body) = s.post("/api/instances/life/stop", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "stopped");
    let (status, body) = s.post("/api/instances/life/stop", json!({})).await;
    assert_eq!(status, 409, "stopping a stopped instance: {body}");
    assert_eq!(s.get("/api/instances/life/health").await.1["status"], "stopped");

    let (status, body) = s.delete("/api/instances/life").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["message"], "Instance deleted successfully");
    let (status, body) = s.get("/api/instances/life").await;
    assert_eq!(status, 404);
    assert_error_shape(&body, "INSTANCE_NOT_FOUND");
}

#[tokio::test]
async fn llamactl_prefix_is_an_alias() {
    let s = server();
    let (status, body) = s.get("/api/v1/instances").await;
    assert_eq!(status, 200);
    assert!(body["instances"].is_array());
    let (status, body) = s.get("/api/v1/system/info").await;
    assert_eq!(status, 200);
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert!(body["git_revision"].as_str().is_some_and(|r| !r.is_empty()));
}

#[tokio::test]
async fn bad_input_gets_clear_errors() {
    let s = server();
    let (status, body) =
        s.post("/api/instances", json!({ "name": "nofile", "model_path": "/nonexistent/x.gguf" })).await;
    assert_eq!(status, 400);
    assert_error_shape(&body, "MODEL_NOT_FOUND");
    assert!(body["details"].as_str().unwrap().contains("/nonexistent/x.gguf"));

    let (status, body) = s.post("/api/instances", json!({ "name": "bad name!", "model_path": model_path() })).await;
    assert_eq!(status, 400);
    assert_error_shape(&body, "INVALID_NAME");

    let (status, body) = s
        .post("/api/instances", json!({ "name": "opts", "model_path": model_path(), "options": { "flash": true } }))
        .await;
    assert_eq!(status, 400, "{body}");
    assert_error_shape(&body, "INVALID_OPTIONS");
    assert!(body["details"].as_str().unwrap().contains("unknown field `flash`"), "names the unknown option: {body}");

    let (status, body) =
        s.post("/api/instances", json!({ "name": "typo", "model_path": model_path(), "auto_restrat": true })).await;
    assert_eq!(status, 400, "a typo is not silently dropped: {body}");
    assert!(body["details"].as_str().unwrap().contains("auto_restrat"), "{body}");

    let (status, body) = s
        .post("/api/instances", json!({ "name": "opts", "model_path": model_path(), "options": { "threads": "many" } }))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["details"].as_str().unwrap().contains("invalid type"), "{body}");

    let (status, body) = s
        .post("/api/instances", json!({ "name": "opts", "model_path": model_path(), "options": { "parallel": 0 } }))
        .await;
    assert_eq!(status, 400);
    assert_error_shape(&body, "INVALID_OPTIONS");
    assert!(body["details"].as_str().unwrap().contains("parallel must be between 1 and 256"), "{body}");

    let resp = s
        .client
        .post(s.url("/api/instances"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert_error_shape(&resp.json().await.unwrap(), "INVALID_JSON");

    let (status, body) = s.post("/api/instances/ghost/start", json!({})).await;
    assert_eq!(status, 404);
    assert_error_shape(&body, "INSTANCE_NOT_FOUND");

    let (status, body) = s.get("/api/nope").await;
    assert_eq!(status, 404);
    assert_error_shape(&body, "NOT_FOUND");

    let (status, body) = s.get("/api/instances/ghost/logs?level=loud").await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn a_file_that_is_not_gguf_is_refused_by_paddocks_own_check() {
    let s = server();
    let dir = tempfile::tempdir().unwrap();
    for (file, bytes, expect) in [
        ("elf.gguf", &b"\x7fELF\x02\x01\x01\x00 rest of a binary"[..], "not a GGUF file"),
        ("truncated.gguf", &std::fs::read(model_path()).unwrap()[..10_000_000], "truncated"),
        ("empty.gguf", &b""[..], "empty"),
    ] {
        let path = dir.path().join(file);
        std::fs::write(&path, bytes).unwrap();
        let (status, body) = s.post("/api/instances", json!({ "name": "bogus", "model_path": path })).await;
        assert_eq!(status, 400, "{file}: {body}");
        assert_error_shape(&body, "INVALID_MODEL");
        let details = body["details"].as_str().unwrap();
        assert!(details.contains(file) && details.contains(expect), "{file}: {details}");
    }
    assert_eq!(s.get("/api/instances/bogus").await.0, 404, "nothing was created");
}

/// A model that vanishes after creation: the start fails, the reason is in GET and the logs,
/// `auto_restart` retries `max_restarts` times, then the instance stays failed; once the file is
/// back, a manual start works.
#[tokio::test]
async fn a_start_that_cannot_load_fails_with_its_reason_and_is_retried() {
    let s = server();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("vanishing.gguf");
    std::fs::copy(model_path(), &copy).unwrap();
    let (status, body) = s
        .post(
            "/api/instances",
            json!({ "name": "vanish", "model_path": copy, "restart_delay": 0.1, "max_restarts": 2, "options": { "ctx_size": 256, "parallel": 1, "threads": 1 } }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    std::fs::remove_file(&copy).unwrap();
    let (status, _) = s.post("/api/instances/vanish/start", json!({})).await;
    assert_eq!(status, 200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let failed = loop {
        let (_, body) = s.get("/api/instances/vanish").await;
        if body["status"] == "failed" && body["restarts"] == 2 {
            break body;
        }
        assert!(std::time::Instant::now() < deadline, "never settled as failed after 2 restarts: {body}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(failed["error"].as_str().unwrap().contains("vanishing.gguf"), "the reason names the file: {failed}");
    let (_, logs) = s.get("/api/instances/vanish/logs?level=warn").await;
    let messages: Vec<&str> = logs["logs"].as_array().unwrap().iter().map(|l| l["message"].as_str().unwrap()).collect();
    assert!(messages.iter().any(|m| m.starts_with("start failed")), "{messages:?}");
    assert!(messages.iter().any(|m| m.starts_with("restart 2 of 2")), "{messages:?}");
    assert!(messages.iter().any(|m| m.contains("giving up after 2")), "{messages:?}");
    let (_, alerts) = s.get("/api/system/alerts").await;
    let alert = alerts["alerts"].as_array().unwrap().iter().find(|a| a["instance"] == "vanish");
    let alert = alert.unwrap_or_else(|| panic!("giving up raises an alert: {alerts}"));
    assert!(alert["message"].as_str().unwrap().contains("giving up after 2"), "{alert}");
    assert!(alert["time"].is_string(), "{alert}");
    assert!(
        logs["logs"].as_array().unwrap().iter().all(|l| l["level"] == "warn" || l["level"] == "error"),
        "level=warn keeps warn and above only: {logs}"
    );

    std::fs::copy(model_path(), &copy).unwrap();
    let (status, _) = s.post("/api/instances/vanish/start", json!({})).await;
    assert_eq!(status, 200);
    let running = s.wait_status("vanish", "running").await;
    assert_eq!(running["restarts"], 0, "a manual start resets the count");
    let (status, _) = s.post("/api/instances/vanish/stop", json!({ "force": true })).await;
    assert_eq!(status, 200);
    assert_eq!(s.delete("/api/instances/vanish").await.0, 200);
}

#[tokio::test]
async fn system_status_info_and_config() {
    let s = server();
    let (status, body) = s.get("/api/system/status").await;
    assert_eq!(status, 200);
    let total = body["instances"]["total"].as_u64().unwrap();
    let by_status: u64 = ["running", "starting", "stopping", "stopped", "failed", "restarting"]
        .iter()
        .map(|k| body["instances"][k].as_u64().unwrap())
        .sum();
    assert_eq!(total, by_status, "{body}");
    assert!(body["resources"]["memory_total"].as_u64().unwrap() > 1 << 30, "{body}");
    assert!(body["resources"]["process_memory"].as_u64().unwrap() > 0, "{body}");
    assert!(body["resources"]["cpu_usage"].as_f64().is_some(), "{body}");
    let disk = body["resources"]["disk_usage"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&disk), "{body}");

    let (status, info) = s.get("/api/system/info").await;
    assert_eq!(status, 200);
    assert!(!info["hostname"].as_str().unwrap().is_empty());
    assert_eq!(info["memory_total"], body["resources"]["memory_total"]);
    assert!(info["build_time"].as_str().unwrap().starts_with("20"), "{info}");

    let (status, config) = s.get("/api/config").await;
    assert_eq!(status, 200);
    assert_eq!(config["host"], "127.0.0.1");
    assert_eq!(config["on_demand_start_timeout"], 120);
}

#[tokio::test]
async fn logs_follow_streams_new_lines() {
    use futures::StreamExt;
    let s = server();
    let (status, _) = s
        .post("/api/instances", json!({ "name": "follow", "model_path": model_path(), "options": { "ctx_size": 256, "parallel": 1, "threads": 1 } }))
        .await;
    assert_eq!(status, 201);
    let resp = s.client.get(s.url("/api/instances/follow/logs?follow=true&lines=1&level=info")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut stream = resp.bytes_stream();
    s.post("/api/instances/follow/start", json!({})).await;
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !seen.contains("\"message\":\"running\"") {
        assert!(std::time::Instant::now() < deadline, "no 'running' line followed: {seen}");
        let chunk =
            tokio::time::timeout(std::time::Duration::from_secs(60), stream.next()).await.unwrap().unwrap().unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let lines = crate::common::parse_sse(&seen);
    let first: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(
        first["message"],
        "instance created with model ".to_string() + model_path().to_str().unwrap(),
        "the tail (lines=1) comes first"
    );
    assert!(lines.iter().any(|l| l.contains("starting: loading model")), "{seen}");
    assert!(!seen.contains("\"level\":\"debug\""), "level=info filters debug lines");
    drop(stream);
    s.post("/api/instances/follow/stop", json!({ "force": true })).await;
}
