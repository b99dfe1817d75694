//! Instances: options + status + the engine thread that serves them.
//!
//! # Layout
//! - [`lifecycle`]: `Status` and its legal transitions.
//! - [`options`]: user-facing options and their validation into an `EngineConfig`.
//! - [`spec`]: model source, options and supervision policy: what is persisted.
//! - [`supervisor`]: start, stop (graceful drain), restart, automatic restarts, on-demand
//!   start, parking (eviction under `max_running_instances` and the memory budget, idle stops).
//! - [`memory`]: the memory budget's accounting and which instance gives way (pure).
//! - this file: [`Registry`], the one handle to all instances; create, update, delete, views.
//!
//! # Locking
//! One `parking_lot::Mutex` guards the map of instances. It is never held across an `.await`
//! or a call into llama.cpp: loading and joining engines happen outside it, and results are
//! applied under it afterwards, checked against the instance's `generation` so that a late
//! result of an earlier start cannot overwrite a newer one.

pub mod lifecycle;
pub mod memory;
pub mod options;
pub mod spec;
pub mod store;
mod supervisor;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{broadcast, watch};
use tracing::Level;

use crate::engine::chat::ChatTemplate;
use crate::engine::weights::{Weights, WeightsKey};
use crate::engine::{Engine, EngineThread, ModelInfo, StatsSnapshot};
use crate::logs::{LogBuffer, LogLine};
use crate::models::memory::{Footprint, Shape};
pub use lifecycle::{Event, IllegalTransition, Status};
pub use options::InstanceOptions;
pub use spec::{InstanceSpec, ModelSource, Policy, PolicyPatch, SpecPatch};
pub use supervisor::StopMode;

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("instance '{0}' not found")]
    NotFound(String),
    #[error("instance '{0}' already exists")]
    AlreadyExists(String),
    #[error("invalid instance name '{0}': use 1-64 letters, digits, '-', '_' or '.', not starting with '.'")]
    InvalidName(String),
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    #[error("model file not found: {0}")]
    ModelNotFound(String),
    #[error("instance '{name}': {source}")]
    Transition { name: String, source: IllegalTransition },
    #[error("instance '{name}' is {status}; start it first")]
    NotRunning { name: String, status: Status },
    #[error("instance '{name}' is {status}; stop it before deleting it")]
    Busy { name: String, status: Status },
    #[error(
        "instance '{name}' uses the Hugging Face model {repo}, which this server cannot download; give a model_path"
    )]
    ModelNotAvailable { name: String, repo: String },
    #[error("instance '{name}' failed to start: {reason}")]
    StartFailed { name: String, reason: String },
    #[error("instance '{name}' did not become ready within {secs} s")]
    StartTimeout { name: String, secs: u64 },
    #[error("{0}")]
    NoCapacity(String),
    /// The memory budget cannot hold the instance even after parking and freeing what may be.
    #[error("not enough memory to start '{name}' within memory_budget")]
    InsufficientMemory { name: String, details: String },
    #[error("persisting the change failed: {0}")]
    Store(String),
    #[error("{path} is not a usable GGUF model: {reason}")]
    InvalidModel { path: String, reason: String },
    #[error("instance '{name}' cannot listen on port {port}: {reason}")]
    PortInUse { name: String, port: u16, reason: String },
}

/// How long a health check waits for the engine loop to answer.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Health {
    pub status: &'static str,
    pub checks: HealthChecks,
    pub last_check: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct HealthChecks {
    /// The engine thread's state.
    pub process: &'static str,
    /// The instance's own port: `open` while it runs, `closed` otherwise, `none` without one.
    pub port: &'static str,
    /// Whether the engine loop answered a ping.
    pub response: &'static str,
}

/// A status transition, as published.
#[derive(Debug, Clone, Serialize)]
pub struct StatusChange {
    pub name: String,
    pub old: Status,
    pub status: Status,
    pub at: DateTime<Utc>,
}

/// What the registry publishes (to the WebSocket and the instance-port server), in the order
/// it happened.
#[derive(Debug, Clone)]
pub enum RegistryEvent {
    /// Every transition, each once.
    Status(StatusChange),
    /// Sent once the change is persisted.
    Created(String),
    Updated(String),
    Deleted(String),
    Alert(Alert),
    /// Requests started waiting or stopped waiting for an instance, or a swap happened.
    Scheduler(SchedulerView),
}

