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
    let (status, body) = s
        .post(
            "/api/instances",
            json!({ "name": "life", "model_path": model_path(), "port": 8081, "options": { "ctx_size": 512, "parallel": 1, "threads": 1 } }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["message"], "Instance created successfully");
    assert_eq!(body["instance"]["name"], "life");
    assert_eq!(body["instance"]["status"], "stopped");
    assert_eq!(body["instance"]["port"], 8081);
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

    let (status, body) = s.post("/api/instances/life/start", json!({})).await;
    assert_eq!(status, 409, "starting a running instance: {body}");
    assert_error_shape(&body, "INVALID_STATE");
    let (status, body) = s.delete("/api/instances/life").await;
    assert_eq!(status, 409, "deleting a running instance: {body}");
    assert_error_shape(&body, "INSTANCE_BUSY");

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
    let (status, body) = s.post("/api/instances", json!({ "name": "nofile", "model_path": "/nonexistent/x.gguf" })).await;
    assert_eq!(status, 400);
    assert_error_shape(&body, "MODEL_NOT_FOUND");
    assert!(body["details"].as_str().unwrap().contains("/nonexistent/x.gguf"));

    let (status, body) = s.post("/api/instances", json!({ "name": "bad name!", "model_path": model_path() })).await;
    assert_eq!(status, 400);
    assert_error_shape(&body, "INVALID_NAME");

    let (status, body) = s
        .post("/api/instances", json!({ "name": "opts", "model_path": model_path(), "options": { "flash": true } }))
        .await;
    assert_eq!(status, 422, "{body}");
    assert_error_shape(&body, "INVALID_JSON");
    assert!(body["details"].as_str().unwrap().contains("flash"), "names the unknown option: {body}");

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
async fn a_start_that_cannot_load_fails_with_its_reason() {
    let s = server();
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("not-a-model.gguf");
    std::fs::write(&bogus, b"GGUF but not really a model file at all").unwrap();
    let (status, body) = s.post("/api/instances", json!({ "name": "bogus", "model_path": bogus })).await;
    assert_eq!(status, 201, "{body}");
    let (status, _) = s.post("/api/instances/bogus/start", json!({})).await;
    assert_eq!(status, 200);
    let failed = s.wait_status("bogus", "failed").await;
    let reason = failed["error"].as_str().unwrap();
    assert!(reason.contains("not-a-model.gguf"), "the reason names the file: {reason}");

    let (_, logs) = s.get("/api/instances/bogus/logs?level=error").await;
    assert!(
        logs["logs"].as_array().unwrap().iter().any(|l| l["message"].as_str().unwrap().contains("start failed")),
        "{logs}"
    );
    // The process survived llama.cpp's failure, and the instance can be deleted.
    let (status, _) = s.delete("/api/instances/bogus").await;
    assert_eq!(status, 200);
}
