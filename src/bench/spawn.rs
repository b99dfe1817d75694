//! Servers the benchmark starts itself: a paddock (this very binary) and/or a llama-server, on
//! the same GGUF with the same threads, context and slots, each on a free port with its own
//! scratch directory. A [`Spawned`] kills its process when dropped, so servers go away on
//! success, on error and on Ctrl-C alike.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::client::{Endpoint, ProbeError, Target};
use super::BenchError;

/// The settings both kinds of server get.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ServerSettings {
    pub threads: u32,
    /// Total context, shared by the slots (both servers divide it the same way).
    pub ctx_size: u32,
    pub parallel: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Paddock,
    LlamaServer,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Paddock => "paddock",
            Kind::LlamaServer => "llama-server",
        }
    }
}

/// A running server we started. Dropping it kills the process and removes its scratch dir.
pub struct Spawned {
    pub kind: Kind,
    pub url: String,
    /// The `model` requests name: the instance's name for paddock (llama-server ignores it).
    pub model: String,
    pub command: Vec<String>,
    child: Child,
    log: PathBuf,
    /// Holds paddock's data dir and both servers' logs; deleted after the process is gone.
    _scratch: tempfile::TempDir,
}

/// What `/proc/PID/status` says about a spawned server's memory.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Memory {
    /// Resident set size when sampled (after the last request).
    pub rss_kib: u64,
    /// The peak resident set size over the process's life.
    pub peak_rss_kib: u64,
}

/// How a spawned server shows up in the report.
#[derive(Debug, Clone, Serialize)]
pub struct SpawnInfo {
    pub kind: Kind,
    pub pid: u32,
    pub command: Vec<String>,
    pub settings: ServerSettings,
    pub memory: Option<Memory>,
}

impl Spawned {
    /// Starts `kind` serving `model` and returns once the process runs (not yet ready: see
    /// [`Spawned::wait_ready`]).
    pub fn start(kind: Kind, program: &Path, model: &Path, settings: ServerSettings) -> Result<Spawned, BenchError> {
        let fail = |why: String| BenchError::Spawn { kind: kind.name(), why };
        if !model.is_file() {
            return Err(fail(format!("model file {} does not exist", model.display())));
        }
        let scratch = tempfile::Builder::new()
            .prefix(&format!("paddock-bench-{}-", kind.name()))
            .tempdir()
            .map_err(|e| fail(format!("cannot create a scratch dir: {e}")))?;
        let port = free_port().map_err(|e| fail(format!("no free port: {e}")))?;
        let model_name = model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        let s = settings;
        let mut args: Vec<String> = match kind {
            // A fresh data dir: the instance must not reuse options stored by an earlier run.
            Kind::Paddock => vec![
                "serve".into(),
                "--port".into(),
                port.to_string(),
                "--data-dir".into(),
                scratch.path().join("data").to_string_lossy().into_owned(),
                "-m".into(),
                model.to_string_lossy().into_owned(),
                "--model-name".into(),
                model_name.clone(),
            ],
            Kind::LlamaServer => vec![
                "--port".into(),
                port.to_string(),
                "-m".into(),
                model.to_string_lossy().into_owned(),
                "--alias".into(),
                model_name.clone(),
            ],
        };
        args.extend(["--host", "127.0.0.1"].map(String::from));
        // Both take the same flag names; as separate words, which every parser accepts.
        for (flag, value) in [("--threads", s.threads), ("--ctx-size", s.ctx_size), ("--parallel", s.parallel)] {
            args.extend([flag.to_string(), value.to_string()]);
        }
        let log = scratch.path().join("server.log");
        let log_file = File::create(&log).map_err(|e| fail(format!("cannot create {}: {e}", log.display())))?;
        let log_err = log_file.try_clone().map_err(|e| fail(e.to_string()))?;
        let mut command = Command::new(program);
        command.args(&args).stdin(Stdio::null()).stdout(log_file).stderr(log_err);
        if kind == Kind::Paddock {
            // The child must not turn auth on from our environment, nor read our config file.
            command.env_remove("PADDOCK_ADMIN_PASSWORD").env_remove("PADDOCK_CONFIG");
            command.env_remove("PADDOCK_HOST").env_remove("PADDOCK_PORT").env_remove("PADDOCK_DATA_DIR");
        }
        let child = command.spawn().map_err(|e| fail(format!("cannot run {}: {e}", program.display())))?;
        let mut full = vec![program.to_string_lossy().into_owned()];
        full.extend(args);
        Ok(Spawned {
            kind,
            url: format!("http://127.0.0.1:{port}"),
            model: model_name,
            command: full,
            child,
            log,
            _scratch: scratch,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the server answers a one-token request, or fails with the end of its log
    /// if it exits or does not get ready within `timeout`.
    pub async fn wait_ready(
        &mut self,
        target: &Target,
        endpoint: Endpoint,
        timeout: Duration,
    ) -> Result<(), BenchError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.failure(format!("exited ({status}) before it was ready")));
            }
            match target.probe(endpoint).await {
                Ok(()) => return Ok(()),
                // Still loading: llama-server answers 503, and nothing listens at first.
                Err(ProbeError::Unreachable(_)) | Err(ProbeError::Status(503, _)) => {}
                Err(e) => return Err(self.failure(format!("is up but refuses requests: {e}"))),
            }
            if Instant::now() > deadline {
                return Err(self.failure(format!("not ready after {} s", timeout.as_secs())));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn failure(&self, why: String) -> BenchError {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        BenchError::Spawn { kind: self.kind.name(), why: format!("{why}; the end of its log:\n{}", tail.join("\n")) }
    }

    /// Resident memory now and at peak; None where /proc is not there.
    pub fn memory(&self) -> Option<Memory> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        };
        Some(Memory { rss_kib: field("VmRSS:")?, peak_rss_kib: field("VmHWM:")? })
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // SIGKILL: nothing of a benchmark server's state is worth a graceful stop, and a stop
        // that waited for in-flight requests could hang the benchmark's exit.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nothing listens on now. Another process could take it before the server binds it;
/// the server then fails to start and says so.
fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_model_or_program_is_a_spawn_error() {
        let settings = ServerSettings { threads: 1, ctx_size: 512, parallel: 1 };
        let e = Spawned::start(Kind::Paddock, Path::new("/bin/true"), Path::new("/nonexistent.gguf"), settings)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("/nonexistent.gguf") && e.contains("paddock"), "{e}");
        let model = tempfile::NamedTempFile::new().unwrap();
        let e = Spawned::start(Kind::LlamaServer, Path::new("/nonexistent/llama-server"), model.path(), settings)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("cannot run /nonexistent/llama-server"), "{e}");
    }
}