/// What GET returns for an instance.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct InstanceView {
    pub name: String,
    pub status: Status,
    #[serde(flatten)]
    pub source: ModelSource,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub options: InstanceOptions,
    #[serde(flatten)]
    pub policy: Policy,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The process the engine runs in: paddock's own, or the instance's with isolation "process".
    pub pid: u32,
    /// Automatic restarts since the last manual start.
    pub restarts: u32,
    /// Why the instance failed, while it is `failed` or `restarting`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The loaded model, while running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelInfo>,
    /// Engine counters, while running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<InstanceStats>,
    /// What the instance costs (or would cost) in memory; absent while its model file is unknown
    /// (a Hugging Face model not yet downloaded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<InstanceMemory>,
    /// Requests waiting for it to start (on-demand starts that wait for room).
    pub waiting: usize,
}

/// An instance's memory, computed from its GGUF and options (see `models::memory`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct InstanceMemory {
    /// Model weights and vocabulary tables, in bytes.
    pub weights: u64,
    /// KV cache, in bytes.
    pub kv: u64,
    /// Logits and the activations of one micro-batch, in bytes.
    pub compute: u64,
    pub total: u64,
    /// Where it lives (`CPU` = RAM).
    pub device: &'static str,
    /// Other instances that hold the same weights now (running or parked): the weights are
    /// loaded, and counted, once for all of them.
    pub weights_shared_with: Vec<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct InstanceStats {
    /// Bytes the instance holds by the memory estimate (weights, KV cache, compute), or of its
    /// weights alone when there is no estimate.
    pub memory_usage: u64,
    /// Seconds since the engine became ready.
    pub uptime: u64,
    /// CPU time of the engine thread, in milliseconds (None where /proc is missing). llama.cpp's
    /// worker threads (OpenMP's) are not attributed to an instance and are not counted.
    pub cpu_time_ms: Option<u64>,
    /// The engine thread's CPU use since it started, in percent of one core.
    pub cpu_usage: Option<f64>,
    /// Generation speed of finished requests, tokens per second of generation time.
    pub tokens_per_second: f64,
    #[serde(flatten)]
    pub engine: StatsSnapshot,
}

/// CPU time a thread of this process has used, from the kernel's scheduler statistics
/// (`/proc/self/task/<tid>/schedstat`: nanoseconds on the CPU first).
fn thread_cpu_ms(tid: u64) -> Option<u64> {
    if tid == 0 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(ns / 1_000_000)
}

/// CPU time of a whole process (an instance process: its engine and its relay), from
/// /proc/<pid>/stat's utime + stime.
fn process_cpu_ms(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces, so split after its ')').
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf with a valid name only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(ticks * 1000 / hz)
}

/// A running instance's serving handles, cloned out for a request.
#[derive(Clone)]
pub struct Serving {
    pub engine: Engine,
    pub template: ChatTemplate,
}

struct Running {
    thread: EngineThread,
    serving: Serving,
    since: Instant,
}

struct Entry {
    spec: InstanceSpec,
    status: Status,
    /// Follows `status`, for waiting on a change (on-demand start) without polling.
    status_tx: watch::Sender<Status>,
    running: Option<Running>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    error: Option<String>,
    logs: Arc<LogBuffer>,
    cancel_load: Arc<AtomicBool>,
    /// Bumped by every start and stop; results of an older one are ignored.
    generation: u64,
    restarts: u32,
    /// Whether the instance should run (persisted: it comes back up after a restart of paddock).
    desired_running: bool,
    /// The instance's own port, bound when it starts (so a port in use fails the start) and
    /// taken by the API layer, which serves the instance's routes on it while it runs.
    port_listener: Option<std::net::TcpListener>,
    /// The model file: the spec's path, or where a Hugging Face model was downloaded to.
    model_file: Option<PathBuf>,
    /// The model's header figures, read when the model file became known.
    shape: Option<Arc<Shape>>,
    /// Which loaded weights it uses or would use.
    weights_key: Option<WeightsKey>,
    /// While parked: the weights kept loaded for it, and since when.
    parked: Option<(Arc<Weights>, Instant)>,
    /// Requests waiting for it to start.
    waiting: usize,
}

impl Entry {
    fn new(spec: InstanceSpec, created_at: DateTime<Utc>) -> Entry {
        Entry {
            spec,
            status: Status::Stopped,
            status_tx: watch::Sender::new(Status::Stopped),
            running: None,
            created_at,
            updated_at: created_at,
            error: None,
            logs: Arc::new(LogBuffer::default()),
            cancel_load: Arc::new(AtomicBool::new(false)),
            generation: 0,
            restarts: 0,
            desired_running: false,
            port_listener: None,
            model_file: None,
            shape: None,
            weights_key: None,
            parked: None,
            waiting: 0,
        }
    }

