//! The model registry of the admin API, on a server whose `model_dirs` hold the test model
//! (hard-linked, so nothing large is copied), a split model with a part missing, and a file
//! that is not a GGUF.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::common::{model_path, spawn_server, TestServer};

fn link(src: &Path, dst: &Path) {
    if std::fs::hard_link(src, dst).is_err() {
        std::fs::copy(src, dst).unwrap();
    }
}

struct Fixture {
    server: TestServer,
    dir: PathBuf,
    _keep: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let keep = tempfile::tempdir().unwrap();
    let dir = keep.path().to_path_buf();
    link(&model_path(), &dir.join("gemma.gguf"));
    std::fs::create_dir(dir.join("split")).unwrap();
    link(&model_path(), &dir.join("split/tiny-00001-of-00002.gguf"));
    std::fs::write(dir.join("broken.gguf"), b"this is not a model at all").unwrap();
    let dirs = vec![dir.clone()];
    let server = spawn_server(move |c| c.model_dirs = dirs);
    Fixture { server, dir, _keep: keep }
}

fn model<'a>(list: &'a Value, id: &str) -> &'a Value {
    list["models"].as_array().unwrap().iter().find(|m| m["id"] == id).unwrap_or_else(|| panic!("{id} in {list}"))
}

#[tokio::test]
async fn the_registry_reads_headers_estimates_memory_and_flags_bad_files() {
    let f = fixture();
    let s = &f.server;
    let (status, list) = s.get("/api/admin/models?context=2048").await;
    assert_eq!(status, 200, "{list}");

    let gemma = model(&list, "gemma");
    assert_eq!(gemma["architecture"], "gemma3");
    assert_eq!(gemma["architecture_supported"], true);
    assert_eq!(gemma["quantization"], "Q4_K_M");
    assert_eq!(gemma["context_length"], 32768);
    assert_eq!(gemma["complete"], true);
    assert_eq!(gemma["trust_level"], "Local");
    assert_eq!(gemma["source"]["kind"], "local");
    assert_eq!(gemma["size_bytes"], std::fs::metadata(model_path()).unwrap().len());
    assert_eq!(
        gemma["shards"],
        json!([{ "index": 0, "filename": "gemma.gguf", "present": true, "size_bytes": gemma["size_bytes"] }])
    );
    // llama.cpp counts the same weights when it loads the model (the instance's `n_params`).
    assert_eq!(gemma["parameter_count"], 268_098_176);
    // llama.cpp allocates 18 layers × 2048 cells × 1 KV head × (256 + 256) dims × 2 bytes (its
    // log: 6 MiB non-SWA + 30 MiB SWA at 2048 cells).
    let estimate = &gemma["memory_estimate"];
    assert_eq!(estimate["context"], 2048);
    assert_eq!(estimate["kv_bytes"], 36 << 20, "{estimate}");
    let weights = estimate["weights_bytes"].as_u64().unwrap();
    let size = gemma["size_bytes"].as_u64().unwrap();
    // The tensor data (most of the file) plus the vocabulary's tables and repacked copies.
    assert!(weights > size && weights < size * 3 / 2, "weights {weights} for a file of {size}");
    assert_eq!(
        estimate["total_bytes"].as_u64().unwrap(),
        weights + estimate["kv_bytes"].as_u64().unwrap() + estimate["compute_bytes"].as_u64().unwrap()
    );
    assert_eq!(gemma["used_by"], json!([]));
    assert_eq!(gemma["loaded"], false);

    let split = model(&list, "tiny");
    assert_eq!(split["complete"], false);
    assert_eq!(split["parameter_count"], Value::Null, "unknown while a part is missing");
    let present: Vec<bool> =
        split["shards"].as_array().unwrap().iter().map(|p| p["present"].as_bool().unwrap()).collect();
    assert_eq!(present, [true, false]);
    assert_eq!(split["shards"][1]["filename"], "tiny-00002-of-00002.gguf");

    let broken = model(&list, "broken");
    assert!(broken["error"].as_str().unwrap().contains("not a GGUF"), "{broken}");
    assert_eq!(broken["memory_estimate"], Value::Null);
    let (status, body) = s.get("/api/admin/models/broken/metadata").await;
    assert_eq!((status, body["code"].as_str()), (400, Some("INVALID_MODEL")), "{body}");
    assert!(body["details"].as_str().unwrap().contains("not a GGUF"), "{body}");

    let (status, body) = s.get("/api/admin/models/nope").await;
    assert_eq!((status, body["code"].as_str()), (404, Some("MODEL_NOT_FOUND")), "{body}");
    let (status, body) = s.get("/api/admin/models?context=lots").await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn metadata_has_the_seed_shape_without_the_vocabulary() {
    let f = fixture();
    let (status, meta) = f.server.get("/api/admin/models/gemma/metadata").await;
    assert_eq!(status, 200, "{meta}");
    assert_eq!(meta["model_id"], "gemma");
    assert_eq!(meta["general"]["architecture"], "gemma3");
    assert_eq!(meta["general"]["quantization"], "Q4_K_M");
    assert_eq!(meta["general"]["file_type"], 15);
    assert_eq!(meta["model"]["block_count"], 18);
    assert_eq!(meta["model"]["context_length"], 32768);
    assert_eq!(meta["model"]["head_count_kv"], 1);
    assert_eq!(meta["model"]["vocab_size"], 262_144);
    assert_eq!(meta["tokenizer"]["has_chat_template"], false, "the test model has no template");
    assert!(meta["tokenizer"]["eos_token_id"].is_u64(), "{}", meta["tokenizer"]);
    assert!(meta["tensors"]["count"].as_u64().unwrap() > 100);
    let raw = meta["raw"].as_array().unwrap();
    let value = |key: &str| raw.iter().find(|kv| kv["key"] == key).map(|kv| kv["value"].clone());
    assert_eq!(value("general.architecture"), Some(json!("gemma3")));
    assert_eq!(value("tokenizer.ggml.tokens"), None, "the vocabulary is left out");
    let omitted = meta["omitted"].as_array().unwrap();
    assert!(omitted.contains(&json!({ "key": "tokenizer.ggml.tokens", "length": 262_144 })), "{omitted:?}");
    // Floats read as their shortest decimal, as the file's writer meant them.
    let eps = value("gemma3.attention.layer_norm_rms_epsilon").unwrap();
    assert_eq!(eps, json!(1e-6), "{eps}");
}

#[tokio::test]
async fn rescans_report_changes_and_models_in_use_are_protected() {
    let f = fixture();
    let s = &f.server;
    let (status, first) = s.post("/api/admin/rescan-shards", json!({})).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["status"], "ok");
    let (_, again) = s.post("/api/admin/rescan-shards", json!({})).await;
    assert_eq!((again["count"].clone(), again["models_updated"].clone()), (json!(0), json!([])), "nothing changed");

    link(&model_path(), &f.dir.join("spare.gguf"));
    let (_, added) = s.post("/api/admin/rescan-shards", json!({})).await;
    assert_eq!(added["models_updated"], json!(["spare"]), "{added}");
    assert_eq!(added["count"], 1);

    // An instance of gemma.gguf: the model is in use, loaded once it starts.
    let path = f.dir.join("gemma.gguf");
    let (status, body) = s
        .post(
            "/api/instances/uses-gemma",
            json!({ "model_path": path, "options": { "context_size": 1024, "parallel": 1 } }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = s.delete("/api/admin/models/gemma").await;
    assert_eq!((status, body["code"].as_str()), (409, Some("MODEL_IN_USE")), "{body}");
    assert!(body["details"].as_str().unwrap().contains("uses-gemma"), "{body}");
    assert!(path.exists());

    let (status, body) = s.post("/api/instances/uses-gemma/start", json!({})).await;
    assert!(status < 300, "{body}");
    s.wait_status("uses-gemma", "running").await;
    let (_, gemma) = s.get("/api/admin/models/gemma").await;
    assert_eq!((gemma["used_by"].clone(), gemma["loaded"].clone()), (json!(["uses-gemma"]), json!(true)));
    let (_, storage) = s.get("/api/admin/shard-storage").await;
    let entry = storage["models"].as_array().unwrap().iter().find(|m| m["id"] == "gemma").unwrap().clone();
    assert_eq!(entry["loaded"], true, "{storage}");
    assert!(entry["memory_bytes"].as_u64().unwrap() > 0, "{entry}");

    let (status, unloaded) = s.post("/api/admin/models/gemma/unload", json!({})).await;
    assert_eq!(status, 200, "{unloaded}");
    assert_eq!(unloaded["status"], "unloaded");
    assert_eq!(unloaded["segments_removed"], 1);
    assert_eq!(unloaded["instances_stopped"], json!(["uses-gemma"]));
    assert!(unloaded["estimated_freed_mb"].as_u64().unwrap() > 100, "{unloaded}");
    let (_, instance) = s.get("/api/instances/uses-gemma").await;
    assert_eq!(instance["status"], "stopped");
    assert!(path.exists(), "unloading keeps the files");

    // A model nobody uses is deleted, files and all.
    let (status, deleted) = s.delete("/api/admin/models/spare").await;
    assert_eq!(status, 200, "{deleted}");
    assert!(!f.dir.join("spare.gguf").exists());
    let (_, list) = s.get("/api/admin/models").await;
    assert!(list["models"].as_array().unwrap().iter().all(|m| m["id"] != "spare"), "{list}");
}

#[tokio::test]
async fn the_node_reports_its_devices_and_build() {
    let f = fixture();
    let (status, stats) = f.server.get("/api/admin/stats").await;
    assert_eq!(status, 200, "{stats}");
    let devices = stats["devices"].as_array().unwrap();
    assert!(devices.iter().any(|d| d["type"] == "cpu"), "llama.cpp sees the CPU: {devices:?}");
    assert!(stats["memory_total"].as_u64().unwrap() > 0);
    assert_eq!(stats["models"], 3, "{stats}");
    let (_, version) = f.server.get("/api/admin/version").await;
    assert_eq!(version["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(version["llama_cpp_2"], "0.1.160");
}
