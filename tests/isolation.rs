//! `isolation: "process"`: an instance whose engine runs in a child `paddock instance-host`.
//! A llama.cpp abort in it — from a crafted model, or a SIGABRT mid-stream — ends that
//! instance alone: its requests get a clear error, other instances keep serving, paddock stays
//! up, and the supervisor restarts it by its policy. Output is the in-process engine's.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

use common::process::Paddock;

/// The test model with `output_norm.weight` declared I32 instead of F32: the same byte size,
/// so every offset and size still adds up and paddock's header check passes it, and llama.cpp
/// loads it; its first decode then aborts in ggml's CPU backend ("binary_op: unsupported
/// types: … src1: i32").
fn aborting_model(dir: &Path) -> PathBuf {
    let mut data = std::fs::read(common::model_path()).unwrap();
    let u32_at = |d: &[u8], o: usize| u32::from_le_bytes(d[o..o + 4].try_into().unwrap());
    let u64_at = |d: &[u8], o: usize| u64::from_le_bytes(d[o..o + 8].try_into().unwrap());
    let n_tensors = u64_at(&data, 8);
    let n_kv = u64_at(&data, 16);
    let mut off = 24;
    fn skip_value(d: &[u8], t: u32, off: usize) -> usize {
        let u64_at = |o: usize| u64::from_le_bytes(d[o..o + 8].try_into().unwrap()) as usize;
        match t {
            0 | 1 | 7 => off + 1,
            2 | 3 => off + 2,
            4..=6 => off + 4,
            10..=12 => off + 8,
            8 => off + 8 + u64_at(off),
            9 => {
                let item = u32::from_le_bytes(d[off..off + 4].try_into().unwrap());
                let n = u64_at(off + 4);
                (0..n).fold(off + 12, |o, _| skip_value(d, item, o))
            }
            _ => panic!("GGUF value type {t}"),
        }
    }
    for _ in 0..n_kv {
        off += 8 + u64_at(&data, off) as usize;
        let t = u32_at(&data, off);
        off = skip_value(&data, t, off + 4);
    }
    for _ in 0..n_tensors {
        let len = u64_at(&data, off) as usize;
        let name = String::from_utf8(data[off + 8..off + 8 + len].to_vec()).unwrap();
        off += 8 + len;
        let n_dims = u32_at(&data, off) as usize;
        off += 4 + 8 * n_dims;
        if name == "output_norm.weight" {
            assert_eq!(u32_at(&data, off), 0, "output_norm.weight is F32 in the test model");
            data[off..off + 4].copy_from_slice(&26u32.to_le_bytes()); // GGML_TYPE_I32
            let path = dir.join("aborting.gguf");
            std::fs::write(&path, data).unwrap();
            return path;
        }
        off += 4 + 8;
    }
    panic!("no output_norm.weight in the test model");
}

async fn create(p: &Paddock, name: &str, model: &Path, isolation: &str, policy: Value) {
    let mut body = json!({
        "model_path": model,
        "options": { "isolation": isolation, "context_size": 1024, "parallel": 2 },
        "restart_delay": 0.2,
    });
    body.as_object_mut().unwrap().extend(policy.as_object().unwrap().clone());
    let (status, body) = p.post(&format!("/api/instances/{name}"), body).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = p.post(&format!("/api/instances/{name}/start"), json!({})).await;
    assert_eq!(status, 200, "{body}");
}

async fn greedy(p: &Paddock, model: &str) -> (u16, Value) {
    let body = json!({ "model": model, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0 });
    p.post("/v1/completions", body).await
}

fn pid_of(instance: &Value) -> u32 {
    instance["pid"].as_u64().unwrap_or_else(|| panic!("no pid: {instance}")) as u32
}

#[tokio::test(flavor = "multi_thread")]
async fn an_abort_in_an_instance_process_ends_that_instance_alone() {
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("paddock.yaml"), "rate_limits: {management: null, heavy: null}\n").unwrap();
    let p = Paddock::start(data.path(), &[]).await;
    let model = common::model_path();
    create(&p, "t", &model, "thread", json!({})).await;
    create(&p, "p", &model, "process", json!({})).await;
    let t = p.wait_status("t", "running").await;
    let inst = p.wait_status("p", "running").await;

    // The process instance runs in a child of its own, with the in-process engine's output.
    let own_pid = pid_of(&t);
    let child_pid = pid_of(&inst);
    assert_ne!(child_pid, own_pid, "{inst}");
    let cmdline = std::fs::read(format!("/proc/{child_pid}/cmdline")).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains("instance-host"), "{cmdline:?}");
    assert_eq!(inst["memory"]["weights_shared_with"], json!([]), "a process shares no weights: {inst}");
    let (status, in_thread) = greedy(&p, "t").await;
    assert_eq!(status, 200, "{in_thread}");
    let (status, in_process) = greedy(&p, "p").await;
    assert_eq!(status, 200, "{in_process}");
    assert_eq!(in_process["choices"][0]["text"], in_thread["choices"][0]["text"]);
    assert_eq!(in_process["usage"], in_thread["usage"]);
    let (_, stats) = p.get("/api/instances/p").await;
    assert!(stats["stats"]["generated_tokens_total"].as_u64() >= Some(6), "stats come back: {stats}");

    // A model that makes llama.cpp abort at its first decode: the request gets a clear error,
    // the instance fails with llama.cpp's own last words, and nothing else is touched.
    let bad = aborting_model(data.path());
    create(&p, "bad", &bad, "process", json!({ "auto_restart": false })).await;
    p.wait_status("bad", "running").await;
    let (status, body) = greedy(&p, "bad").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "ENGINE_CRASHED", "{body}");
    let failed = p.wait_status("bad", "failed").await;
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(error.contains("SIGABRT") && error.contains("unsupported types"), "{failed}");
    let (status, body) = greedy(&p, "t").await;
    assert_eq!((status, &body["choices"][0]["text"]), (200, &in_thread["choices"][0]["text"]));

    // An abort in the middle of a stream: the stream ends with an error event and [DONE], and
    // the instance comes back by its restart policy, in a new process, and serves again.
    let text = p
        .stream_interrupted("p", || {
            let killed = std::process::Command::new("kill").args(["-ABRT", &child_pid.to_string()]).status().unwrap();
            assert!(killed.success());
        })
        .await;
    assert!(text.contains("engine_crashed"), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(!text.contains("\"finish_reason\":\"length\""), "the stream did not finish normally: {text}");
    // The supervisor hears of the death just after the requests do.
    let deadline = Instant::now() + Duration::from_secs(60);
    let back = loop {
        let (_, back) = p.get("/api/instances/p").await;
        if back["status"] == "running" && pid_of(&back) != child_pid {
            break back;
        }
        assert!(Instant::now() < deadline, "p did not come back: {back}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(back["restarts"], 1, "{back}");
    let (status, again) = greedy(&p, "p").await;
    assert_eq!((status, &again["choices"][0]["text"]), (200, &in_thread["choices"][0]["text"]));
    let (status, _) = p.get("/health").await;
    assert_eq!(status, 200);

    // A stop ends the process, not just the engine.
    let (status, body) = p.post("/api/instances/p/stop", json!({})).await;
    assert_eq!(status, 200, "{body}");
    p.wait_status("p", "stopped").await;
    let back_pid = pid_of(&back);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{back_pid}")).exists() {
        assert!(Instant::now() < deadline, "instance process {back_pid} outlived its stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