    /// Records the model file and its header (read by [`read_shape`]).
    fn set_model(&mut self, file: PathBuf, shape: Option<Shape>) {
        self.weights_key = Some(self.spec.options.weights_key(&self.spec.name, &file));
        self.shape = shape.map(Arc::new);
        self.model_file = Some(file);
    }

    fn footprint(&self) -> Option<Footprint> {
        self.shape.as_ref().map(|s| self.spec.options.footprint(s))
    }

    /// Holds a context: its weights and KV cache are in memory, or being loaded or freed.
    fn is_active(&self) -> bool {
        matches!(self.status, Status::Running | Status::Starting | Status::Stopping)
    }

    /// What it holds, for the memory budget; None when it holds nothing.
    fn holder(&self) -> Option<memory::Holder> {
        let state = if self.is_active() {
            let engine = self.running.as_ref().map(|r| &r.serving.engine);
            memory::Held::Active {
                evictable: self.spec.policy.evictable,
                starting: self.status != Status::Running,
                busy: engine.is_some_and(Engine::is_busy),
                idle_for: engine.map_or(Duration::ZERO, Engine::idle_for),
                resident_for: self.running.as_ref().map_or(Duration::ZERO, |r| r.since.elapsed()),
            }
        } else if let Some((_, since)) = &self.parked {
            memory::Held::Parked { idle_for: since.elapsed() }
        } else {
            return None;
        };
        Some(memory::Holder {
            name: self.spec.name.clone(),
            state,
            key: self.weights_key.clone(),
            footprint: self.footprint(),
        })
    }

    fn view(&self) -> InstanceView {
        InstanceView {
            name: self.spec.name.clone(),
            status: self.status,
            source: self.spec.source.clone(),
            port: self.spec.port,
            options: self.spec.options.clone(),
            policy: self.spec.policy.clone(),
            created_at: self.created_at,
            updated_at: self.updated_at,
            pid: self.running.as_ref().and_then(|r| r.thread.pid()).unwrap_or_else(std::process::id),
            restarts: self.restarts,
            error: self.error.clone(),
            model: self.running.as_ref().map(|r| r.serving.engine.info().clone()),
            stats: self.running.as_ref().map(|r| {
                let engine = r.serving.engine.stats();
                let cpu_time_ms = match r.thread.pid() {
                    Some(pid) => process_cpu_ms(pid),
                    None => thread_cpu_ms(engine.thread_id),
                };
                let wall_ms = r.since.elapsed().as_millis().max(1) as f64;
                InstanceStats {
                    memory_usage: self.footprint().map_or(r.serving.engine.info().size_bytes, |f| f.total()),
                    uptime: r.since.elapsed().as_secs(),
                    cpu_time_ms,
                    cpu_usage: cpu_time_ms.map(|ms| (ms as f64 * 100.0 / wall_ms).min(100.0)),
                    tokens_per_second: engine.tokens_per_second(),
                    engine,
                }
            }),
            memory: self.footprint().map(|f| InstanceMemory {
                weights: f.weights,
                kv: f.kv,
                compute: f.compute,
                total: f.total(),
                device: "CPU",
                weights_shared_with: Vec::new(),
            }),
            waiting: self.waiting,
        }
    }
}

/// Fills in, for each view, which other instances hold the same weights now.
fn mark_shared(map: &HashMap<String, Entry>, view: &mut InstanceView) {
    let Some(memory) = view.memory.as_mut() else { return };
    let Some(key) = map.get(&view.name).and_then(|e| e.weights_key.as_ref()) else { return };
    let mut names: Vec<String> = map
        .values()
        .filter(|e| e.spec.name != view.name && e.weights_key.as_ref() == Some(key))
        .filter(|e| e.is_active() || e.parked.is_some())
        .map(|e| e.spec.name.clone())
        .collect();
    names.sort();
    memory.weights_shared_with = names;
}

/// Something an operator must act on, e.g. an instance that auto-restart gave up on.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Alert {
    pub level: AlertLevel,
    pub time: DateTime<Utc>,
    pub instance: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AlertLevel {
    Warning,
    Error,
}

/// How many alerts are kept.
const MAX_ALERTS: usize = 100;

