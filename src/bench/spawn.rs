//! Servers the benchmark starts itself: a paddock (this very binary) and/or a llama-server, on
//! the same GGUF with the same threads, context and slots, each on a free port with its own
//! scratch directory. A [`Spawned`] kills its process (and, for llama-server's router, the
//! servers it started) when dropped, so servers go away on success, on error and on Ctrl-C alike.
//!
//! Either server serves one model ([`Serve::One`]) or a directory of several with at most
//! `max_loaded` in memory ([`Serve::Many`]): llama-server in router mode (`--models-dir`,
//! `--models-max`), paddock with `max_running_instances` in its config file (the instances are
//! created over its API once it is up, see `swap::create_instances`).

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

impl ServerSettings {
    /// The same settings as a paddock instance's options.
    pub fn instance_options(&self) -> crate::instance::options::InstanceOptions {
        crate::instance::options::InstanceOptions {
            threads: Some(self.threads),
            context_size: Some(self.ctx_size),
            parallel: Some(self.parallel),
            ..Default::default()
        }
    }
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

/// What to serve.
#[derive(Debug, Clone, Copy)]
pub enum Serve<'a> {
    /// One GGUF, loaded at start.
    One(&'a Path),
    /// Every GGUF in `dir`, loaded on demand, at most `max_loaded` at once (least recently used
    /// unloaded first).
    /// `memory_budget`: paddock's, in bytes (else its default, which parks what gives way).
    Many { dir: &'a Path, max_loaded: u32, memory_budget: Option<u64> },
}

/// What `/proc/PID/status` says about a spawned server's memory, summed over its process tree:
/// llama-server's router runs each model in a child process of its own.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Memory {
    /// Resident set size when sampled (after the last request).
    pub rss_kib: u64,
    /// The sum of each live process's own peak resident set size (VmHWM): a child that has
    /// already exited (a model the router unloaded) no longer counts.
    pub peak_rss_kib: u64,
    /// Processes summed: the server and its descendants.
    pub processes: usize,
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
    /// Starts `kind` serving `serve` and returns once the process runs (not yet ready: see
    /// [`Spawned::wait_ready`]).
    pub fn start(
        kind: Kind,
        program: &Path,
        serve: Serve<'_>,
        settings: ServerSettings,
    ) -> Result<Spawned, BenchError> {
        let fail = |why: String| BenchError::Spawn { kind: kind.name(), why };
        match serve {
            Serve::One(model) if !model.is_file() => {
                return Err(fail(format!("model file {} does not exist", model.display())))
            }
            Serve::Many { dir, .. } if !dir.is_dir() => {
                return Err(fail(format!("model directory {} does not exist", dir.display())))
            }
            _ => {}
        }
        let scratch = tempfile::Builder::new()
            .prefix(&format!("paddock-bench-{}-", kind.name()))
            .tempdir()
            .map_err(|e| fail(format!("cannot create a scratch dir: {e}")))?;
        let port = free_port().map_err(|e| fail(format!("no free port: {e}")))?;
        let s = settings;
        let port_args = ["--host".to_string(), "127.0.0.1".into(), "--port".into(), port.to_string()];
        let mut args: Vec<String> = match kind {
            Kind::Paddock => {
                // A fresh data dir: instances must not reuse options stored by an earlier run.
                let data = scratch.path().join("data").to_string_lossy().into_owned();
                ["serve".to_string(), "--data-dir".into(), data].into_iter().chain(port_args).collect()
            }
            Kind::LlamaServer => port_args.into(),
        };
        let mut model_name = String::new();
        match (kind, serve) {
            (_, Serve::One(model)) => {
                model_name =
                    model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
                let name_flag = if kind == Kind::Paddock { "--model-name" } else { "--alias" };
                args.extend(["-m".into(), model.to_string_lossy().into_owned(), name_flag.into(), model_name.clone()]);
            }
            (Kind::Paddock, Serve::Many { max_loaded, memory_budget, .. }) => {
                // Rate limits off: the benchmark creates instances faster than the default allows.
                let config = scratch.path().join("paddock.yaml");
                let mut yaml = format!(
                    "max_running_instances: {max_loaded}\nrate_limits: {{ management: null, heavy: null, inference: null }}\n"
                );
                if let Some(bytes) = memory_budget {
                    yaml.push_str(&format!("memory_budget: \"{bytes}\"\n"));
                }
                std::fs::write(&config, yaml).map_err(|e| fail(format!("cannot write {}: {e}", config.display())))?;
                args.extend(["--config".into(), config.to_string_lossy().into_owned()]);
            }
            (Kind::LlamaServer, Serve::Many { dir, max_loaded, .. }) => {
                args.extend([
                    "--models-dir".into(),
                    dir.to_string_lossy().into_owned(),
                    "--models-max".into(),
                    max_loaded.to_string(),
                ]);
            }
        }
        // Paddock's instances get these from the API (swap::create_instances); the router
        // passes them on to the server it starts for each model.
        if kind == Kind::LlamaServer || matches!(serve, Serve::One(_)) {
            // Both take the same flag names; as separate words, which every parser accepts.
            for (flag, value) in [("--threads", s.threads), ("--ctx-size", s.ctx_size), ("--parallel", s.parallel)] {
                args.extend([flag.to_string(), value.to_string()]);
            }
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
        self.wait_until(timeout, || target.probe(endpoint)).await
    }

    /// Waits until GET `path` answers 2xx: for servers with no model loaded yet, where a
    /// completion request would load one.
    pub async fn wait_listening(&mut self, target: &Target, path: &str, timeout: Duration) -> Result<(), BenchError> {
        self.wait_until(timeout, || target.get(path)).await
    }

    async fn wait_until<F, Fut>(&mut self, timeout: Duration, mut probe: F) -> Result<(), BenchError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), ProbeError>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.failure(format!("exited ({status}) before it was ready")));
            }
            match probe().await {
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

    pub fn failure(&self, why: String) -> BenchError {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        BenchError::Spawn { kind: self.kind.name(), why: format!("{why}; the end of its log:\n{}", tail.join("\n")) }
    }

    /// Resident memory of the server and its descendants now, and their peaks; None where
    /// /proc is not there.
    pub fn memory(&self) -> Option<Memory> {
        let mut memory = Memory { rss_kib: 0, peak_rss_kib: 0, processes: 0 };
        for pid in std::iter::once(self.pid()).chain(descendants(self.pid())) {
            // A child may exit between the listing and this read: it no longer holds memory.
            let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { continue };
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            };
            // Zombies have no VmRSS line: nothing resident.
            let (Some(rss), Some(peak)) = (field("VmRSS:"), field("VmHWM:")) else { continue };
            memory.rss_kib += rss;
            memory.peak_rss_kib += peak;
            memory.processes += 1;
        }
        (memory.processes > 0).then_some(memory)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // Listed before the parent dies: orphans are re-parented and could not be found after.
        let children = descendants(self.pid());
        // SIGKILL: nothing of a benchmark server's state is worth a graceful stop, and a stop
        // that waited for in-flight requests could hang the benchmark's exit.
        let _ = self.child.kill();
        let _ = self.child.wait();
        // llama-server's router children normally exit with it; these are the ones that did not.
        if !children.is_empty() {
            let pids: Vec<sysinfo::Pid> = children.iter().map(|&p| sysinfo::Pid::from_u32(p)).collect();
            let mut sys = sysinfo::System::new();
            sys.refresh_processes(sysinfo::ProcessesToUpdate::Some(&pids), true);
            for pid in pids {
                if let Some(p) = sys.process(pid) {
                    p.kill();
                }
            }
        }
    }
}

