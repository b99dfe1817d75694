//! Instances: options + status + the engine thread that serves them.
//!
//! # Layout
//! - [`lifecycle`]: `Status` and its legal transitions.
//! - [`options`]: user-facing options and their validation into an `EngineConfig`.
//! - this file: [`Registry`], the one handle to all instances.
//!
//! # Locking
//! One `parking_lot::Mutex` guards the map of instances. It is never held across an `.await`
//! or a call into llama.cpp: loading and joining engines happen outside it, and results are
//! applied under it afterwards, checked against the instance's `generation` so that a late
//! result of an earlier start cannot overwrite a newer one.

pub mod lifecycle;
pub mod options;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::broadcast;
use tracing::Level;

use crate::engine::chat::ChatTemplate;
use crate::engine::{Engine, EngineError, EngineThread, ModelInfo, StatsSnapshot};
use crate::logs::{LogBuffer, LogLine};
pub use lifecycle::{Event, IllegalTransition, Status};
pub use options::InstanceOptions;

/// How long a stop waits for the engine thread to finish its current step and exit.
const STOP_DEADLINE: Duration = Duration::from_secs(30);

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
}

/// What a user gives to create an instance.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    pub name: String,
    pub model_path: PathBuf,
    pub port: Option<u16>,
    pub options: InstanceOptions,
}

