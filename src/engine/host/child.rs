//! `paddock instance-host`: the child side. It reads a [`ToHost::Start`] on stdin, runs the
//! same [`EngineThread`] an in-process instance runs, and relays commands in and events out.
//! Nothing here decides anything: admission, queue limits and policy stay with the parent.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::AbortHandle;

use super::super::{Engine, EngineCommand, EngineError, EngineThread, Isolation, StreamEvent};
use super::wire::{self, FromHost, Reply, ToHost};
use crate::logs::LogBuffer;

/// How often the counters are sent to the parent (when they changed).
const STATS_EVERY: Duration = Duration::from_millis(50);
/// How long a shutdown may take here; the parent gives up (and kills) a little later.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(20);

/// Runs an instance process until the parent says `Shutdown` or goes away.
pub async fn run() -> Result<(), String> {
    let (protocol_in, protocol_out) = take_stdio()?;
    // SAFETY: asks the kernel to kill this process when its parent thread exits, so an instance
    // never outlives the paddock that started it; prctl with PR_SET_PDEATHSIG takes a signal
    // number and touches no memory.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    let (out_tx, out_rx) = std::sync::mpsc::channel::<FromHost>();
    let writer = std::thread::Builder::new()
        .name("host-writer".into())
        .spawn(move || write_frames(protocol_out, out_rx))
        .map_err(|e| e.to_string())?;
    let (in_tx, mut in_rx) = mpsc::unbounded_channel::<ToHost>();
    std::thread::Builder::new()
        .name("host-reader".into())
        .spawn(move || read_frames(protocol_in, in_tx))
        .map_err(|e| e.to_string())?;

    let Some(ToHost::Start(config)) = in_rx.recv().await else {
        return Err("the first message was not Start".into());
    };
    let mut config = *config;
    config.isolation = Isolation::Thread;
    config.logs = Arc::new(LogBuffer::default());
    forward_logs(&config.logs, out_tx.clone());
    let (thread, exited) = match EngineThread::start(config).await {
        Ok(started) => started,
        Err(e) => {
            let _ = out_tx.send(FromHost::Ready(Err(e)));
            drop(out_tx);
            let _ = writer.join();
            return Ok(());
        }
    };
    let engine = thread.engine().clone();
    let _ = out_tx.send(FromHost::Ready(Ok(engine.info().clone().into())));
    forward_stats(&engine, out_tx.clone());
    {
        let out = out_tx.clone();
        tokio::spawn(async move {
            // The engine thread ended on its own (an error, or a panic it caught).
            if let Ok(report) = exited.await {
                let _ = out.send(FromHost::Exited(report));
            }
        });
    }
    let relay = Relay { engine, out: out_tx.clone(), running: Arc::default(), permits: Arc::new(Semaphore::new(4096)) };
    let mut save_kv = false;
    while let Some(message) = in_rx.recv().await {
        match message {
            ToHost::Shutdown { save_kv: save } => {
                save_kv = save;
                break;
            }
            message => relay.handle(message),
        }
    }
    // Shutdown, or the parent closed our stdin (it is gone or dropped us): stop the engine.
    let report = tokio::task::spawn_blocking(move || thread.shutdown(SHUTDOWN_DEADLINE, save_kv))
        .await
        .map_err(|e| e.to_string())
        .and_then(|joined| if joined { Ok(()) } else { Err("the engine did not stop in time".into()) });
    let _ = out_tx.send(FromHost::Exited(report));
    drop(relay);
    drop(out_tx);
    let _ = writer.join();
    Ok(())
}

/// The protocol's ends: stdin, and a duplicate of stdout. Stdout itself then points at stderr,
/// so that anything printing to it (llama.cpp, a library) cannot corrupt the frames.
fn take_stdio() -> Result<(std::fs::File, std::fs::File), String> {
    // SAFETY: dup/dup2 on the process's standard descriptors, before any other thread of ours
    // writes to stdout; the duplicate is a new descriptor we own from here on.
    let out = unsafe {
        let fd = libc::dup(1);
        if fd < 0 || libc::dup2(2, 1) < 0 {
            return Err(format!("cannot set up the protocol pipe: {}", std::io::Error::last_os_error()));
        }
        OwnedFd::from_raw_fd(fd)
    };
    // SAFETY: fd 0 is this process's stdin, which nothing else in it reads.
    let input = unsafe { OwnedFd::from_raw_fd(libc::dup(0)) };
    Ok((std::fs::File::from(input), std::fs::File::from(out)))
}

fn write_frames(out: std::fs::File, rx: std::sync::mpsc::Receiver<FromHost>) {
    let mut out = BufWriter::new(out);
    while let Ok(message) = rx.recv() {
        if wire::write_blocking(&mut out, &message).is_err() {
            return;
        }
        // Batch what is already waiting; flush before blocking again.
        while let Ok(more) = rx.try_recv() {
            if wire::write_blocking(&mut out, &more).is_err() {
                return;
            }
        }
        if out.flush().is_err() {
            return;
        }
    }
}

