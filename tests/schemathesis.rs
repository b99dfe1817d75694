//! Fuzzes the HTTP API from its own OpenAPI document with schemathesis (pinned in
//! `scripts/test`): no request may cause a server error, and every response must be one the
//! document describes (status, content type, schema).
//!
//! Bounded to a few minutes on two cores: a fixed seed, a few examples per operation, no
//! stateful phase, and an instance whose slots hold 32 tokens, so no generation runs long.
//! The llama-server routes are fuzzed on that running instance (`name` is fixed for them);
//! management routes get generated names, which exist only if the fuzzer creates them, so it
//! can never stop, reconfigure or delete the instance the model routes use.

use std::time::{Duration, Instant};

use serde_json::json;

mod common;

/// Per-operation bound on generated test cases in the fuzzing phase.
const MAX_EXAMPLES: u32 = 10;
/// The whole run must end within this; it takes about a minute and a half.
const DEADLINE: Duration = Duration::from_secs(300);

/// 503 is how paddock says an instance is not running, loading, or overloaded; the fuzzer
/// provokes those itself (e.g. `stop-all`). Any other 5xx is a bug.
const CONFIG: &str = r#"
# The run is authenticated as the admin (a header); no signing up through the API.
[auth]
auto-signup = false

[checks.not_a_server_error]
expected-statuses = ["1xx", "2xx", "3xx", "4xx", "503"]

# Names seen in responses would let the fuzzer stop, reconfigure or delete the instance.
[phases.examples.extra-data-sources]
responses = false
[phases.coverage.extra-data-sources]
responses = false
[phases.fuzzing.extra-data-sources]
responses = false

# The hub routes answer 502 when the hub cannot be reached, which is the case here.
[[operations]]
include-path-regex = "^/api/admin/hf/"
checks.not_a_server_error.expected-statuses = ["1xx", "2xx", "3xx", "4xx", "502", "503"]

[[operations]]
include-path-regex = "^/api/instances/\\{name\\}/proxy/"
parameters = { "path.name" = "fuzz" }
"#;

#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_no_server_error_and_no_undocumented_response() {
    let python = std::env::var_os("PADDOCK_TEST_PYTHON")
        .expect("PADDOCK_TEST_PYTHON must name a python with schemathesis: run the tests through scripts/test");
    // Auth on, and the fuzzer an admin: what it does to users and keys cannot turn auth on
    // half-way and leave the rest of the run at 401.
    let s = common::spawn_server(|c| c.auth.admin_password = Some("fuzzing admin".into()));
    let login = json!({ "username": "admin", "password": "fuzzing admin" });
    let (status, body) = s.post("/api/auth/login", login).await;
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().unwrap();
    let authorization = format!("Authorization: Bearer {token}");
    let s = s.with_token(token);
    // 256 tokens (llama.cpp's smallest context) over 8 slots: at most 32 tokens per generation.
    s.running_instance("fuzz", json!({ "context_size": 256, "parallel": 8, "threads": 2, "embeddings": true })).await;

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("schemathesis.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let started = Instant::now();
    let child = tokio::process::Command::new(python)
        .args(["-m", "schemathesis.cli", "--config-file"])
        .arg(&config)
        .arg("run")
        .arg(s.url("/api/openapi.json"))
        .args(["--phases", "examples,coverage,fuzzing"])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        ])
        .args(["--max-examples", &MAX_EXAMPLES.to_string(), "--seed", "1", "--request-timeout", "60"])
        // It would end the run: tests/server/node.rs covers it.
        .args(["--exclude-operation-id", "shutdown"])
        .args(["--workers", "2", "--no-color"])
        .args(["--header", &authorization])
        // Hypothesis keeps its example database in the working directory.
        .current_dir(dir.path())
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start schemathesis");
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("schemathesis ran over {DEADLINE:?}"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("schemathesis took {:.0?}", started.elapsed());
    assert!(out.status.success(), "schemathesis failed ({}):\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("passed"), "schemathesis ran no test case:\n{stdout}\n{stderr}");

    let (_, body) = s.get("/api/instances/fuzz").await;
    assert!(body["name"] == "fuzz", "the fuzzed instance is still there: {body}");
}
