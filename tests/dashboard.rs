//! The dashboard in a real browser: starts the built `paddock` with auth on, pointed at the
//! local test hub (`common::hub`), then runs `tests/e2e/dashboard.mjs` (playwright-core driving
//! Debian's chromium) against it. The script signs in, creates, starts, chats with, edits, stops
//! and deletes an instance of the test model through the page; then, in the Models view, finds
//! the model on the hub, downloads it with a progress bar, creates an instance from it and chats
//! with it (`tests/e2e/models.mjs`). Screenshots go under `target/tmp/dashboard/`.
//!
//! `scripts/test` installs chromium and the script's npm package; running this test alone needs
//! them too (`apt-get install chromium`, `npm ci --prefix tests/e2e`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

fn wait_healthy(port: u16, server: &mut Server) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = server.0.try_wait() {
            panic!("paddock exited before it answered: {status}");
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("paddock did not listen on port {port} within 30 s");
}

#[test]
fn the_dashboard_manages_an_instance_in_chromium() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let e2e = root.join("tests/e2e");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(Path::new(&chromium).exists(), "{chromium} is missing: scripts/test installs Debian's chromium");
    assert!(
        e2e.join("node_modules/playwright-core").exists(),
        "playwright-core is missing: run `npm ci --prefix tests/e2e` (scripts/test does)"
    );
    let model = common::model_path();
    let (hub_url, hub) = common::hub::hub();
    let hub_file = &hub.repos[common::hub::FAST].files[0].path;
    let data = tempfile::tempdir().unwrap();
    let out: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    let _ = std::fs::remove_dir_all(&out);

    let port = free_port();
    let password = "e2e-password-1";
    let mut server = Server(
        Command::new(env!("CARGO_BIN_EXE_paddock"))
            .args(["serve", "--port", &port.to_string()])
            .arg("--data-dir")
            .arg(data.path())
            .args(["--hf-endpoint", hub_url])
            .env("PADDOCK_ADMIN_PASSWORD", password)
            .env_remove("PADDOCK_CONFIG")
            .env_remove("HF_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start paddock"),
    );
    wait_healthy(port, &mut server);

    let status = Command::new("node")
        .arg(e2e.join("dashboard.mjs"))
        .current_dir(&e2e)
        .env("PADDOCK_URL", format!("http://127.0.0.1:{port}"))
        .env("PADDOCK_ADMIN_PASSWORD", password)
        .env("PADDOCK_TEST_MODEL", &model)
        .env("PADDOCK_HUB_URL", hub_url)
        .env("PADDOCK_HUB_REPO", common::hub::FAST)
        .env("PADDOCK_HUB_FILE", hub_file)
        .env("OUT_DIR", &out)
        .env("CHROMIUM", &chromium)
        .status()
        .expect("run node (scripts/install-deps installs nodejs)");
    assert!(status.success(), "the browser test failed (screenshots, and failure.png, in {})", out.display());
    for shot in [
        "01-sign-in",
        "04-dashboard-running",
        "05-chat",
        "06-logs",
        "08-dark",
        "09-narrow",
        "10-models",
        "11-download",
        "12-model-chat",
        "13-models-narrow",
    ] {
        let png = out.join(format!("{shot}.png"));
        let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
        assert!(bytes.starts_with(b"\x89PNG"), "{} is a PNG", png.display());
    }
}
