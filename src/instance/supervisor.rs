//! The lifecycle side of the registry: start, stop, restart, automatic restarts, on-demand
//! start, idle stops and eviction.
//!
//! Every outcome of an asynchronous step (a load finishing, an engine dying, a restart delay
//! running out) is applied under the registry lock only if the instance's `generation` is still
//! the one that step belongs to; a stop or a newer start bumps it, which is how a stale result
//! is recognised without extra state.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::Level;

use super::{apply, chat_template, memory, Event, InstanceError, ModelSource, Registry, Running, Serving, Status};
use crate::engine::weights;
use crate::engine::{EngineConfig, EngineError, EngineThread, ExitReport};

/// How long a shutdown waits for the engine thread to finish its current step and exit.
const JOIN_DEADLINE: Duration = Duration::from_secs(30);
/// How often the supervisor looks for idle instances.
const IDLE_CHECK: Duration = Duration::from_millis(250);
/// How long an instance parked to make room may take to finish its requests: as long as they
/// take (a day bounds a runaway), since a swap never cuts a stream.
const SWAP_DRAIN: Duration = Duration::from_secs(86_400);
/// How often a request waiting for room looks again.
const ROOM_POLL: Duration = Duration::from_millis(25);

/// How to stop: let in-flight requests finish for up to `timeout`, or cancel them at once.
#[derive(Debug, Clone, Copy)]
pub struct StopMode {
    pub force: bool,
    pub timeout: Duration,
}

impl Default for StopMode {
    fn default() -> Self {
        StopMode { force: false, timeout: Duration::from_secs(30) }
    }
}

/// Where a starting instance's model file comes from.
enum Fetch {
    Local(PathBuf),
    /// Downloaded first if missing (`hf_repo`, `hf_file`).
    Hub(super::ModelFetcher, String, Option<String>),
}

type LoadOutcome = Result<(EngineThread, oneshot::Receiver<ExitReport>), EngineError>;

/// Frees a model's weights that a start is waiting on. It takes ~90 ms here, nearly all of it
/// `free` calls (llama.cpp tearing down a 262k-token vocabulary, glibc merging the chunks), so
/// for weights in host memory it is taken off the start's path: the next model spends its first
/// few hundred milliseconds parsing metadata and vocabulary before it maps any tensor, and the
/// two barely overlap in memory (a cold swap's first token came 93 ms after a bare load's
/// before, 4–17 ms after now). Device memory (GPU layers, RPC workers) is freed first, before the
/// next load asks for its own.
///
/// The freeing thread is a new one, and it allocates before the start goes on: glibc gives a
/// new thread the malloc arena most recently left by a thread that ended, which is the one the
/// old engine's thread allocated these weights in. The next engine's thread, started after,
/// gets another arena; allocating its vocabulary among the old one's frees in the same arena
/// left its live blocks scattered over pages no trim could return (resident memory grew ~3 MiB
/// per swap, measured with `paddock bench --swap-cold`).
fn free_weights(weights: Arc<weights::Weights>) {
    if !weights.in_host_memory() {
        return drop(weights);
    }
    let (bound_tx, bound_rx) = std::sync::mpsc::sync_channel(1);
    let spawned = std::thread::Builder::new().name("free-weights".into()).spawn(move || {
        let _ = bound_tx.send(std::hint::black_box(vec![0u8; 64]));
        drop(weights);
    });
    match spawned {
        Ok(_) => {
            let _ = bound_rx.recv();
        }
        Err(e) => tracing::warn!("cannot start a thread to free weights ({e}); freed on this one"),
    }
}

impl Registry {
    /// Starts an instance: makes room under `max_running_instances` (draining the least recently
    /// used evictable instance), then begins loading. Returns `starting` at once; the outcome
    /// (`running`, or `failed` with its reason) is applied when the load ends.
    pub async fn start(&self, name: &str) -> Result<Status, InstanceError> {
        let started = self.start_with(name, memory::Urgency::Now).await?;
        Ok(started.expect("a start that may evict anything never waits"))
    }

