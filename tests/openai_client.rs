//! The real `paddock` binary, started as a user starts it (`serve --model`), driven by the
//! official `openai` Python package (installed into a venv by scripts/test).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python() -> PathBuf {
    let path = std::env::var_os("PADDOCK_TEST_PYTHON")
        .map(PathBuf::from)
        .expect("PADDOCK_TEST_PYTHON must name a python with the openai package: run the tests through scripts/test");
    assert!(path.exists(), "{} does not exist: run the tests through scripts/test", path.display());
    path
}

#[test]
fn official_openai_client_works_against_serve_model() {
    let python = python();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let data = tempfile::tempdir().unwrap();
    let model = common::model_path();
    let _server = Server(
        Command::new(env!("CARGO_BIN_EXE_paddock"))
            .args(["serve", "--port", &port.to_string(), "--model", model.to_str().unwrap(), "--model-name", "gemma"])
            .args(["--ctx-size", "1024", "--parallel", "2", "--threads", "2", "--embeddings"])
            .env("PADDOCK_DATA_DIR", data.path())
            .env("PADDOCK_ADMIN_PASSWORD", "test-admin-password")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let token = loop {
        let login =
            curl(&base, "POST", "/api/auth/login", None, r#"{"username":"admin","password":"test-admin-password"}"#);
        if let Some(token) = login["token"].as_str() {
            break token.to_string();
        }
        assert!(Instant::now() < deadline, "paddock serve did not come up: {login}");
        std::thread::sleep(Duration::from_millis(100));
    };
    loop {
        let body = curl(&base, "GET", "/api/instances/gemma", Some(&token), "");
        if body["status"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "paddock serve --model never became ready: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let key = |body: &str| {
        let created = curl(&base, "POST", "/api/auth/keys", Some(&token), body);
        created["key"].as_str().unwrap_or_else(|| panic!("no key in {created}")).to_string()
    };
    let gemma_key = key(r#"{"name":"client","kind":"inference"}"#);
    let other_key = key(r#"{"name":"other","kind":"inference","instances":["other"]}"#);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let out = Command::new(python).args([script, &base, "gemma", &gemma_key, &other_key]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "openai client failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("openai client: 19 passed, 0 failed"), "{stdout}");
}

/// One request with curl (the test runs outside any async runtime); the JSON answer, or Null.
fn curl(base: &str, method: &str, path: &str, token: Option<&str>, body: &str) -> serde_json::Value {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-X", method, &format!("{base}{path}"), "-H", "content-type: application/json"]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("authorization: Bearer {t}")]);
    }
    if !body.is_empty() {
        cmd.args(["-d", body]);
    }
    let out = cmd.output().map(|o| o.stdout).unwrap_or_default();
    serde_json::from_slice(&out).unwrap_or(serde_json::Value::Null)
}
