//! Process isolation: an instance whose engine runs in a child `paddock instance-host` process.
//!
//! # Layout
//! - this module, the parent side: spawns the child, and bridges the [`Engine`] handle's command
//!   channel to it, so the rest of paddock cannot tell a process-isolated instance from a thread;
//! - [`child`]: the child side, which runs the same [`EngineThread`];
//! - [`wire`]: the messages and their framing.
//!
//! Admission (the permits), cancellation and statistics stay in the parent: a request's permit
//! is held here until its last event arrives; a client that goes away sends `Cancel`; the child
//! sends its counters when they change. When the child dies (a llama.cpp abort, a lost RPC
//! worker, a kill), every pending request fails with [`EngineError::Crashed`] naming the signal
//! and llama.cpp's last line, and the exit report tells the supervisor, which applies
//! `auto_restart` as for any engine that ended.

pub mod child;
pub(crate) mod wire;

use std::collections::{HashMap, VecDeque};
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{ChildStderr, ChildStdin, ChildStdout, Command};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::Level;

use super::{Engine, EngineCommand, EngineConfig, EngineError, EngineStats, EventSender, ExitReport, StreamEvent};
use crate::logs::LogBuffer;
use wire::{FromHost, Reply, ToHost, WireInfo};

/// Lines of the child's stderr kept to explain its death (llama.cpp prints its assert there).
const STDERR_TAIL: usize = 8;

/// The parent's hold on an instance process.
pub(crate) struct Process {
    pid: u32,
    /// Set once the child has been reaped.
    done: Arc<AtomicBool>,
}