/// The handle to all instances. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    map: Mutex<HashMap<String, Entry>>,
    events: broadcast::Sender<RegistryEvent>,
    /// The latest system alerts, newest last (at most [`MAX_ALERTS`]); never locked together
    /// with `map`.
    alerts: Mutex<std::collections::VecDeque<Alert>>,
    /// Most instances running (or starting) at once; None = no limit.
    max_running: Mutex<Option<usize>>,
    /// Bytes instances may hold (see [`memory`]).
    memory_budget: Mutex<u64>,
    /// Where parked instances' cached prompts are saved (one directory each), and how much of
    /// the disk they may take; None = not saved.
    kv_store: Mutex<Option<(PathBuf, u64)>>,
    /// How requests that need a swap wait for it.
    swap_policy: Mutex<SwapPolicy>,
    /// Most instances of each group running at once.
    group_limits: Mutex<HashMap<String, usize>>,
    /// Instances parked to make room, since paddock started.
    swaps: AtomicU64,
    /// Address instances' own ports bind to (the server's host).
    bind_host: Mutex<std::net::IpAddr>,
    /// Where instance records are persisted; None = in memory only.
    store: Option<store::Store>,
    /// Last version given to a persisted change (see [`Registry::next_version`]).
    last_version: AtomicU64,
    /// Gets the file of a Hugging Face model (downloading it when missing); None = such
    /// instances cannot start.
    fetcher: Mutex<Option<ModelFetcher>>,
}

/// Resolves `(hf_repo, hf_file)` to a local GGUF, downloading it if needed; reports progress
/// through the log line callback. Set by the server, which owns the hub client.
pub type ModelFetcher = Arc<
    dyn Fn(
            String,
            Option<String>,
            Arc<dyn Fn(String) + Send + Sync>,
        ) -> futures::future::BoxFuture<'static, Result<PathBuf, String>>
        + Send
        + Sync,
>;

impl Default for Registry {
    fn default() -> Self {
        Self::with_store(None)
    }
}

impl Registry {
    /// A registry that keeps nothing on disk.
    pub fn new() -> Self {
        Self::with_store(None)
    }

    fn with_store(store: Option<store::Store>) -> Self {
        let (events, _) = broadcast::channel(256);
        Registry {
            inner: Arc::new(Inner {
                map: Mutex::new(HashMap::new()),
                events,
                alerts: Mutex::new(std::collections::VecDeque::new()),
                max_running: Mutex::new(None),
                memory_budget: Mutex::new(u64::MAX),
                kv_store: Mutex::new(None),
                swap_policy: Mutex::new(SwapPolicy::default()),
                group_limits: Mutex::new(HashMap::new()),
                swaps: AtomicU64::new(0),
                bind_host: Mutex::new(std::net::IpAddr::from([127, 0, 0, 1])),
                store,
                last_version: AtomicU64::new(0),
                fetcher: Mutex::new(None),
            }),
        }
    }

    /// Opens the database at `path` and restores every instance in it, stopped; [`Registry::resume`]
    /// then starts those that were running. A record that does not parse is an error, not skipped.
    pub fn open(path: &Path) -> Result<Self, InstanceError> {
        let store = store::Store::open(path).map_err(|e| InstanceError::Store(e.to_string()))?;
        let records = store.load_all().map_err(|e| InstanceError::Store(e.to_string()))?;
        let registry = Self::with_store(Some(store));
        {
            let mut map = registry.inner.map.lock();
            for rec in records {
                let spec: InstanceSpec = serde_json::from_value(rec.config)
                    .map_err(|e| InstanceError::Store(format!("instance '{}' in the database: {e}", rec.name)))?;
                registry.inner.last_version.fetch_max(rec.version, Ordering::Relaxed);
                let mut entry = Entry::new(spec, rec.created_at);
                entry.updated_at = rec.updated_at;
                entry.desired_running = rec.desired_running;
                entry.logs.push(Level::INFO, "restored from the database");
                map.insert(rec.name, entry);
            }
        }
        Ok(registry)
    }

    /// Starts the instances that were running when paddock last stopped.
    pub async fn resume(&self) {
        let names: Vec<String> = {
            let map = self.inner.map.lock();
            map.values()
                .filter(|e| e.desired_running && e.status == Status::Stopped)
                .map(|e| e.spec.name.clone())
                .collect()
        };
        for name in names {
            if let Err(e) = self.start(&name).await {
                tracing::warn!(instance = %name, "could not resume: {e}");
            }
        }
    }