    /// Starts `name` if room can be made with `urgency`; None when a patient start must wait.
    async fn start_with(&self, name: &str, urgency: memory::Urgency) -> Result<Option<Status>, InstanceError> {
        self.check_startable(name)?;
        self.read_model_shape(name).await;
        if !self.make_room(name, urgency).await? {
            return Ok(None);
        }
        let status = self.begin_start(name, true)?;
        self.set_desired(name, true).await;
        Ok(Some(status))
    }

    fn check_startable(&self, name: &str) -> Result<(), InstanceError> {
        self.with_entry(name, |e| {
            e.status
                .transition(Event::Start)
                .map_err(|source| InstanceError::Transition { name: name.to_string(), source })?;
            match &e.spec.source {
                ModelSource::HuggingFace { hf_repo, .. } if self.inner.fetcher.lock().is_none() => {
                    Err(InstanceError::ModelNotAvailable { name: name.to_string(), repo: hf_repo.clone() })
                }
                _ => Ok(()),
            }
        })?
    }

    /// Reads the model's memory figures if its file was not read yet (an instance restored
    /// from the database).
    async fn read_model_shape(&self, name: &str) {
        // Once per model file: a header without the figures does not gain them by a restart.
        let Ok(Some(path)) = self.with_entry(name, |e| match (&e.model_file, e.spec.model_path()) {
            (None, Some(path)) => Some(path.clone()),
            _ => None,
        }) else {
            return;
        };
        self.learn_model_file(name, path).await;
    }

    /// Parks or frees other instances until `name` may start: under `max_running_instances`,
    /// and within the memory budget. One step at a time, planned again after each, since
    /// draining an instance takes a while and the world changes meanwhile. False when a patient
    /// start must wait for busy instances.
    async fn make_room(&self, name: &str, urgency: memory::Urgency) -> Result<bool, InstanceError> {
        let mut steps = 0;
        loop {
            let step = self.next_room_step(name, urgency)?;
            steps += 1;
            match step {
                memory::Step::Fits => return Ok(true),
                memory::Step::Wait => return Ok(false),
                // Each step parks or frees one instance; more steps than that means the same
                // victim keeps coming back (its park failing), so give up rather than spin.
                _ if steps > 2 * self.inner.map.lock().len() + 2 => {
                    return Err(InstanceError::NoCapacity(format!(
                        "could not make room for '{name}': instances did not give way"
                    )))
                }
                memory::Step::Park(victim) => {
                    // A swap is a model leaving residency; freeing parked weights is not one.
                    self.inner.swaps.fetch_add(1, Ordering::Relaxed);
                    self.publish_scheduler();
                    // Its requests finish first, however long they take: never cut a stream.
                    let _ = self.park(&victim, SWAP_DRAIN).await;
                }
                memory::Step::Release(victim) => self.release(&victim),
                memory::Step::Refuse(details) => {
                    return Err(InstanceError::InsufficientMemory { name: name.to_string(), details })
                }
            }
        }
    }

    fn next_room_step(&self, name: &str, urgency: memory::Urgency) -> Result<memory::Step, InstanceError> {
        let map = self.inner.map.lock();
        let holders: Vec<_> = map.values().filter_map(super::Entry::holder).collect();
        let log = |victim: &str, message: String| {
            if let Some(e) = map.get(victim) {
                e.logs.push(Level::INFO, message);
            }
        };
        // The caps by count: max_running_instances over all, then the instance's group's.
        let group = map.get(name).and_then(|e| e.spec.policy.group.clone());
        let group_max = group.as_ref().and_then(|g| self.inner.group_limits.lock().get(g).copied());
        let caps = [
            (*self.inner.max_running.lock(), None, "max_running_instances".to_string()),
            (group_max, group.clone(), format!("group '{}' max_running", group.as_deref().unwrap_or_default())),
        ];
        for (max, only_group, what) in caps {
            let Some(max) = max else { continue };
            let member = |e: &super::Entry| only_group.is_none() || e.spec.policy.group == only_group;
            let active: Vec<&super::Entry> = map
                .values()
                .filter(|e| e.spec.name != name && member(e) && matches!(e.status, Status::Running | Status::Starting))
                .collect();
            if active.len() < max {
                continue;
            }
            let members: Vec<memory::Holder> =
                map.values().filter(|e| member(e)).filter_map(super::Entry::holder).collect();
            return match memory::running_victim(&members, name, urgency) {
                Ok(Some(victim)) => {
                    log(&victim.name, format!("parked to make room for '{name}' ({what} {max})"));
                    Ok(memory::Step::Park(victim.name.clone()))
                }
                Err(()) => Ok(memory::Step::Wait),
                Ok(None) => {
                    let names: Vec<_> = active.iter().map(|e| format!("{} ({})", e.spec.name, e.status)).collect();
                    Err(InstanceError::NoCapacity(format!(
                        "{what} is {max} and none of the running instances can be evicted: {}",
                        names.join(", ")
                    )))
                }
            };
        }
        let Some(entry) = map.get(name) else { return Err(InstanceError::NotFound(name.to_string())) };
        let Some(footprint) = entry.footprint() else { return Ok(memory::Step::Fits) };
        let budget = *self.inner.memory_budget.lock();
        let step = memory::plan(budget, &holders, name, &entry.weights_key, footprint, urgency);
        if let memory::Step::Park(victim) | memory::Step::Release(victim) = &step {
            let verb = if matches!(step, memory::Step::Park(_)) { "parked" } else { "weights freed" };
            let need = memory::cost(&holders, name, &entry.weights_key, footprint);
            log(
                victim,
                format!(
                    "{verb} to make room for '{name}' ({} MiB) within memory_budget ({} MiB)",
                    need >> 20,
                    budget >> 20
                ),
            );
        }
        Ok(step)
    }

