//! Hugging Face search, probe and downloads against a local server that speaks the hub's HTTP
//! API (`common::hub`: search, tree, resolve with a redirect and byte ranges) over the real test
//! model and a split copy of it. Runs the real binary, so a download can be killed with SIGKILL.

use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

use common::hub::{hub, requests_for, sha256_file, CORRUPT, FAST, SLOW, SLOW_STOP, SPLIT};
use common::process::{client, Paddock};

// ---------------------------------------------------------------------------------------------
// Paddock, as a process.

/// Paddock with its hub at `endpoint`.
async fn start(data: &Path, endpoint: &str) -> Paddock {
    Paddock::start(data, &["--hf-endpoint", endpoint]).await
}

async fn download(p: &Paddock, repo: &str, filename: &str, shards: Option<Vec<u32>>) -> Value {
    let mut body = json!({ "repo_id": repo, "filename": filename });
    if let Some(s) = shards {
        body["shards"] = json!(s);
    }
    let (status, body) = p.post("/api/admin/hf/download-shards", body).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "downloading");
    body
}

/// Waits until `pred` holds for the download `id`, and returns it.
async fn wait_download(p: &Paddock, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, list) = p.get("/api/admin/downloads").await;
        let found = list["downloads"].as_array().and_then(|d| d.iter().find(|d| d["id"] == id)).cloned();
        if let Some(d) = found.filter(|d| pred(d)) {
            return d;
        }
        assert!(Instant::now() < deadline, "download {id} never became {what}: {list}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn models_dir_files(data: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(data.join("models"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn is_done(status: &'static str) -> impl Fn(&Value) -> bool {
    move |d| d["status"] == status
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn search_probe_and_downloads_of_whole_and_split_models() {
    let (hub_url, _) = hub();
    let data = tempfile::tempdir().unwrap();
    let p = start(data.path(), hub_url).await;

    // Search: GGUF repositories, most downloaded first, variants grouped, Q4_K_M recommended.
    let (status, hits) = p.get("/api/admin/hf/search?query=gemma%20270m&limit=10").await;
    assert_eq!(status, 200, "{hits}");
    let hits = hits.as_array().unwrap();
    let ids: Vec<&str> = hits.iter().map(|h| h["repo_id"].as_str().unwrap()).collect();
    assert_eq!(ids[..2], [FAST, SPLIT], "{ids:?}");
    let fast = &hits[0];
    assert_eq!(fast["downloads"], 900);
    assert_eq!(fast["recommended_variant"], "Q4_K_M");
    assert_eq!(fast["recommended_filename"], "gemma-3-270m-Q4_K_M.gguf");
    assert_eq!(fast["fits_memory"], true, "a 250 MB model fits this machine: {fast}");
    assert_eq!(fast["fits_vram"], false, "no GPU here");
    assert_eq!(fast["variants"].as_array().unwrap().len(), 1, "README.md is no variant: {fast}");
    let model_size = std::fs::metadata(common::model_path()).unwrap().len();
    assert_eq!(fast["variants"][0]["size_bytes"], model_size);
    let split = &hits[1];
    assert_eq!(split["variants"][0]["filename"], "gemma-3-270m-split-Q4_K_M-00001-of-00002.gguf");
    assert_eq!(split["variants"][0]["parts"].as_array().unwrap().len(), 2);
    let (status, none) = p.get("/api/admin/hf/search?query=llama").await;
    assert_eq!((status, none), (200, json!([])));

    // Probe a later part: the whole model's layout.
    let part2 = "gemma-3-270m-split-Q4_K_M-00002-of-00002.gguf";
    let (status, probe) = p.get(&format!("/api/admin/hf/probe?repo_id={SPLIT}&filename={part2}")).await;
    assert_eq!(status, 200, "{probe}");
    assert_eq!(probe["split"], true);
    assert_eq!(probe["shard_count"], 2);
    assert_eq!(probe["model_id"], "gemma-3-270m-split-Q4_K_M");
    assert_eq!(probe["parts"][1]["filename"], part2);
    assert_eq!(probe["parts"][1]["present"], false);
    let split_size: u64 = probe["parts"].as_array().unwrap().iter().map(|p| p["size_bytes"].as_u64().unwrap()).sum();
    assert_eq!(probe["size_bytes"], split_size);

    // Bad input: clear errors, nothing started.
    for (query, code, param) in [
        (format!("repo_id=../etc&filename={part2}"), 400, "repo_id"),
        (format!("repo_id={SPLIT}&filename=../../x.gguf"), 400, "filename"),
        (format!("repo_id={SPLIT}&filename=missing.gguf"), 404, ""),
        (format!("repo_id=paddock-test/nope&filename={part2}"), 404, ""),
    ] {
        let (status, body) = p.get(&format!("/api/admin/hf/probe?{query}")).await;
        assert_eq!(status, code, "{query}: {body}");
        assert!(body["error"].is_string() && body["code"].is_string(), "{body}");
        if !param.is_empty() {
            assert!(body["details"].as_str().unwrap().contains(param), "{body}");
        }
    }
    let (status, body) =
        p.post("/api/admin/hf/download-shards", json!({ "repo_id": SPLIT, "filename": part2, "shards": [2] })).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["details"].as_str().unwrap().contains("2 parts"), "{body}");

    // Only the second part of the split model: the registry sees an incomplete model.
    let started = download(&p, SPLIT, part2, Some(vec![1])).await;
    let id = started["model_id"].as_str().unwrap().to_string();
    let done = wait_download(&p, &id, "completed", is_done("completed")).await;
    assert_eq!(done["files"].as_array().unwrap().len(), 1, "{done}");
    assert_eq!(done["progress"], 1.0);
    let (_, model) = p.get(&format!("/api/admin/models/{id}")).await;
    assert_eq!(model["complete"], false, "{model}");
    let present: Vec<bool> =
        model["shards"].as_array().unwrap().iter().map(|s| s["present"].as_bool().unwrap()).collect();
    assert_eq!(present, [false, true], "{model}");

    // The rest: only the missing part is fetched.
    let before = requests_for(part2).len();
    download(&p, SPLIT, part2, None).await;
    let done = wait_download(&p, &id, "completed", is_done("completed")).await;
    assert_eq!(requests_for(part2).len(), before, "the part already here is not fetched again");
    assert_eq!(done["files"][0]["status"], "done");
    let (_, model) = p.get(&format!("/api/admin/models/{id}")).await;
    assert_eq!(model["complete"], true, "{model}");
    assert_eq!(model["source"]["kind"], "huggingface");
    assert_eq!(model["source"]["repo_id"], SPLIT);
    assert_eq!(model["trust_level"], "Downloaded");
    assert_eq!(model["architecture"], "gemma3");
    let (status, meta) = p.get(&format!("/api/admin/models/{id}/metadata")).await;
    assert_eq!(status, 200, "{meta}");
    let (status, source) = p.get(&format!("/api/admin/hf/source/{id}")).await;
    assert_eq!((status, source["repo_id"].as_str()), (200, Some(SPLIT)), "{source}");

    // A whole model; asking again when it is here is `already_local`.
    // Followed live on the seed's WebSocket path: progress, then the activity and the refresh.
    let ws_url = format!("{}/api/admin/ws", p.base.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    let file = "gemma-3-270m-Q4_K_M.gguf";
    download(&p, FAST, file, None).await;
    let mut seen = Vec::new();
    while !seen.iter().any(|t| t == "models_changed") {
        let msg = tokio::time::timeout(Duration::from_secs(60), futures::StreamExt::next(&mut ws))
            .await
            .unwrap_or_else(|_| panic!("no models_changed on the socket; saw {seen:?}"))
            .unwrap()
            .unwrap();
        let Ok(text) = msg.to_text() else { continue };
        let event: Value = serde_json::from_str(text).unwrap();
        if event["type"] == "download_progress" && event["data"]["status"] == "completed" {
            assert_eq!(event["data"]["id"], "gemma-3-270m-Q4_K_M");
            assert_eq!(event["data"]["progress"], 1.0);
        }
        if event["type"] == "activity_event" {
            assert_eq!(event["data"]["toast_level"], "success", "{event}");
        }
        seen.push(event["type"].as_str().unwrap_or_default().to_string());
    }
    for kind in ["download_progress", "activity_event"] {
        assert!(seen.iter().any(|t| t == kind), "{kind} missing from {seen:?}");
    }
    let done = wait_download(&p, "gemma-3-270m-Q4_K_M", "completed", is_done("completed")).await;
    assert_eq!(done["downloaded_bytes"], model_size);
    assert_eq!(sha256_file(&data.path().join("models").join(file)), hub().1.repos[FAST].files[0].sha256);
    let (status, again) = p.post("/api/admin/hf/download-shards", json!({ "repo_id": FAST, "filename": file })).await;
    assert_eq!((status, again["status"].as_str()), (200, Some("already_local")), "{again}");
    let (status, ended) = p.post("/api/admin/downloads/gemma-3-270m-Q4_K_M/cancel", json!({})).await;
    assert_eq!((status, ended["code"].as_str()), (409, Some("DOWNLOAD_NOT_ACTIVE")), "{ended}");
    let (status, _) = p.post("/api/admin/downloads/nothing/cancel", json!({})).await;
    assert_eq!(status, 404);

    // Nothing half-written is left beside the models.
    let files = models_dir_files(data.path());
    assert!(
        files.iter().all(|f| !f.ends_with(".part") && !f.ends_with(".part.json") && !f.contains(".tmp")),
        "{files:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_or_killed_download_resumes_where_it_stopped() {
    let (hub_url, hub) = hub();
    let data = tempfile::tempdir().unwrap();
    let file = "gemma-3-270m-slow-Q4_K_M.gguf";
    let id = "gemma-3-270m-slow-Q4_K_M";
    let size = hub.repos[SLOW].files[0].size;
    let part = data.path().join("models").join(format!("{file}.part"));
    let mut p = start(data.path(), hub_url).await;

    download(&p, SLOW, file, None).await;
    let running = wait_download(&p, id, "a fifth done", |d| d["progress"].as_f64().unwrap() > 0.2).await;
    assert!(running["speed_bytes_per_sec"].as_u64().unwrap() > 0, "{running}");
    assert!(running["eta_secs"].as_u64().is_some(), "{running}");
    let (status, _) = p.post(&format!("/api/admin/downloads/{id}/cancel"), json!({})).await;
    assert_eq!(status, 200);
    let cancelled = wait_download(&p, id, "cancelled", is_done("cancelled")).await;
    let kept = std::fs::metadata(&part).expect("the part stays after a cancel").len();
    assert!(kept > size / 5, "{kept} bytes kept; {cancelled}");
    assert!(!data.path().join("models").join(file).exists(), "no file under the model's name yet");

    // Asked again: it goes on from the part, with a range.
    download(&p, SLOW, file, None).await;
    let resumed = wait_download(&p, id, "half done", |d| d["progress"].as_f64().unwrap() > 0.5).await;
    assert!(resumed["resumed_from_bytes"].as_u64().unwrap() >= kept, "{resumed}");
    let starts = requests_for(file);
    assert!(starts.len() >= 2 && starts[starts.len() - 1] >= kept, "range starts {starts:?}, kept {kept}");

    // SIGKILL mid-download; the next paddock resumes by itself and lands a verified file.
    p.kill9();
    let at_kill = std::fs::metadata(&part).unwrap().len();
    assert!(at_kill > size / 2 && at_kill < size, "{at_kill} of {size}");
    let p = start(data.path(), hub_url).await;
    let done = wait_download(&p, id, "completed", is_done("completed")).await;
    assert!(done["resumed_from_bytes"].as_u64().unwrap() >= at_kill, "{done}");
    let starts = requests_for(file);
    assert!(*starts.last().unwrap() >= at_kill, "the resumed request starts at the part's end: {starts:?}");
    let landed = data.path().join("models").join(file);
    assert_eq!(sha256_file(&landed), hub.repos[SLOW].files[0].sha256);
    let files = models_dir_files(data.path());
    assert_eq!(files, [file.to_string(), format!("{file}.source.json")], "{files:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupted_byte_fails_the_checksum_and_the_file_is_discarded() {
    let (hub_url, _) = hub();
    let data = tempfile::tempdir().unwrap();
    let p = start(data.path(), hub_url).await;
    download(&p, CORRUPT, "gemma-3-270m-corrupt-Q4_K_M.gguf", None).await;
    let failed = wait_download(&p, "gemma-3-270m-corrupt-Q4_K_M", "failed", is_done("failed")).await;
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("checksum mismatch") && error.contains("discarded"), "{failed}");
    assert_eq!(models_dir_files(data.path()), Vec::<String>::new(), "nothing is left");
    let (_, models) = p.get("/api/admin/models").await;
    assert_eq!(models["models"], json!([]));

    // A file of the same name that came from elsewhere is never overwritten nor taken for the download.
    let mine = data.path().join("models").join("gemma-3-270m-slow-Q4_K_M.gguf");
    std::fs::write(&mine, b"my own file").unwrap();
    let body = json!({ "repo_id": SLOW, "filename": "gemma-3-270m-slow-Q4_K_M.gguf" });
    let (status, refused) = p.post("/api/admin/hf/download-shards", body).await;
    assert_eq!((status, refused["code"].as_str()), (409, Some("DOWNLOAD_CONFLICT")), "{refused}");
    assert!(refused["details"].as_str().unwrap().contains("did not come from"), "{refused}");
    assert_eq!(std::fs::read(&mine).unwrap(), b"my own file");

    // A hub that cannot be reached is a 502 that names it, not a hang.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let offline = tempfile::tempdir().unwrap();
    let q = start(offline.path(), &format!("http://{closed}")).await;
    let (status, body) = q.get("/api/admin/hf/search?query=gemma").await;
    assert_eq!((status, body["code"].as_str()), (502, Some("HUB_UNREACHABLE")), "{body}");
    assert!(body["details"].as_str().unwrap().contains(&closed.to_string()), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_hf_repo_instance_downloads_its_model_then_chats() {
    let (hub_url, _) = hub();
    let data = tempfile::tempdir().unwrap();
    let p = start(data.path(), hub_url).await;
    let (status, body) = p
        .post(
            "/api/instances/hub-chat",
            json!({ "backend_type": "llama_cpp", "backend_options": { "hf_repo": FAST, "ctx_size": 512, "threads": 2 } }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = p.post("/api/instances/hub-chat/start", json!({})).await;
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, i) = p.get("/api/instances/hub-chat").await;
        match i["status"].as_str() {
            Some("running") => break,
            Some("failed") => panic!("the instance failed: {i}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "never running: {i}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logs = client()
        .get(format!("{}/api/instances/hub-chat/logs?lines=2000", p.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(logs.contains("downloading gemma-3-270m-Q4_K_M.gguf"), "{logs}");
    let (status, chat) = p
        .post(
            "/v1/chat/completions",
            json!({ "model": "hub-chat", "messages": [{ "role": "user", "content": "Hello" }], "max_tokens": 3 }),
        )
        .await;
    assert_eq!(status, 200, "{chat}");
    assert!(chat["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{chat}");
    let (_, models) = p.get("/api/admin/models").await;
    assert_eq!(models["models"][0]["source"]["repo_id"], FAST, "{models}");
}

#[tokio::test(flavor = "multi_thread")]
async fn stopping_an_hf_repo_instance_while_it_downloads_ends_the_start_at_once() {
    let (hub_url, _) = hub();
    let data = tempfile::tempdir().unwrap();
    let p = start(data.path(), hub_url).await;
    let create = json!({ "backend_type": "llama_cpp", "backend_options": { "hf_repo": SLOW_STOP } });
    let (status, body) = p.post("/api/instances/slow", create).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = p.post("/api/instances/slow/start", json!({})).await;
    assert_eq!(status, 200, "{body}");
    wait_download(&p, "stop-midway-Q4_K_M", "under way", |d| d["downloaded_bytes"].as_u64().unwrap() > 0).await;
    let asked = Instant::now();
    let (status, body) = p.post("/api/instances/slow/stop", json!({})).await;
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, i) = p.get("/api/instances/slow").await;
        if i["status"] == "stopped" {
            break;
        }
        assert!(Instant::now() < deadline, "still {} {:?} after the stop: {i}", i["status"], asked.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, d) = p.get("/api/admin/downloads").await;
    // The 40 MiB/s download takes over 6 s: the start ended before it did, and it goes on.
    assert_eq!(d["downloads"][0]["status"], "downloading", "stopped {:?} after asking: {d}", asked.elapsed());
}