    /// Versions order persisted changes that may reach the store out of order. Wall-clock
    /// microseconds keep them increasing across restarts of paddock (and above the versions of
    /// deleted names' tombstones); the counter keeps them strictly increasing within one run.
    fn next_version(&self) -> u64 {
        let now = Utc::now().timestamp_micros().max(0) as u64;
        let prev =
            self.inner.last_version.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| Some(now.max(last + 1)));
        now.max(prev.unwrap_or(0) + 1)
    }

    /// Writes `name`'s current record (or its deletion) on a blocking thread.
    async fn persist(&self, name: &str, deleted: bool) -> Result<(), InstanceError> {
        let Some(store) = self.inner.store.clone() else { return Ok(()) };
        let version = self.next_version();
        let record = if deleted {
            None
        } else {
            let record = self.with_entry(name, |e| store::InstanceRecord {
                name: e.spec.name.clone(),
                config: serde_json::to_value(&e.spec).unwrap_or_default(),
                desired_running: e.desired_running,
                created_at: e.created_at,
                updated_at: e.updated_at,
                version,
            });
            match record {
                Ok(r) => Some(r),
                Err(_) => return Ok(()), // deleted meanwhile; the delete is persisted by its own call
            }
        };
        let name = name.to_string();
        let result = tokio::task::spawn_blocking(move || match record {
            Some(r) => store.upsert(&r).map(|_| ()),
            None => store.delete(&name, version).map(|_| ()),
        })
        .await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(InstanceError::Store(e.to_string())),
            Err(e) => Err(InstanceError::Store(e.to_string())),
        }
    }

    /// Records whether the instance should be running, so that a restart of paddock restores it.
    async fn set_desired(&self, name: &str, running: bool) {
        let changed = {
            let mut map = self.inner.map.lock();
            match map.get_mut(name) {
                Some(e) if e.desired_running != running => {
                    e.desired_running = running;
                    true
                }
                _ => false,
            }
        };
        if changed {
            if let Err(e) = self.persist(name, false).await {
                tracing::error!(instance = name, "{e}");
            }
        }
    }

    /// The address instances' own ports listen on.
    pub fn set_bind_host(&self, host: std::net::IpAddr) {
        *self.inner.bind_host.lock() = host;
    }

    /// Lets instances with a Hugging Face model start: `fetcher` gets them their file.
    pub fn set_fetcher(&self, fetcher: ModelFetcher) {
        *self.inner.fetcher.lock() = Some(fetcher);
    }

    /// Takes the bound listener of a running instance's own port, with a receiver of its status
    /// to stop serving when it stops. None when it has no port or it was already taken.
    pub fn take_port(&self, name: &str) -> Option<(std::net::TcpListener, watch::Receiver<Status>)> {
        let mut map = self.inner.map.lock();
        let e = map.get_mut(name).filter(|e| e.status == Status::Running)?;
        let listener = e.port_listener.take()?;
        Some((listener, e.status_tx.subscribe()))
    }

    /// Raises an alert: logged at error level and kept for `GET /api/system/alerts`.
    pub(crate) fn alert(&self, instance: &str, message: String) {
        tracing::error!(instance, "{message}");
        let mut alerts = self.inner.alerts.lock();
        if alerts.len() == MAX_ALERTS {
            alerts.pop_front();
        }
        let alert = Alert { level: AlertLevel::Error, time: Utc::now(), instance: instance.to_string(), message };
        alerts.push_back(alert.clone());
        drop(alerts);
        let _ = self.inner.events.send(RegistryEvent::Alert(alert));
    }

    /// The kept alerts, oldest first.
    pub fn alerts(&self) -> Vec<Alert> {
        self.inner.alerts.lock().iter().cloned().collect()
    }

    /// Events from now on. A receiver that falls more than 256 events behind loses the oldest
    /// (and is told how many); the registry never waits for one.
    pub fn subscribe(&self) -> broadcast::Receiver<RegistryEvent> {
        self.inner.events.subscribe()
    }

    /// Limits how many instances run at once (starting one more evicts the least recently used).
    pub fn set_max_running(&self, max: Option<usize>) {
        *self.inner.max_running.lock() = max;
    }

    /// Bytes instances may hold; starting one that would exceed it parks or frees others first.
    pub fn set_memory_budget(&self, bytes: u64) {
        *self.inner.memory_budget.lock() = bytes;
    }

    /// Saves parked instances' cached prompts under `dir` (at most `budget` bytes, least
    /// recently saved dropped first).
    pub fn set_kv_store(&self, dir: PathBuf, budget: u64) {
        *self.inner.kv_store.lock() = Some((dir, budget));
    }

    pub fn set_group_limits(&self, limits: HashMap<String, usize>) {
        *self.inner.group_limits.lock() = limits;
    }

    pub fn set_swap_policy(&self, policy: SwapPolicy) {
        *self.inner.swap_policy.lock() = policy;
    }

    /// Swaps so far, and the requests waiting for each instance to start.
    pub fn scheduler(&self) -> SchedulerView {
        let map = self.inner.map.lock();
        let mut waiting: Vec<(String, usize)> =
            map.values().filter(|e| e.waiting > 0).map(|e| (e.spec.name.clone(), e.waiting)).collect();
        waiting.sort();
        SchedulerView { swaps: self.inner.swaps.load(Ordering::Relaxed), waiting: waiting.into_iter().collect() }
    }

    /// Tells subscribers the scheduler's state changed. Not under the registry lock.
    fn publish_scheduler(&self) {
        let _ = self.inner.events.send(RegistryEvent::Scheduler(self.scheduler()));
    }

    /// The memory budget and what holds it now.
    pub fn memory_usage(&self) -> memory::BudgetUsage {
        let budget = *self.inner.memory_budget.lock();
        let map = self.inner.map.lock();
        let holders: Vec<_> = map.values().filter_map(Entry::holder).collect();
        memory::usage(budget, &holders)
    }

    /// What creating `spec` would cost, and whether it would fit now (`POST …?dry_run=true`).
    pub async fn dry_run(&self, spec: InstanceSpec) -> Result<DryRun, InstanceError> {
        validate_name(&spec.name)?;
        let shape = validate_spec(&spec).await?;
        let mut entry = Entry::new(spec, Utc::now());
        if let Some((file, shape)) = shape {
            entry.set_model(file, shape);
        }
        let budget = *self.inner.memory_budget.lock();
        let map = self.inner.map.lock();
        let holders: Vec<_> =
            map.values().filter(|e| e.spec.name != entry.spec.name).filter_map(Entry::holder).collect();
        let plan = entry
            .footprint()
            .map(|f| memory::plan(budget, &holders, &entry.spec.name, &entry.weights_key, f, memory::Urgency::Now));
        let mut view = entry.view();
        if let Some(m) = view.memory.as_mut() {
            let key = entry.weights_key.as_ref();
            m.weights_shared_with = map
                .values()
                .filter(|e| e.weights_key.as_ref() == key && (e.is_active() || e.parked.is_some()))
                .map(|e| e.spec.name.clone())
                .collect();
        }
        let fits_now = plan.as_ref().map(|p| *p == memory::Step::Fits);
        let would_give_way = match &plan {
            Some(memory::Step::Park(n) | memory::Step::Release(n)) => vec![n.clone()],
            _ => vec![],
        };
        let refused = match plan {
            Some(memory::Step::Refuse(why)) => Some(why),
            _ => None,
        };
        Ok(DryRun { memory: view.memory, usage: memory::usage(budget, &holders), fits_now, would_give_way, refused })
    }

    /// Creates an instance (stopped). Acknowledged only once persisted.
    pub async fn create(&self, spec: InstanceSpec) -> Result<InstanceView, InstanceError> {
        validate_name(&spec.name)?;
        let shape = validate_spec(&spec).await?;
        let view = {
            let mut map = self.inner.map.lock();
            if map.contains_key(&spec.name) {
                return Err(InstanceError::AlreadyExists(spec.name));
            }
            let mut entry = Entry::new(spec, Utc::now());
            if let Some((file, shape)) = shape {
                entry.set_model(file, shape);
            }
            entry
                .logs
                .push(Level::INFO, format!("instance created with model {}", describe_source(&entry.spec.source)));
            let view = entry.view();
            map.insert(view.name.clone(), entry);
            view
        };
        if let Err(e) = self.persist(&view.name, false).await {
            self.inner.map.lock().remove(&view.name);
            return Err(e);
        }
        let _ = self.inner.events.send(RegistryEvent::Created(view.name.clone()));
        Ok(view)
    }

    /// Applies a partial change. A running instance keeps its current configuration until it is
    /// restarted; the returned flag says whether a restart is needed for the change to apply.
    pub async fn update(&self, name: &str, patch: &SpecPatch) -> Result<(InstanceView, bool), InstanceError> {
        let mut spec = self.with_entry(name, |e| e.spec.clone())?;
        patch.apply_to(&mut spec);
        let shape = validate_spec(&spec).await?;
        let mut unparked = None;
        let (view, changed, restart_required) = {
            let mut map = self.inner.map.lock();
            let e = map.get_mut(name).ok_or_else(|| InstanceError::NotFound(name.to_string()))?;
            let changed = spec != e.spec;
            let restart_required = changed && matches!(e.status, Status::Running | Status::Starting);
            if changed {
                e.spec = spec;
                e.updated_at = Utc::now();
                // A parked instance's weights may not match the new spec: free them.
                if e.status == Status::Parked {
                    let _ = apply(&self.inner.events, e, Event::Stop);
                    unparked = e.parked.take();
                }
                // Applies at the next start; until then a running instance keeps what it holds.
                if !e.is_active() {
                    (e.model_file, e.shape, e.weights_key) = (None, None, None);
                    if let Some((file, shape)) = shape {
                        e.set_model(file, shape);
                    }
                }
                e.logs.push(
                    Level::INFO,
                    if restart_required {
                        "configuration updated; applies on restart"
                    } else {
                        "configuration updated"
                    },
                );
            }
            (e.view(), changed, restart_required)
        };
        // Freed outside the registry lock.
        drop(unparked);
        if changed {
            self.persist(name, false).await?;
            let _ = self.inner.events.send(RegistryEvent::Updated(name.to_string()));
        }
        Ok((view, restart_required))
    }

    pub fn list(&self) -> Vec<InstanceView> {
        let map = self.inner.map.lock();
        let mut views: Vec<_> = map.values().map(Entry::view).collect();
        for view in &mut views {
            mark_shared(&map, view);
        }
        views.sort_by(|a, b| a.name.cmp(&b.name));
        views
    }

    pub fn get(&self, name: &str) -> Result<InstanceView, InstanceError> {
        let map = self.inner.map.lock();
        let mut view = map.get(name).map(Entry::view).ok_or_else(|| InstanceError::NotFound(name.to_string()))?;
        mark_shared(&map, &mut view);
        Ok(view)
    }

    pub async fn delete(&self, name: &str) -> Result<(), InstanceError> {
        let removed = {
            let mut map = self.inner.map.lock();
            let entry = map.get(name).ok_or_else(|| InstanceError::NotFound(name.to_string()))?;
            if !matches!(entry.status, Status::Stopped | Status::Failed | Status::Parked) {
                return Err(InstanceError::Busy { name: name.to_string(), status: entry.status });
            }
            map.remove(name)
        };
        // A parked instance's weights are freed here, not under the registry lock.
        drop(removed);
        if let Some(dir) = self.kv_dir(name) {
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        }
        self.persist(name, true).await?;
        let _ = self.inner.events.send(RegistryEvent::Deleted(name.to_string()));
        Ok(())
    }

    pub fn logs(&self, name: &str, lines: usize, min_level: Option<Level>) -> Result<Vec<LogLine>, InstanceError> {
        self.with_entry(name, |e| e.logs.tail(lines, min_level))
    }

    /// The instance's log buffer, for following it.
    pub fn log_buffer(&self, name: &str) -> Result<Arc<LogBuffer>, InstanceError> {
        self.with_entry(name, |e| e.logs.clone())
    }

    /// The serving handles of a running instance (for routing a request).
    pub fn serving(&self, name: &str) -> Result<Serving, InstanceError> {
        self.with_entry(name, |e| {
            e.running
                .as_ref()
                .map(|r| r.serving.clone())
                .ok_or_else(|| InstanceError::NotRunning { name: name.to_string(), status: e.status })
        })?
    }

    /// Health as llamactl reports it; `response` is a real round trip through the engine loop.
    pub async fn health(&self, name: &str) -> Result<Health, InstanceError> {
        let (status, engine, has_port) = self.with_entry(name, |e| {
            (e.status, e.running.as_ref().map(|r| r.serving.engine.clone()), e.spec.port.is_some())
        })?;
        let (overall, process, response) = match (status, engine) {
            (Status::Running, Some(engine)) => {
                if engine.ping(HEALTH_TIMEOUT).await {
                    ("healthy", "running", "ok")
                } else {
                    ("unhealthy", "running", "timeout")
                }
            }
            (Status::Starting, _) => ("loading", "starting", "unavailable"),
            (Status::Restarting, _) => ("loading", "restarting", "unavailable"),
            (Status::Failed, _) => ("failed", "failed", "unavailable"),
            (Status::Stopping, _) => ("unhealthy", "stopping", "unavailable"),
            (Status::Parked, _) => ("parked", "parked", "unavailable"),
            _ => ("stopped", "stopped", "unavailable"),
        };
        let port = match (has_port, status) {
            (false, _) => "none",
            (true, Status::Running) => "open",
            (true, _) => "closed",
        };
        Ok(Health { status: overall, checks: HealthChecks { process, port, response }, last_check: Utc::now() })
    }

    fn with_entry<T>(&self, name: &str, f: impl FnOnce(&Entry) -> T) -> Result<T, InstanceError> {
        let map = self.inner.map.lock();
        map.get(name).map(f).ok_or_else(|| InstanceError::NotFound(name.to_string()))
    }
}