impl Process {
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for the child to exit, at most `deadline`; then kills it. Blocking.
    pub(crate) fn join(&self, deadline: Duration) -> bool {
        let start = Instant::now();
        while !self.done.load(Ordering::Acquire) {
            if start.elapsed() > deadline {
                tracing::warn!(pid = self.pid, "instance process did not stop within {deadline:?}; killing it");
                self.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    fn kill(&self) {
        // Not once reaped: the pid could be another process's by then.
        if !self.done.load(Ordering::Acquire) {
            // SAFETY: kill(2) with a pid we spawned and have not reaped, and a valid signal.
            unsafe {
                libc::kill(self.pid as i32, libc::SIGKILL);
            }
        }
    }
}

/// What the child owes an answer for.
enum Pending {
    /// A generation: its events go to `events`; the permit is the parent's admission, released
    /// with the last event.
    Stream {
        events: EventSender,
        _permit: OwnedSemaphorePermit,
        /// Dropped with this entry, which lets the request's cancel watcher go (and its clone
        /// of `events`, so the receiver sees the end).
        _settled: oneshot::Sender<()>,
    },
    Reply(Box<dyn FnOnce(Reply) + Send>),
}

/// State the bridge's tasks share.
struct Shared {
    pending: Mutex<HashMap<u64, Pending>>,
    stats: Arc<EngineStats>,
    logs: Arc<LogBuffer>,
    stderr_tail: Mutex<VecDeque<String>>,
    /// The child's own account of its end, if it gave one before exiting.
    exited: Mutex<Option<ExitReport>>,
}

/// Starts `config`'s engine in a child process and waits until it is loaded (or failed).
pub(super) async fn start(
    config: EngineConfig,
) -> Result<(Engine, Process, oneshot::Receiver<ExitReport>), EngineError> {
    let exe = std::env::current_exe()
        .map_err(|e| EngineError::Config(format!("cannot find paddock's own executable: {e}")))?;
    let mut child = Command::new(exe)
        .arg("instance-host")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // The child's log lines come back as messages; console output would repeat them.
        .env_remove("RUST_LOG")
        // ggml's abort handler would otherwise try to attach gdb for a backtrace.
        .env("GGML_NO_BACKTRACE", "1")
        .spawn()
        .map_err(|e| EngineError::Config(format!("cannot start an instance process: {e}")))?;
    let pid = child.id().unwrap_or(0);
    let (stdin, stdout, stderr) = match (child.stdin.take(), child.stdout.take(), child.stderr.take()) {
        (Some(i), Some(o), Some(e)) => (i, o, e),
        _ => return Err(EngineError::Config("the instance process has no pipes".into())),
    };
    config.logs.push(Level::INFO, format!("engine runs in process {pid} (isolation: process)"));
    let shared = Arc::new(Shared {
        pending: Mutex::default(),
        stats: Arc::new(EngineStats::new()),
        logs: config.logs.clone(),
        stderr_tail: Mutex::default(),
        exited: Mutex::default(),
    });
    let done = Arc::new(AtomicBool::new(false));
    let process = Process { pid, done: done.clone() };

    let (frames, frames_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let _ = frames.send(wire::encode(&ToHost::Start(Box::new(config.clone()))));
    tokio::spawn(write_frames(stdin, frames_rx));
    let stderr_done = tokio::spawn(read_stderr(stderr, shared.clone()));
    let (ready_tx, ready_rx) = oneshot::channel();
    let reader = tokio::spawn(read_frames(stdout, shared.clone(), ready_tx));
    let (exit_tx, exit_rx) = oneshot::channel();
    {
        let (shared, done) = (shared.clone(), done.clone());
        tokio::spawn(async move {
            let _ = reader.await;
            let status = child.wait().await;
            let _ = stderr_done.await;
            done.store(true, Ordering::Release);
            let report = match (shared.exited.lock().take(), status) {
                (Some(report), Ok(s)) if s.success() => report,
                (_, Ok(s)) => Err(describe_exit(s, &shared.stderr_tail.lock())),
                (_, Err(e)) => Err(format!("cannot wait for the instance process: {e}")),
            };
            let reason = report.clone().err().unwrap_or_else(|| "the instance process exited".into());
            let pending: Vec<Pending> = shared.pending.lock().drain().map(|(_, p)| p).collect();
            for p in pending {
                if let Pending::Stream { events, .. } = p {
                    let _ = events.send(Err(EngineError::Crashed(reason.clone())));
                }
            }
            let _ = exit_tx.send(report);
        });
    }

    let cancel = config.cancel_load.clone();
    let cancelled = async {
        while !cancel.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let info = tokio::select! {
        ready = ready_rx => ready,
        _ = cancelled => {
            process.kill();
            return Err(EngineError::LoadCancelled);
        }
    };
    let info = match info {
        Ok(Ok(info)) => super::ModelInfo::from(info),
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            // The child ended before answering: it died during the load.
            let reason = match exit_rx.await {
                Ok(Err(reason)) => reason,
                _ => "the instance process ended during the load".into(),
            };
            return Err(EngineError::Load { path: config.model_path.display().to_string(), reason });
        }
    };

    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(dispatch(rx, frames, shared.clone()));
    let n_permits = (config.n_parallel + config.queue_size) as usize;
    let engine = Engine {
        tx,
        permits: Arc::new(Semaphore::new(n_permits)),
        info: Arc::new(info),
        stats: shared.stats.clone(),
        queue_size: config.queue_size,
    };
    Ok((engine, process, exit_rx))
}

/// Turns the [`Engine`] handle's commands into messages to the child.
async fn dispatch(mut rx: mpsc::UnboundedReceiver<EngineCommand>, frames: mpsc::UnboundedSender<Vec<u8>>, shared: Arc<Shared>) {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let expect = |shared: &Shared, id: u64, on_reply: Box<dyn FnOnce(Reply) + Send>| {
        shared.pending.lock().insert(id, Pending::Reply(on_reply));
    };
    while let Some(command) = rx.recv().await {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let message = match command {
            EngineCommand::Generate { request, events, permit } => {
                let (settled, settled_rx) = oneshot::channel();
                let entry = Pending::Stream { events: events.clone(), _permit: permit, _settled: settled };
                shared.pending.lock().insert(id, entry);
                let (shared, frames) = (shared.clone(), frames.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = events.closed() => {
                            // Still pending: the client left before the end; the child must stop it.
                            let left = shared.pending.lock().remove(&id);
                            if left.is_some() {
                                let _ = frames.send(wire::encode(&ToHost::Cancel { id }));
                            }
                        }
                        _ = settled_rx => {}
                    }
                });
                ToHost::Generate { id, request: Box::new(request) }
            }
            EngineCommand::Ping(reply) => {
                expect(&shared, id, answer(reply, |r| matches!(r, Reply::Pong).then_some(())));
                ToHost::Ping { id }
            }
            EngineCommand::Tokenize { text, add_special, parse_special, reply } => {
                expect(&shared, id, answer(reply, |r| if let Reply::Tokens(t) = r { Some(t) } else { None }));
                ToHost::Tokenize { id, text, add_special, parse_special }
            }
            EngineCommand::Detokenize { tokens, reply } => {
                expect(&shared, id, answer(reply, |r| if let Reply::Text(t) = r { Some(t) } else { None }));
                ToHost::Detokenize { id, tokens }
            }
            EngineCommand::Slots(reply) => {
                expect(&shared, id, answer(reply, |r| if let Reply::Slots(s) = r { Some(s) } else { None }));
                ToHost::Slots { id }
            }
            EngineCommand::Slot { slot, action, reply } => {
                expect(&shared, id, answer(reply, |r| if let Reply::Slot(s) = r { Some(s) } else { None }));
                ToHost::Slot { id, slot, action }
            }
            EngineCommand::Lora { set, reply } => {
                expect(&shared, id, answer(reply, |r| if let Reply::Lora(l) = r { Some(l) } else { None }));
                ToHost::Lora { id, set }
            }
            EngineCommand::Embed { inputs, reply, permit } => {
                let on_reply = answer(reply, |r| if let Reply::Embeddings(e) = r { Some(e) } else { None });
                // The permit is released with the answer.
                expect(&shared, id, Box::new(move |r| {
                    let _permit = permit;
                    on_reply(r)
                }));
                ToHost::Embed { id, inputs }
            }
            EngineCommand::Shutdown { save_kv } => ToHost::Shutdown { save_kv },
        };
        if frames.send(wire::encode(&message)).is_err() {
            return;
        }
    }
    // Every handle is gone: dropping `frames` closes the child's stdin, and it shuts down.
}

/// A reply handler that sends what `pick` finds in the reply (a reply of another kind is a
/// protocol bug; the caller then sees the engine as stopped).
fn answer<T: Send + 'static>(
    reply: oneshot::Sender<T>,
    pick: impl FnOnce(Reply) -> Option<T> + Send + 'static,
) -> Box<dyn FnOnce(Reply) + Send> {
    Box::new(move |r| {
        if let Some(value) = pick(r) {
            let _ = reply.send(value);
        }
    })
}

async fn write_frames(mut stdin: ChildStdin, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
    while let Some(frame) = rx.recv().await {
        if stdin.write_all(&frame).await.is_err() {
            return;
        }
    }
}

async fn read_frames(mut stdout: ChildStdout, shared: Arc<Shared>, ready: oneshot::Sender<Result<WireInfo, EngineError>>) {
    let mut ready = Some(ready);
    loop {
        let mut prefix = [0u8; 4];
        if stdout.read_exact(&mut prefix).await.is_err() {
            return;
        }
        let Ok(len) = wire::body_len(prefix) else { return };
        let mut body = vec![0u8; len];
        if stdout.read_exact(&mut body).await.is_err() {
            return;
        }
        let message = match wire::decode::<FromHost>(&body) {
            Ok(m) => m,
            Err(e) => {
                shared.logs.push(Level::ERROR, format!("instance process protocol error: {e}"));
                return;
            }
        };
        match message {
            FromHost::Ready(r) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(r);
                }
            }
            FromHost::Event { id, event } => deliver(&shared, id, event),
            FromHost::Reply { id, reply } => {
                let pending = shared.pending.lock().remove(&id);
                if let Some(Pending::Reply(on_reply)) = pending {
                    on_reply(reply);
                }
            }
            FromHost::Stats(s) => shared.stats.absorb(&s),
            FromHost::Log { level, message } => shared.logs.push(parse_level(&level), message),
            FromHost::Exited(report) => *shared.exited.lock() = Some(report),
        }
    }
}

