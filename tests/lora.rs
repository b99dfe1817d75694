//! LoRA adapters on an instance: loaded with the model, scaled per instance and per request.
//! tests/fixtures/gguf_variants.py (llama.cpp's gguf-py) writes a small random rank-4 adapter
//! for the test model that visibly changes its greedy output.

use serde_json::{json, Value};

mod common;

async fn greedy(s: &common::TestServer, name: &str, extra: Value) -> String {
    let mut body = json!({ "prompt": "The capital of France is", "n_predict": 6, "temperature": 0 });
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let (status, out) = s.post(&format!("/llama-cpp/{name}/completion"), body).await;
    assert_eq!(status, 200, "{out}");
    out["content"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn adapters_change_output_by_instance_and_request_scale() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("lora.gguf");
    common::gguf_variant("lora", &adapter);

    // Adapters may be registered from the adapter's directory (a model dir) and no other.
    let model_dir = common::model_path().parent().unwrap().to_path_buf();
    let adapter_dir = dir.path().to_path_buf();
    let s = common::spawn_server(move |c| c.model_dirs = vec![adapter_dir, model_dir]);
    let options = |lora: Value| json!({ "context_size": 1024, "parallel": 2, "threads": 2, "lora": lora });

    // Registered by id, with rank and alpha read from the file; the instance attaches it by id.
    let (status, body) = s.post("/api/admin/adapters", json!({ "id": "tuned-lora", "path": adapter })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ok");
    assert_eq!((body["adapter"]["rank"].as_u64(), body["adapter"]["alpha"].as_f64()), (Some(4), Some(8.0)), "{body}");
    assert_eq!(body["adapter"]["name"], "tuned-lora");
    let (_, list) = s.get("/api/admin/adapters").await;
    assert_eq!(list["adapters"][0]["id"], "tuned-lora", "{list}");

    s.running_instance("base", options(json!([]))).await;
    s.running_instance("tuned", options(json!([{ "adapter": "tuned-lora", "scale": 1.0 }]))).await;

    let base = greedy(&s, "base", json!({})).await;
    let tuned = greedy(&s, "tuned", json!({})).await;
    assert_ne!(base, tuned, "the adapter changes the greedy answer");
    let off = greedy(&s, "tuned", json!({ "lora": [{ "id": 0, "scale": 0.0 }] })).await;
    assert_eq!(off, base, "scale 0 for one request is the base model");

    let (status, list) = s.get("/llama-cpp/tuned/lora-adapters").await;
    assert_eq!(status, 200);
    assert_eq!(list[0]["id"], 0);
    assert_eq!(list[0]["scale"], 1.0);
    assert!(list[0]["path"].as_str().unwrap().ends_with("lora.gguf"), "{list}");

    // The instance's scale changes for later requests; the prefix cached under the adapter is
    // not reused for them (its KV was computed with the adapter on).
    let (status, list) = s.post("/llama-cpp/tuned/lora-adapters", json!([{ "id": 0, "scale": 0.0 }])).await;
    assert_eq!((status, &list[0]["scale"]), (200, &json!(0.0)), "{list}");
    assert_eq!(greedy(&s, "tuned", json!({})).await, base);
    assert_eq!(greedy(&s, "tuned", json!({ "lora": [{ "id": 0, "scale": 1.0 }] })).await, tuned);

    // Requests with different scales run at once: llama.cpp applies adapters per context, so
    // the engine alternates decode steps between the two groups; each gets its own answer.
    let long = |scale: f64| {
        let s = &s;
        async move {
            let body = json!({ "prompt": "The capital of France is", "n_predict": 6, "temperature": 0,
                               "lora": [{ "id": 0, "scale": scale }], "stream": true });
            let events = s.stream("/llama-cpp/tuned/completion", body).await;
            events
                .iter()
                .map(|e| serde_json::from_str::<Value>(e).unwrap()["content"].as_str().unwrap().to_string())
                .collect::<String>()
        }
    };
    let (with, without) = tokio::join!(long(1.0), long(0.0));
    assert_eq!((with, without), (tuned.clone(), base.clone()));

    // Bad scales and ids are refused before anything runs.
    let (status, body) = s
        .post(
            "/llama-cpp/tuned/completion",
            json!({ "prompt": "x", "n_predict": 1, "lora": [{ "id": 3, "scale": 1.0 }] }),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "INVALID_LORA", "{body}");
    let (status, _) = s.post("/llama-cpp/tuned/lora-adapters", json!([{ "id": -1, "scale": 1.0 }])).await;
    assert_eq!(status, 400);
    let two = json!([{ "path": adapter, "scale": 1.0 }, { "path": adapter, "scale": 0.5 }]);
    let (status, body) = s
        .post("/api/instances", json!({ "name": "two", "model_path": common::model_path(), "options": options(two) }))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["details"].as_str().unwrap().contains("one LoRA adapter at a time"), "{body}");

    // Registration refuses what llama.cpp could not load, and paths outside the allowed dirs.
    let safetensors = dir.path().join("adapter.safetensors");
    let header = br#"{"__metadata__":{}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    std::fs::write(&safetensors, bytes).unwrap();
    let outside = tempfile::NamedTempFile::new().unwrap();
    for (path, says) in [
        (safetensors.to_str().unwrap(), "convert_lora_to_gguf.py"),
        (common::model_path().to_str().unwrap(), "not a LoRA adapter"),
        ("../../etc/passwd", "'..'"),
        (outside.path().to_str().unwrap(), "outside the directories"),
        ("missing.gguf", "No such file"),
    ] {
        let (status, body) = s.post("/api/admin/adapters", json!({ "path": path })).await;
        assert_eq!((status, body["code"].as_str()), (400, Some("INVALID_ADAPTER")), "{path}: {body}");
        assert!(body["details"].as_str().unwrap().contains(says), "{path}: {body}");
    }
    let (status, body) = s.post("/api/admin/adapters", json!({ "id": "tuned-lora", "path": adapter })).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("ADAPTER_EXISTS")), "{body}");
    let unknown = json!([{ "adapter": "nope", "scale": 1.0 }]);
    let (status, body) = s
        .post("/api/instances", json!({ "name": "x", "model_path": common::model_path(), "options": options(unknown) }))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["details"].as_str().unwrap().contains("no adapter 'nope'"), "{body}");
    let (status, body) = s.delete("/api/admin/adapters/tuned-lora").await;
    assert_eq!((status, body["message"].as_str()), (200, Some("Adapter 'tuned-lora' removed")), "{body}");
    assert!(adapter.is_file(), "the file stays");
    let (status, _) = s.delete("/api/admin/adapters/tuned-lora").await;
    assert_eq!(status, 404);
    // An adapter file that is not there fails the start with the reason.
    let missing = json!([{ "path": dir.path().join("nope.gguf") }]);
    let (status, _) = s
        .post("/api/instances", json!({ "name": "broken", "model_path": common::model_path(), "options": options(missing), "auto_restart": false }))
        .await;
    assert_eq!(status, 201);
    s.post("/api/instances/broken/start", json!({})).await;
    let failed = s.wait_status("broken", "failed").await;
    assert!(
        failed["error"].as_str().unwrap().contains("LoRA adapter")
            && failed["error"].as_str().unwrap().contains("nope.gguf"),
        "{failed}"
    );
}
