//! Instances survive restarts of paddock, and a kill -9 in the middle of a burst of changes
//! loses no acknowledged change and leaves the database intact. Runs the real binary.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "common/mod.rs"]
mod common;

use common::process::{client, Paddock};

/// A paddock whose rate limits are off: the burst below creates far more instances per minute
/// than the default limit allows.
async fn start(data: &Path) -> Paddock {
    std::fs::write(data.join("paddock.yaml"), "rate_limits: {management: null, heavy: null}\n").unwrap();
    Paddock::start(data, &[]).await
}

async fn get(base: &str, path: &str) -> Value {
    client().get(format!("{base}{path}")).send().await.unwrap().json().await.unwrap()
}

#[tokio::test]
async fn instances_survive_restart_and_kill_9_loses_no_acknowledged_change() {
    let model = common::model_path();
    let data = tempfile::tempdir().unwrap();
    let mut first = start(data.path()).await;
    let c = client();
    let small = json!({ "ctx_size": 256, "parallel": 1, "threads": 1 });
    for name in ["keep", "cold"] {
        let r = c
            .post(format!("{}/api/instances", first.base))
            .json(&json!({ "name": name, "model_path": model, "options": small }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
    }
    c.post(format!("{}/api/instances/keep/start", first.base)).send().await.unwrap();
    first.wait_status("keep", "running").await;

    // A burst of creates and updates from 8 concurrent clients; kill -9 once 20 are acknowledged.
    let acked_creates = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let acked_threads = Arc::new(AtomicUsize::new(0));
    let acks = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let (base, model, creates, threads, acks) =
            (first.base.clone(), model.clone(), acked_creates.clone(), acked_threads.clone(), acks.clone());
        tasks.push(tokio::spawn(async move {
            let c = client();
            for i in 0..40 {
                let name = format!("burst-{worker}-{i}");
                let create = c
                    .post(format!("{base}/api/instances"))
                    .json(&json!({ "name": name, "model_path": model }))
                    .send()
                    .await;
                match create {
                    Ok(r) if r.status().as_u16() == 201 => creates.lock().push(name),
                    _ => return,
                }
                acks.fetch_add(1, Ordering::SeqCst);
                // Updates of one instance come from worker 0 only, in order, so the last
                // acknowledged value is the lower bound of what must survive.
                if worker == 0 {
                    let value = i + 1;
                    let r = c
                        .put(format!("{base}/api/instances/cold"))
                        .json(&json!({ "options": { "threads": value } }))
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status().as_u16() == 200 => threads.store(value, Ordering::SeqCst),
                        _ => return,
                    }
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while acks.load(Ordering::SeqCst) < 20 {
        assert!(Instant::now() < deadline, "the burst did not get going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.kill9();
    for t in tasks {
        let _ = t.await;
    }
    let acked = acked_creates.lock().clone();
    let min_threads = acked_threads.load(Ordering::SeqCst);
    assert!(acked.len() >= 20);

    let db = data.path().join("paddock.db");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(check, "ok");
    }

    let second = start(data.path()).await;
    let list = get(&second.base, "/api/instances").await;
    let names: Vec<&str> = list["instances"].as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
    for name in &acked {
        assert!(names.contains(&name.as_str()), "acknowledged create of {name} lost; have {names:?}");
    }
    let cold = get(&second.base, "/api/instances/cold").await;
    let threads = cold["options"]["threads"].as_u64().unwrap_or(0) as usize;
    assert!(threads >= min_threads, "acknowledged update lost: threads {threads} < {min_threads}");
    assert_eq!(cold["status"], "stopped", "an instance that was stopped stays stopped");
    // The instance that was running comes back up by itself.
    let keep = second.wait_status("keep", "running").await;
    assert_eq!(keep["options"]["context_size"], 256);
}

/// `POST /api/admin/shutdown` drains and stops the instances, then the process exits cleanly.
#[tokio::test(flavor = "multi_thread")]
async fn the_admin_shutdown_route_ends_the_process_cleanly() {
    let data = tempfile::tempdir().unwrap();
    let mut p = start(data.path()).await;
    let resp = client().post(format!("{}/api/admin/shutdown", p.base)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], "shutting_down");
    let status = p.wait_exit(Duration::from_secs(30)).expect("paddock did not exit");
    assert!(status.success(), "{status}");
}