/// How long a health check waits for the engine loop to answer.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize)]
pub struct Health {
    pub status: &'static str,
    pub checks: HealthChecks,
    pub last_check: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HealthChecks {
    /// The engine thread's state.
    pub process: &'static str,
    /// Whether the engine loop answered a ping.
    pub response: &'static str,
}

/// A published status change (consumed by the WebSocket and logs).
#[derive(Debug, Clone, Serialize)]
pub struct StatusChange {
    pub name: String,
    pub status: Status,
    pub at: DateTime<Utc>,
}

/// What GET returns for an instance.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceView {
    pub name: String,
    pub status: Status,
    pub model_path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub options: InstanceOptions,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Why the instance failed, while it is `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The loaded model, while running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelInfo>,
    /// Engine counters, while running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<StatsSnapshot>,
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
}

struct Entry {
    spec: InstanceSpec,
    status: Status,
    running: Option<Running>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    error: Option<String>,
    logs: Arc<LogBuffer>,
    cancel_load: Arc<AtomicBool>,
    /// Bumped by every start; results of an older start are ignored.
    generation: u64,
}

impl Entry {
    fn view(&self) -> InstanceView {
        InstanceView {
            name: self.spec.name.clone(),
            status: self.status,
            model_path: self.spec.model_path.display().to_string(),
            port: self.spec.port,
            options: self.spec.options.clone(),
            created_at: self.created_at,
            updated_at: self.updated_at,
            error: self.error.clone(),
            model: self.running.as_ref().map(|r| r.serving.engine.info().clone()),
            stats: self.running.as_ref().map(|r| r.serving.engine.stats()),
        }
    }
}

/// The handle to all instances. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    map: Mutex<HashMap<String, Entry>>,
    events: broadcast::Sender<StatusChange>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(256);
        Registry { inner: Arc::new(Inner { map: Mutex::new(HashMap::new()), events }) }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<StatusChange> {
        self.inner.events.subscribe()
    }

    pub fn create(&self, spec: InstanceSpec) -> Result<InstanceView, InstanceError> {
        validate_name(&spec.name)?;
        spec.options.validate().map_err(InstanceError::InvalidOptions)?;
        if !spec.model_path.is_file() {
            return Err(InstanceError::ModelNotFound(spec.model_path.display().to_string()));
        }
        let mut map = self.inner.map.lock();
        if map.contains_key(&spec.name) {
            return Err(InstanceError::AlreadyExists(spec.name));
        }
        let now = Utc::now();
        let logs = Arc::new(LogBuffer::default());
        logs.push(Level::INFO, format!("instance created with model {}", spec.model_path.display()));
        let entry = Entry {
            spec,
            status: Status::Stopped,
            running: None,
            created_at: now,
            updated_at: now,
            error: None,
            logs,
            cancel_load: Arc::new(AtomicBool::new(false)),
            generation: 0,
        };
        let view = entry.view();
        map.insert(view.name.clone(), entry);
        Ok(view)
    }

    pub fn list(&self) -> Vec<InstanceView> {
        let map = self.inner.map.lock();
        let mut views: Vec<_> = map.values().map(Entry::view).collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        views
    }

    pub fn get(&self, name: &str) -> Result<InstanceView, InstanceError> {
        self.with_entry(name, |e| e.view())
    }

    pub fn delete(&self, name: &str) -> Result<(), InstanceError> {
        let mut map = self.inner.map.lock();
        let entry = map.get(name).ok_or_else(|| InstanceError::NotFound(name.to_string()))?;
        if !matches!(entry.status, Status::Stopped | Status::Failed) {
            return Err(InstanceError::Busy { name: name.to_string(), status: entry.status });
        }
        map.remove(name);
        Ok(())
    }

    pub fn logs(&self, name: &str, lines: usize, min_level: Option<Level>) -> Result<Vec<LogLine>, InstanceError> {
        self.with_entry(name, |e| e.logs.tail(lines, min_level))
    }

    /// The serving handles of a running instance (for routing a request).
    pub fn serving(&self, name: &str) -> Result<Serving, InstanceError> {
        self.with_entry(name, |e| {
            e.running.as_ref().map(|r| r.serving.clone()).ok_or_else(|| InstanceError::NotRunning {
                name: name.to_string(),
                status: e.status,
            })
        })?
    }

    /// Health as llamactl reports it; `response` is a real round trip through the engine loop.
    pub async fn health(&self, name: &str) -> Result<Health, InstanceError> {
        let (status, engine) = self.with_entry(name, |e| (e.status, e.running.as_ref().map(|r| r.serving.engine.clone())))?;
        let (overall, process, response) = match (status, engine) {
            (Status::Running, Some(engine)) => {
                if engine.ping(HEALTH_TIMEOUT).await {
                    ("healthy", "running", "ok")
                } else {
                    ("unhealthy", "running", "timeout")
                }
            }
            (Status::Starting, _) => ("loading", "starting", "unavailable"),
            (Status::Failed, _) => ("failed", "failed", "unavailable"),
            (Status::Stopping, _) => ("stopping", "stopping", "unavailable"),
            _ => ("stopped", "stopped", "unavailable"),
        };
        Ok(Health { status: overall, checks: HealthChecks { process, response }, last_check: Utc::now() })
    }

    /// Begins loading the instance's model on a new engine thread; returns at once with
    /// `starting`. The outcome (`running` or `failed` with its reason) is applied when the load ends.
    pub fn start(&self, name: &str) -> Result<Status, InstanceError> {
        let (config, generation) = {
            let mut map = self.inner.map.lock();
            let e = map.get_mut(name).ok_or_else(|| InstanceError::NotFound(name.to_string()))?;
            apply(e, Event::Start)?;
            e.generation += 1;
            e.error = None;
            e.cancel_load = Arc::new(AtomicBool::new(false));
            e.logs.push(Level::INFO, "starting: loading model");
            let config =
                e.spec.options.engine_config(name, e.spec.model_path.clone(), e.logs.clone(), e.cancel_load.clone());
            (config, e.generation)
        };
        self.publish(name, Status::Starting);
        let registry = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let outcome = EngineThread::start(config).await;
            registry.finish_start(&name, generation, outcome).await;
        });
        Ok(Status::Starting)
    }

    async fn finish_start(
        &self,
        name: &str,
        generation: u64,
        outcome: Result<(EngineThread, tokio::sync::oneshot::Receiver<crate::engine::ExitReport>), EngineError>,
    ) {
        let mut orphan = None;
        let mut watch = None;
        let status = {
            let mut map = self.inner.map.lock();
            let Some(e) = map.get_mut(name).filter(|e| e.generation == generation) else {
                return; // deleted meanwhile (only possible once stopped) or superseded
            };
            match outcome {
                Ok((thread, exited)) if e.status == Status::Starting => {
                    let info = thread.engine().info();
                    let template = chat_template(info, &e.logs);
                    let serving = Serving { engine: thread.engine().clone(), template };
                    e.running = Some(Running { thread, serving });
                    let _ = apply(e, Event::Loaded);
                    e.logs.push(Level::INFO, "running");
                    watch = Some(exited);
                }
                Ok((thread, _)) => {
                    // A stop came in while loading: finish the stop.
                    orphan = Some(thread);
                }
                Err(err) if e.status == Status::Starting => {
                    let _ = apply(e, Event::LoadFailed);
                    e.logs.push(Level::ERROR, format!("start failed: {err}"));
                    e.error = Some(err.to_string());
                }
                Err(_) => {}
            }
            if e.status == Status::Stopping {
                let _ = apply(e, Event::Halted);
                e.logs.push(Level::INFO, "stopped");
            }
            e.status
        };
        if let Some(thread) = orphan {
            let _ = tokio::task::spawn_blocking(move || thread.shutdown(STOP_DEADLINE)).await;
        }
        self.publish(name, status);
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
    fn engine_exited(&self, name: &str, generation: u64, report: crate::engine::ExitReport) {
        let status = {
            let mut map = self.inner.map.lock();
            let Some(e) = map.get_mut(name).filter(|e| e.generation == generation) else { return };
            if e.status != Status::Running {
                return; // a stop is in charge
            }
            let _ = apply(e, Event::Crashed);
            let reason = report.err().unwrap_or_else(|| "engine thread exited".into());
            e.logs.push(Level::ERROR, format!("engine failed: {reason}"));
            e.error = Some(reason);
            e.running = None;
            e.status
        };
        self.publish(name, status);
    }

    /// Stops an instance: in-flight requests end with an error, the engine thread is joined.
    /// A stop during loading cancels the load; the status is `stopping` until it has ended.
    pub async fn stop(&self, name: &str) -> Result<Status, InstanceError> {
        let running = {
            let mut map = self.inner.map.lock();
            let e = map.get_mut(name).ok_or_else(|| InstanceError::NotFound(name.to_string()))?;
            let was = e.status;
            apply(e, Event::Stop)?;
            e.logs.push(Level::INFO, "stopping");
            if was == Status::Starting {
                e.cancel_load.store(true, Ordering::Relaxed);
            }
            e.running.take()
        };
        self.publish(name, Status::Stopping);
        let Some(running) = running else { return Ok(Status::Stopping) };
        let thread = running.thread;
        drop(running.serving);
        let _ = tokio::task::spawn_blocking(move || thread.shutdown(STOP_DEADLINE)).await;
        let status = {
            let mut map = self.inner.map.lock();
            let Some(e) = map.get_mut(name) else { return Ok(Status::Stopped) };
            let _ = apply(e, Event::Halted);
            e.logs.push(Level::INFO, "stopped");
            e.status
        };
        self.publish(name, status);
        Ok(status)
    }

    /// Stops every instance (server shutdown).
    pub async fn stop_all(&self) {
        let names: Vec<String> = {
            let map = self.inner.map.lock();
            map.iter().filter(|(_, e)| matches!(e.status, Status::Running | Status::Starting)).map(|(n, _)| n.clone()).collect()
        };
        for name in names {
            let _ = self.stop(&name).await;
        }
    }

    fn with_entry<T>(&self, name: &str, f: impl FnOnce(&Entry) -> T) -> Result<T, InstanceError> {
        let map = self.inner.map.lock();
        map.get(name).map(f).ok_or_else(|| InstanceError::NotFound(name.to_string()))
    }

    fn publish(&self, name: &str, status: Status) {
        let _ = self.inner.events.send(StatusChange { name: name.to_string(), status, at: Utc::now() });
    }
}

fn apply(e: &mut Entry, event: Event) -> Result<(), InstanceError> {
    let next = e
        .status
        .transition(event)
        .map_err(|source| InstanceError::Transition { name: e.spec.name.clone(), source })?;
    e.status = next;
    e.updated_at = Utc::now();
    Ok(())
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