/// Moves `e` through `event` and publishes the transition. It is sent while the registry lock is
/// held (a send never waits), so subscribers see each instance's transitions in the order they
/// happened; publishing after the lock could swap two concurrent ones.
fn apply(events: &broadcast::Sender<RegistryEvent>, e: &mut Entry, event: Event) -> Result<(), InstanceError> {
    let old = e.status;
    let next =
        old.transition(event).map_err(|source| InstanceError::Transition { name: e.spec.name.clone(), source })?;
    e.status = next;
    e.status_tx.send_replace(next);
    e.updated_at = Utc::now();
    if next != old {
        let change = StatusChange { name: e.spec.name.clone(), old, status: next, at: e.updated_at };
        let _ = events.send(RegistryEvent::Status(change));
    }
    Ok(())
}

/// Checks options, policy and the model file (paddock's own GGUF check, on a blocking thread:
/// it reads the file's metadata). Returns the model file and its memory figures when the spec
/// names a local file.
async fn validate_spec(spec: &InstanceSpec) -> Result<Option<(PathBuf, Option<Shape>)>, InstanceError> {
    spec.options.validate().map_err(InstanceError::InvalidOptions)?;
    spec.policy.validate().map_err(InstanceError::InvalidOptions)?;
    let Some(path) = spec.model_path().cloned() else { return Ok(None) };
    if !path.is_file() {
        return Err(InstanceError::ModelNotFound(path.display().to_string()));
    }
    let checked = tokio::task::spawn_blocking(move || match crate::models::gguf::validate_once(&path) {
        Ok(_) => Ok((read_shape(&path), path)),
        Err(e) => Err((path, e)),
    })
    .await;
    match checked {
        Ok(Ok((shape, path))) => Ok(Some((path, shape))),
        Ok(Err((path, e))) => {
            Err(InstanceError::InvalidModel { path: path.display().to_string(), reason: e.to_string() })
        }
        Err(e) => Err(InstanceError::Store(e.to_string())),
    }
}