fn read_frames(input: std::fs::File, tx: mpsc::UnboundedSender<ToHost>) {
    let mut input = BufReader::new(input);
    while let Ok(Some(message)) = wire::read_blocking::<ToHost>(&mut input) {
        if tx.send(message).is_err() {
            return;
        }
    }
    // End of stdin (or garbage on it): dropping `tx` tells `run` to shut down.
}

fn forward_logs(logs: &LogBuffer, out: std::sync::mpsc::Sender<FromHost>) {
    let (_, mut follow) = logs.follow(0, None);
    tokio::spawn(async move {
        loop {
            match follow.recv().await {
                Ok(line) => {
                    let message = FromHost::Log { level: line.level.to_string(), message: line.message };
                    if out.send(message).is_err() {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return,
            }
        }
    });
}

fn forward_stats(engine: &Engine, out: std::sync::mpsc::Sender<FromHost>) {
    let stats = engine.stats.clone();
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let now = stats.snapshot();
            let key = (now.requests_total, now.generated_tokens_total, now.slots_busy, now.queued, now.kv_tokens);
            if last != Some(key) {
                last = Some(key);
                if out.send(FromHost::Stats(now)).is_err() {
                    return;
                }
            }
            tokio::time::sleep(STATS_EVERY).await;
        }
    });
}

/// Turns the parent's messages into engine commands, and their answers into messages.
struct Relay {
    engine: Engine,
    out: std::sync::mpsc::Sender<FromHost>,
    /// Generations in flight by the parent's id, to cancel them.
    running: Arc<Mutex<HashMap<u64, AbortHandle>>>,
    /// The parent admits requests; this only satisfies the engine's command shape.
    permits: Arc<Semaphore>,
}

impl Relay {
    fn handle(&self, message: ToHost) {
        let tx = &self.engine.tx;
        match message {
            ToHost::Start(_) | ToHost::Shutdown { .. } => {}
            ToHost::Generate { id, request } => {
                let (events, mut rx) = mpsc::unbounded_channel();
                let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                    let _ = self.out.send(FromHost::Event { id, event: Err(EngineError::Stopped) });
                    return;
                };
                if tx.send(EngineCommand::Generate { request: *request, events, permit }).is_err() {
                    let _ = self.out.send(FromHost::Event { id, event: Err(EngineError::Stopped) });
                    return;
                }
                let out = self.out.clone();
                let stats = self.engine.stats.clone();
                let running = self.running.clone();
                let mut guard = self.running.lock();
                let task = tokio::spawn(async move {
                    let mut ended = false;
                    while let Some(event) = rx.recv().await {
                        ended = matches!(event, Ok(StreamEvent::Done { .. }) | Err(_));
                        if ended {
                            // The counters this request moved reach the parent before its end does.
                            let _ = out.send(FromHost::Stats(stats.snapshot()));
                        }
                        if out.send(FromHost::Event { id, event }).is_err() || ended {
                            break;
                        }
                    }
                    if !ended {
                        let _ = out.send(FromHost::Event { id, event: Err(EngineError::IncompleteGeneration) });
                    }
                    running.lock().remove(&id);
                });
                // Under the lock the task's own removal waits for, so it cannot come first.
                guard.insert(id, task.abort_handle());
            }
            ToHost::Cancel { id } => {
                if let Some(task) = self.running.lock().remove(&id) {
                    // Dropping the task drops its receiver: the engine sees the client gone.
                    task.abort();
                }
            }
            ToHost::Ping { id } => self.ask(id, EngineCommand::Ping, |()| Reply::Pong),
            ToHost::Tokenize { id, text, add_special, parse_special } => self.ask(
                id,
                |reply| EngineCommand::Tokenize { text, add_special, parse_special, reply },
                Reply::Tokens,
            ),
            ToHost::Detokenize { id, tokens } => {
                self.ask(id, |reply| EngineCommand::Detokenize { tokens, reply }, Reply::Text)
            }
            ToHost::Slots { id } => self.ask(id, EngineCommand::Slots, Reply::Slots),
            ToHost::Slot { id, slot, action } => {
                self.ask(id, |reply| EngineCommand::Slot { slot, action, reply }, Reply::Slot)
            }
            ToHost::Lora { id, set } => self.ask(id, |reply| EngineCommand::Lora { set, reply }, Reply::Lora),
            ToHost::Embed { id, inputs } => {
                let Ok(permit) = self.permits.clone().try_acquire_owned() else { return };
                self.ask(id, |reply| EngineCommand::Embed { inputs, reply, permit }, Reply::Embeddings)
            }
        }
    }

    /// Sends a command with a reply channel; its answer goes back as a `Reply` (none if the
    /// engine is gone: the parent fails what is pending when the process ends).
    fn ask<T: Send + 'static>(
        &self,
        id: u64,
        command: impl FnOnce(oneshot::Sender<T>) -> EngineCommand,
        wrap: impl FnOnce(T) -> Reply + Send + 'static,
    ) {
        let (reply, rx) = oneshot::channel();
        if self.engine.tx.send(command(reply)).is_err() {
            return;
        }
        let out = self.out.clone();
        tokio::spawn(async move {
            if let Ok(answer) = rx.await {
                let _ = out.send(FromHost::Reply { id, reply: wrap(answer) });
            }
        });
    }
}