fn deliver(shared: &Shared, id: u64, event: Result<StreamEvent, EngineError>) {
    let mut pending = shared.pending.lock();
    let Some(Pending::Stream { events, .. }) = pending.get(&id) else { return };
    let last = matches!(event, Ok(StreamEvent::Done { .. }) | Err(_));
    if last {
        shared.stats.mark_active();
    }
    let _ = events.send(event);
    if last {
        // Releases the permit: the request has left the instance.
        pending.remove(&id);
    }
}

async fn read_stderr(stderr: ChildStderr, shared: Arc<Shared>) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim().is_empty() {
            continue;
        }
        shared.logs.push(Level::WARN, line.clone());
        let mut tail = shared.stderr_tail.lock();
        if tail.len() == STDERR_TAIL {
            tail.pop_front();
        }
        tail.push_back(line);
    }
}

fn parse_level(level: &str) -> Level {
    match level {
        "error" => Level::ERROR,
        "warn" => Level::WARN,
        "debug" => Level::DEBUG,
        "trace" => Level::TRACE,
        _ => Level::INFO,
    }
}

/// Why the child ended, in words: the signal or exit code, and llama.cpp's last complaint.
fn describe_exit(status: ExitStatus, tail: &VecDeque<String>) -> String {
    let how = match status.signal() {
        Some(sig) => {
            let name = match sig {
                libc::SIGABRT => " (SIGABRT: llama.cpp aborted)",
                libc::SIGKILL => " (SIGKILL)",
                libc::SIGSEGV => " (SIGSEGV)",
                libc::SIGFPE => " (SIGFPE)",
                libc::SIGTERM => " (SIGTERM)",
                _ => "",
            };
            format!("the instance process was killed by signal {sig}{name}")
        }
        None => format!("the instance process exited with code {}", status.code().unwrap_or(-1)),
    };
    let telling = tail.iter().rev().find(|l| l.contains("GGML_ASSERT") || l.contains("error")).or(tail.back());
    match telling {
        Some(line) => format!("{how}; its last words: {}", line.trim()),
        None => how,
    }
}