/// The model's memory figures; None (logged) when its header lacks them, in which case the
/// budget cannot count it. Blocking.
fn read_shape(path: &Path) -> Option<Shape> {
    let shape = crate::models::registry::shape_of(path).map_err(|e| tracing::warn!("no memory estimate: {e}")).ok();
    // Parsing a header allocates every vocabulary entry on its own (262k for Gemma 3): ~40 MiB
    // that glibc kept resident in this pool thread's arena once freed, which put a served
    // instance above llama-server's memory at small contexts (414 vs 350 MiB, 1024 tokens).
    crate::engine::heap::release_freed_memory("model header read");
    shape
}

/// How requests for an instance that needs another one to give way wait (see
/// [`Registry::serving_or_start`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SwapPolicy {
    /// The longest a request waits for busy instances to finish before the start takes room.
    pub max_wait: Duration,
    /// An instance is not parked for a waiting request before it has been up this long.
    pub min_resident: Duration,
}

impl Default for SwapPolicy {
    fn default() -> Self {
        SwapPolicy { max_wait: Duration::from_secs(30), min_resident: Duration::ZERO }
    }
}

/// The swap scheduler's state, as `GET /api/system/status` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SchedulerView {
    /// Instances parked to make room for another, since paddock started.
    pub swaps: u64,
    /// Requests waiting for each instance to start, by instance name.
    pub waiting: std::collections::BTreeMap<String, usize>,
}