    /// Frees a parked instance's weights (unless other instances use them too): it is stopped.
    fn release(&self, name: &str) {
        let weights = {
            let mut map = self.inner.map.lock();
            let Some(e) = map.get_mut(name).filter(|e| e.status == Status::Parked) else { return };
            let _ = apply(&self.inner.events, e, Event::Stop);
            e.logs.push(Level::INFO, "stopped: its weights were freed to make room");
            e.parked.take()
        };
        if let Some((weights, _)) = weights {
            free_weights(weights);
        }
    }

    /// `manual`: a user's start resets the automatic-restart count.
    fn begin_start(&self, name: &str, manual: bool) -> Result<Status, InstanceError> {
        let (config, generation, fetch, logs) = {
            let mut map = self.inner.map.lock();
            let e = map.get_mut(name).ok_or_else(|| InstanceError::NotFound(name.to_string()))?;
            let fetch = match &e.spec.source {
                ModelSource::Path { model_path } => Fetch::Local(model_path.clone()),
                ModelSource::HuggingFace { hf_repo, hf_file } => match self.inner.fetcher.lock().clone() {
                    Some(fetcher) => Fetch::Hub(fetcher, hf_repo.clone(), hf_file.clone()),
                    None => {
                        return Err(InstanceError::ModelNotAvailable { name: name.to_string(), repo: hf_repo.clone() })
                    }
                },
            };
            if let (Some(port), None) = (e.spec.port, &e.port_listener) {
                let host = *self.inner.bind_host.lock();
                let listener = std::net::TcpListener::bind((host, port)).map_err(|err| InstanceError::PortInUse {
                    name: name.to_string(),
                    port,
                    reason: err.to_string(),
                })?;
                e.port_listener = Some(listener);
            }
            apply(&self.inner.events, e, Event::Start)?;
            e.generation += 1;
            if manual {
                e.restarts = 0;
                e.error = None;
            }
            e.cancel_load = Arc::new(AtomicBool::new(false));
            e.logs.push(Level::INFO, "starting: loading model");
            let options = e.spec.options.clone();
            let (logs, cancel) = (e.logs.clone(), e.cancel_load.clone());
            let name = name.to_string();
            let stopped = e.cancel_load.clone();
            let kv_dir = self.kv_dir(&name);
            (
                move |path| EngineConfig { kv_dir, ..options.engine_config(&name, path, logs, cancel) },
                e.generation,
                fetch,
                (e.logs.clone(), stopped),
            )
        };
        let (logs, stopped) = logs;
        let registry = self.clone();
        let name = name.to_string();
        let is_hub = matches!(fetch, Fetch::Hub(..));
        tokio::spawn(async move {
            let path = match fetch {
                Fetch::Local(path) => Ok(path),
                Fetch::Hub(fetcher, repo, file) => {
                    let log_line: Arc<dyn Fn(String) + Send + Sync> = Arc::new(move |l| logs.push(Level::INFO, l));
                    let what = format!("{repo} {}", file.as_deref().unwrap_or("(recommended variant)"));
                    // A stop during the download ends the start at once; the download goes on.
                    let stop = async move {
                        while !stopped.load(Ordering::Relaxed) {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    };
                    tokio::select! {
                        r = fetcher(repo, file, log_line) => r.map_err(|reason| EngineError::Load { path: what, reason }),
                        _ = stop => Err(EngineError::LoadCancelled),
                    }
                }
            };
            if let (Ok(path), true) = (&path, is_hub) {
                registry.learn_model_file(&name, path.clone()).await;
            }
            let outcome = match path {
                Ok(path) => EngineThread::start(config(path)).await,
                Err(e) => Err(e),
            };
            registry.finish_start(&name, generation, outcome).await;
        });
        Ok(Status::Starting)
    }

    /// A Hugging Face model's file is known once downloaded: its memory figures with it.
    async fn learn_model_file(&self, name: &str, path: PathBuf) {
        let read = path.clone();
        let shape = tokio::task::spawn_blocking(move || super::read_shape(&read)).await.ok().flatten();
        if let Some(e) = self.inner.map.lock().get_mut(name) {
            e.set_model(path, shape);
        }
    }

    async fn finish_start(&self, name: &str, generation: u64, outcome: LoadOutcome) {
        let mut orphan = None;
        let mut watch = None;
        let mut failed = false;
        let _unparked;
        {
            let mut map = self.inner.map.lock();
            let Some(e) = map.get_mut(name) else { return };
            // The engine holds its own reference to the weights now (or failed to start).
            _unparked = e.parked.take();
            match outcome {
                Ok((thread, exited)) if e.generation == generation && e.status == Status::Starting => {
                    let template = chat_template(thread.engine().info(), &e.logs);
                    let serving = Serving { engine: thread.engine().clone(), template };
                    e.running = Some(Running { thread, serving, since: std::time::Instant::now() });
                    let _ = apply(&self.inner.events, e, Event::Loaded);
                    e.logs.push(Level::INFO, "running");
                    watch = Some(exited);
                }
                // A stop (or a newer start) came in while loading: this engine is not wanted.
                Ok((thread, _)) => orphan = Some(thread),
                Err(err) if e.generation == generation && e.status == Status::Starting => {
                    let _ = apply(&self.inner.events, e, Event::LoadFailed);
                    e.logs.push(Level::ERROR, format!("start failed: {err}"));
                    e.error = Some(err.to_string());
                    failed = true;
                }
                Err(_) => {}
            }
            if e.status == Status::Stopping && e.running.is_none() {
                let _ = apply(&self.inner.events, e, Event::Halted);
                e.logs.push(Level::INFO, "stopped");
            }
        }
        if let Some(thread) = orphan {
            let _ = tokio::task::spawn_blocking(move || thread.shutdown(JOIN_DEADLINE, false)).await;
        }
        if failed {
            self.schedule_restart(name, generation);
        }
        if let Some(exited) = watch {
            let registry = self.clone();
            let name = name.to_string();
            tokio::spawn(async move {
                let report = exited.await.unwrap_or_else(|_| Err("engine thread vanished".into()));
                registry.engine_exited(&name, generation, report);
            });
        }
    }

    /// The engine thread ended. If nobody asked it to, the instance has failed.
    fn engine_exited(&self, name: &str, generation: u64, report: ExitReport) {
        {
            let mut map = self.inner.map.lock();
            let Some(e) = map.get_mut(name).filter(|e| e.generation == generation) else { return };
            if e.status != Status::Running {
                return; // a stop is in charge
            }
            let _ = apply(&self.inner.events, e, Event::Crashed);
            let reason = report.err().unwrap_or_else(|| "engine thread exited".into());
            e.logs.push(Level::ERROR, format!("engine failed: {reason}"));
            e.error = Some(reason);
            e.running = None;
        }
        self.schedule_restart(name, generation);
    }

    /// Applies `auto_restart` to a failed instance: after `restart_delay`, start it again, up to
    /// `max_restarts` times; then leave it failed and say so.
    fn schedule_restart(&self, name: &str, generation: u64) {
        let give_up = |reason: String| {
            self.alert(name, format!("{name} is failed and stays so: {reason}; start it by hand once fixed"));
        };
        let delay = {
            let mut map = self.inner.map.lock();
            let Some(e) = map.get_mut(name).filter(|e| e.generation == generation && e.status == Status::Failed) else {
                return;
            };
            let policy = e.spec.policy.clone();
            let error = e.error.clone().unwrap_or_default();
            if !policy.auto_restart {
                drop(map);
                return give_up(format!("auto_restart is off ({error})"));
            }
            if e.restarts >= policy.max_restarts {
                let message = format!("giving up after {} automatic restarts", e.restarts);
                e.logs.push(Level::ERROR, message.clone());
                drop(map);
                return give_up(format!("{message} ({error})"));
            }
            e.restarts += 1;
            let _ = apply(&self.inner.events, e, Event::ScheduleRestart);
            e.logs.push(
                Level::WARN,
                format!("restart {} of {} in {} s", e.restarts, policy.max_restarts, policy.restart_delay),
            );
            Duration::from_secs_f64(policy.restart_delay)
        };
        let registry = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let still_waiting = registry
                .with_entry(&name, |e| e.generation == generation && e.status == Status::Restarting)
                .unwrap_or(false);
            if still_waiting {
                let _ = registry.begin_start(&name, false);
            }
        });
    }

    /// Stops an instance. Unless `force`, requests in flight may finish for up to the timeout
    /// (new ones are refused at once); what is left then is cancelled. A stop during loading
    /// cancels the load and answers `stopping`.
    pub async fn stop(&self, name: &str, mode: StopMode) -> Result<Status, InstanceError> {
        let parked;
        let (running, mut status_rx) = {
            let mut map = self.inner.map.lock();
            let e = map.get_mut(name).ok_or_else(|| InstanceError::NotFound(name.to_string()))?;
            let was = e.status;
            apply(&self.inner.events, e, Event::Stop)?;
            parked = e.parked.take();
            // Results of what was under way (a load, a restart timer, an engine exit) are now stale;
            // a load still in progress finds the instance stopping and completes the stop.
            e.generation += 1;
            if was == Status::Starting {
                e.cancel_load.store(true, Ordering::Relaxed);
            }
            e.logs.push(Level::INFO, if e.status == Status::Stopped { "stopped" } else { "stopping" });
            (e.running.take(), e.status_tx.subscribe())
        };
        status_rx.borrow_and_update();
        drop(parked);
        self.set_desired(name, false).await;
        let Some(running) = running else {
            // Stopping a load: it is cancelled at llama.cpp's next progress callback; answer once
            // the instance has stopped, so that a DELETE right after succeeds (as with llamactl).
            let _ = tokio::time::timeout(JOIN_DEADLINE, status_rx.wait_for(|s| *s != Status::Stopping)).await;
            return Ok(*status_rx.borrow());
        };
        if !mode.force && !running.serving.engine.drain(mode.timeout).await {
            self.log(name, Level::WARN, format!("requests still running after {:?}; cancelling them", mode.timeout));
        }
        let thread = running.thread;
        drop(running.serving);
        let _ = tokio::task::spawn_blocking(move || thread.shutdown(JOIN_DEADLINE, false)).await;
        let status = {
            let mut map = self.inner.map.lock();
            let Some(e) = map.get_mut(name) else { return Ok(Status::Stopped) };
            let _ = apply(&self.inner.events, e, Event::Halted);
            e.logs.push(Level::INFO, "stopped");
            e.status
        };
        Ok(status)
    }

    /// Parks a running instance: its requests finish (new ones wait for its next start), its
    /// slots' cached prompts are saved, its context is freed, and its weights stay loaded until
    /// the memory budget needs them (see [`memory`]). Its next start only creates a context.
    pub async fn park(&self, name: &str, drain: Duration) -> Result<Status, InstanceError> {
        let (running, key) = {
            let mut map = self.inner.map.lock();
            let e = map.get_mut(name).ok_or_else(|| InstanceError::NotFound(name.to_string()))?;
            apply(&self.inner.events, e, Event::Park)?;
            e.generation += 1;
            e.logs.push(Level::INFO, "parking: finishing requests, then freeing the context");
            (e.running.take(), e.weights_key.clone())
        };
        self.set_desired(name, false).await;
        if let Some(running) = running {
            if !running.serving.engine.drain(drain).await {
                self.log(name, Level::WARN, format!("requests still running after {drain:?}; cancelling them"));
            }
            // Taken before the engine lets go of them, so they stay loaded.
            let weights = key.as_ref().and_then(weights::resident);
            let thread = running.thread;
            drop(running.serving);
            let _ = tokio::task::spawn_blocking(move || thread.shutdown(JOIN_DEADLINE, true)).await;
            let mut map = self.inner.map.lock();
            if let Some(e) = map.get_mut(name) {
                e.parked = weights.map(|w| (w, Instant::now()));
            }
        }
        let status = {
            let mut map = self.inner.map.lock();
            let Some(e) = map.get_mut(name) else { return Ok(Status::Stopped) };
            let _ = apply(&self.inner.events, e, Event::ContextFreed);
            e.logs.push(Level::INFO, "parked: context freed, weights kept loaded");
            e.status
        };
        self.prune_kv().await;
        Ok(status)
    }

    pub(super) fn kv_dir(&self, name: &str) -> Option<PathBuf> {
        self.inner.kv_store.lock().as_ref().map(|(root, _)| root.join(name))
    }

    /// Keeps the saved prompts within their disk budget: the most recently saved first.
    async fn prune_kv(&self) {
        let Some((root, budget)) = self.inner.kv_store.lock().clone() else { return };
        let _ = tokio::task::spawn_blocking(move || {
            let Ok(dirs) = std::fs::read_dir(&root) else { return };
            let mut saved: Vec<(std::time::SystemTime, u64, PathBuf)> = dirs
                .flatten()
                .filter_map(|d| {
                    let files = std::fs::read_dir(d.path()).ok()?;
                    let (mut size, mut newest) = (0, std::time::UNIX_EPOCH);
                    for f in files.flatten().filter_map(|f| f.metadata().ok()) {
                        size += f.len();
                        newest = newest.max(f.modified().unwrap_or(std::time::UNIX_EPOCH));
                    }
                    Some((newest, size, d.path()))
                })
                .collect();
            saved.sort_by_key(|s| std::cmp::Reverse(s.0));
            let mut total = 0;
            for (_, size, dir) in saved {
                total += size;
                if total > budget {
                    tracing::info!(dir = %dir.display(), "saved prompts dropped: kv_cache_disk_budget reached");
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
        })
        .await;
    }

    /// Stop (gracefully) if running, then start.
    pub async fn restart(&self, name: &str) -> Result<Status, InstanceError> {
        let status = self.with_entry(name, |e| e.status)?;
        if matches!(status, Status::Running | Status::Starting) {
            self.stop(name, StopMode::default()).await?;
        }
        self.start(name).await
    }

    /// Starts every stopped or failed instance; one result per instance.
    pub async fn start_all(&self) -> Vec<(String, Result<Status, InstanceError>)> {
        let names = self.names_where(|s| matches!(s, Status::Stopped | Status::Failed));
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let r = self.start(&name).await;
            out.push((name, r));
        }
        out
    }

    /// Stops every running or starting instance; one result per instance.
    pub async fn stop_all(&self, mode: StopMode) -> Vec<(String, Result<Status, InstanceError>)> {
        let names = self.names_where(|s| matches!(s, Status::Running | Status::Starting | Status::Restarting));
        let results = futures::future::join_all(names.iter().map(|n| self.stop(n, mode))).await;
        names.into_iter().zip(results).collect()
    }

    /// The serving handles of `name`, starting it first if it is stopped (or parked) and allows
    /// on-demand starts; at most `timeout` in all.
    ///
    /// When the start needs another instance to give way, the request is patient for up to
    /// `swap_max_wait`: instances that are serving, or only just started, are not parked for it
    /// until then (see [`memory::Urgency`]). Interleaved requests for models that do not fit
    /// together are so served in runs of one model rather than a swap each; past the wait, the
    /// start takes room the user's way, draining (never cutting) what it parks.
    pub async fn serving_or_start(&self, name: &str, timeout: Duration) -> Result<Serving, InstanceError> {
        match self.serving(name) {
            Err(InstanceError::NotRunning { .. }) => {}
            other => return other,
        }
        let (on_demand, mut status_rx) =
            self.with_entry(name, |e| (e.spec.policy.on_demand_start, e.status_tx.subscribe()))?;
        if !on_demand {
            return self.serving(name);
        }
        let deadline = Instant::now() + timeout;
        let waiting = Waiting::new(self, name);
        loop {
            let policy = *self.inner.swap_policy.lock();
            let urgency = if waiting.since.elapsed() < policy.max_wait {
                memory::Urgency::Patient { min_resident: policy.min_resident }
            } else {
                memory::Urgency::Now
            };
            let draining = || self.with_entry(name, |e| e.status == Status::Stopping).unwrap_or(false);
            match self.start_with(name, urgency).await {
                // Started, or someone else is starting it (or it came up meanwhile): wait for the
                // outcome. Being parked or stopped right now: try again once it has.
                Ok(Some(_)) => break,
                Err(InstanceError::Transition { .. }) if !draining() => break,
                Ok(None) | Err(InstanceError::Transition { .. }) => {}
                Err(e) => return Err(e),
            }
            if Instant::now() >= deadline {
                return Err(InstanceError::StartTimeout { name: name.to_string(), secs: timeout.as_secs() });
            }
            tokio::time::sleep(ROOM_POLL).await;
        }
        drop(waiting);
        let left = deadline.saturating_duration_since(Instant::now());
        let settled = tokio::time::timeout(
            left,
            status_rx.wait_for(|s| !matches!(s, Status::Starting | Status::Stopped | Status::Parked)),
        )
        .await;
        match settled {
            Err(_) => Err(InstanceError::StartTimeout { name: name.to_string(), secs: timeout.as_secs() }),
            Ok(_) => self.serving(name).map_err(|e| match e {
                InstanceError::NotRunning { .. } => {
                    let reason =
                        self.with_entry(name, |e| e.error.clone()).ok().flatten().unwrap_or_else(|| "stopped".into());
                    InstanceError::StartFailed { name: name.to_string(), reason }
                }
                other => other,
            }),
        }
    }

    /// Runs the background supervision (idle stops) until the registry is dropped.
    pub fn spawn_supervisor(&self) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(IDLE_CHECK);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let registry = Registry { inner };
                for name in registry.idle_instances() {
                    registry.log(&name, Level::INFO, "idle timeout reached; parking");
                    let _ = registry.park(&name, StopMode::default().timeout).await;
                }
            }
        });
    }

    fn idle_instances(&self) -> Vec<String> {
        let map = self.inner.map.lock();
        map.values()
            .filter(|e| e.status == Status::Running && e.spec.policy.idle_timeout > 0.0)
            .filter(|e| {
                e.running.as_ref().is_some_and(|r| {
                    let engine = &r.serving.engine;
                    !engine.is_busy() && engine.idle_for().as_secs_f64() > e.spec.policy.idle_timeout * 60.0
                })
            })
            .map(|e| e.spec.name.clone())
            .collect()
    }

    fn names_where(&self, keep: impl Fn(Status) -> bool) -> Vec<String> {
        let map = self.inner.map.lock();
        let mut names: Vec<String> = map.values().filter(|e| keep(e.status)).map(|e| e.spec.name.clone()).collect();
        names.sort();
        names
    }

    fn log(&self, name: &str, level: Level, message: impl Into<String>) {
        let _ = self.with_entry(name, |e| e.logs.push(level, message));
    }
}

/// A request waiting for its instance to start, counted on the instance while it waits (the
/// count drops when the request is served, fails, or its client goes away).
struct Waiting<'r> {
    registry: &'r Registry,
    name: String,
    since: Instant,
}

impl<'r> Waiting<'r> {
    fn new(registry: &'r Registry, name: &str) -> Self {
        if let Some(e) = registry.inner.map.lock().get_mut(name) {
            e.waiting += 1;
        }
        registry.publish_scheduler();
        Waiting { registry, name: name.to_string(), since: Instant::now() }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(e) = self.registry.inner.map.lock().get_mut(&self.name) {
            e.waiting = e.waiting.saturating_sub(1);
        }
        self.registry.publish_scheduler();
    }
}