/// Every process descended from `root`, from each `/proc/PID/stat`'s parent field (empty where
/// /proc is not there).
fn descendants(root: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let parents: Vec<(u32, u32)> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            Some((pid, parent_of(&stat)?))
        })
        .collect();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(parents.iter().filter(|(_, pp)| *pp == parent).map(|(pid, _)| *pid));
        i += 1;
    }
    found.remove(0);
    found
}

/// The parent pid in a `/proc/PID/stat` line. The command name (2nd field) may hold spaces and
/// parentheses, so fields are counted from its closing parenthesis.
fn parent_of(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
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
        let e =
            Spawned::start(Kind::Paddock, Path::new("/bin/true"), Serve::One(Path::new("/nonexistent.gguf")), settings)
                .err()
                .unwrap()
                .to_string();
        assert!(e.contains("/nonexistent.gguf") && e.contains("paddock"), "{e}");
        let many = Serve::Many { dir: Path::new("/nonexistent-dir"), max_loaded: 1, memory_budget: None };
        let e = Spawned::start(Kind::LlamaServer, Path::new("/bin/true"), many, settings).err().unwrap().to_string();
        assert!(e.contains("model directory /nonexistent-dir"), "{e}");
        let model = tempfile::NamedTempFile::new().unwrap();
        let e = Spawned::start(
            Kind::LlamaServer,
            Path::new("/nonexistent/llama-server"),
            Serve::One(model.path()),
            settings,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("cannot run /nonexistent/llama-server"), "{e}");
    }

    #[test]
    fn a_process_tree_is_found_and_summed() {
        // sh waits for its sleep child, so the tree is two processes deep for a while.
        let child = Command::new("sh").args(["-c", "sleep 30; true"]).spawn().unwrap();
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(5);
        while descendants(pid).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let kids = descendants(pid);
        assert_eq!(kids.len(), 1, "{kids:?}");
        assert_eq!(parent_of(&std::fs::read_to_string(format!("/proc/{}/stat", kids[0])).unwrap()), Some(pid));
        assert_eq!(parent_of("42 (a) b (c)) S 7 42"), Some(7), "a command name with parentheses");
        let scratch = tempfile::tempdir().unwrap();
        let spawned = Spawned {
            kind: Kind::LlamaServer,
            url: String::new(),
            model: String::new(),
            command: Vec::new(),
            child,
            log: scratch.path().join("log"),
            _scratch: scratch,
        };
        let m = spawned.memory().unwrap();
        assert_eq!(m.processes, 2);
        assert!(m.rss_kib > 0 && m.peak_rss_kib >= m.rss_kib, "{m:?}");
        drop(spawned);
        // Killed, the orphan is gone, or a zombie until its new parent reaps it.
        let dead = || {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", kids[0])).unwrap_or_default();
            stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()).is_none_or(|s| s == "Z")
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !dead() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(dead(), "the grandchild still runs");
    }
}