/// What `POST /api/instances/{name}?dry_run=true` answers.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DryRun {
    /// What the instance would cost; absent for a Hugging Face model not downloaded yet.
    pub memory: Option<InstanceMemory>,
    /// The budget and what holds it now.
    pub usage: memory::BudgetUsage,
    /// Whether it fits without parking or freeing anything (absent when its cost is unknown).
    pub fits_now: Option<bool>,
    /// The instance that would give way first to make room (more may follow).
    pub would_give_way: Vec<String>,
    /// Why it could not start even after everything evictable gave way.
    pub refused: Option<String>,
}

fn describe_source(source: &ModelSource) -> String {
    match source {
        ModelSource::Path { model_path } => model_path.display().to_string(),
        ModelSource::HuggingFace { hf_repo, hf_file } => format!("{hf_repo} {}", hf_file.as_deref().unwrap_or("")),
    }
}

/// The model's own template, or ChatML when it has none or it does not compile (as llama-server).
fn chat_template(info: &ModelInfo, logs: &LogBuffer) -> ChatTemplate {
    match ChatTemplate::new(info.chat_template.as_deref(), &info.bos_token, &info.eos_token) {
        Ok(t) => {
            if t.is_fallback() {
                logs.push(Level::INFO, "the model has no chat template; using ChatML");
            }
            t
        }
        Err(e) => {
            logs.push(Level::WARN, format!("{e}; using ChatML"));
            ChatTemplate::chatml(&info.bos_token, &info.eos_token)
        }
    }
}

pub fn validate_name(name: &str) -> Result<(), InstanceError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(InstanceError::InvalidName(name.to_string()))
    }
}
