//! Paddock as a separate process (the real binary), for tests that kill it, restart it, or
//! measure its memory.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Paddock {
    child: Child,
    pub base: String,
}

impl Paddock {
    /// Starts `paddock serve` on a free port with `data` as its data dir, plus `args`, and waits
    /// until it answers. A `paddock.yaml` already in `data` is its config.
    pub async fn start(data: &Path, args: &[&str]) -> Paddock {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(env!("CARGO_BIN_EXE_paddock"))
            .args(["serve", "--port", &port.to_string(), "--data-dir", data.to_str().unwrap()])
            .args(args)
            .env_remove("HF_TOKEN")
            .env_remove("PADDOCK_CONFIG")
            .env_remove("PADDOCK_ADMIN_PASSWORD")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let p = Paddock { child, base: format!("http://127.0.0.1:{port}") };
        let deadline = Instant::now() + Duration::from_secs(30);
        while client().get(format!("{}/health", p.base)).send().await.is_err() {
            assert!(Instant::now() < deadline, "paddock did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        p
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = client().get(format!("{}{path}", self.base)).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = client().post(format!("{}{path}", self.base)).json(&body).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        let r = client().put(format!("{}{path}", self.base)).json(&body).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// Polls the instance until its status is `want`, and returns it.
    pub async fn wait_status(&self, name: &str, want: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, body) = self.get(&format!("/api/instances/{name}")).await;
            if body["status"] == want {
                return body;
            }
            assert!(Instant::now() < deadline, "{name} never became {want}: {body}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Streams a long greedy completion from `model`, runs `during` once the first token has
    /// arrived, then reads the stream to its end (at most 60 s) and returns all of it.
    pub async fn stream_interrupted(&self, model: &str, during: impl FnOnce()) -> String {
        use futures::StreamExt;
        let body = serde_json::json!({
            "model": model, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": true
        });
        let response = client().post(format!("{}/v1/completions", self.base)).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let mut stream = response.bytes_stream();
        let mut text = String::new();
        while !text.contains("\"text\"") {
            text.push_str(&String::from_utf8_lossy(&stream.next().await.expect("a first token").unwrap()));
        }
        during();
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Some(chunk) = tokio::time::timeout_at(deadline.into(), stream.next()).await.expect("the stream hung")
        {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
        text
    }

    /// The process's resident memory, in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc/PID/status");
        kib * 1024
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    /// Waits for the process to exit on its own, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Paddock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client without connection reuse (a killed server leaves no stale pooled connection).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().pool_max_idle_per_host(0).timeout(Duration::from_secs(120)).build().unwrap()
}
