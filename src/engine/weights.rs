//! Loaded weights, shared between instances and kept past an instance's stop.
//!
//! A `LlamaModel` is immutable once loaded (its LoRA adapters too) and Send + Sync, so several
//! engine threads may each build their own context on one. Instances whose model file and load
//! parameters match ([`WeightsKey`]) therefore get the same [`Weights`]: the weights once, a
//! context each. The registry keeps weights alive for a parked instance by holding an `Arc`;
//! this module holds only weak references, so weights are freed when the last holder lets go.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaLoraAdapter, LlamaModel};
use parking_lot::Mutex;
use serde::Serialize;

use super::heap::ReleaseOnDrop;
use super::rpc::{self, RpcLease};
use super::{backend, EngineConfig, EngineError};

/// What makes two loads the same: the file, where its layers go (how many leave the CPU, and to
/// which workers), and the adapters loaded into it (llama.cpp attaches adapters to the model, so
/// they are part of what is shared).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WeightsKey {
    /// Canonical, so two spellings of one path share.
    pub path: PathBuf,
    pub n_gpu_layers: u32,
    /// RPC workers, in order (the order decides which layers each holds).
    pub rpc_servers: Vec<String>,
    pub lora: Vec<PathBuf>,
    /// The instance whose own process holds these weights (isolation "process"): nobody shares
    /// them, and this process never has them loaded.
    pub process: Option<String>,
}

impl WeightsKey {
    pub fn of(config: &EngineConfig) -> WeightsKey {
        let lora: Vec<&Path> = config.lora.iter().map(|l| l.path.as_path()).collect();
        WeightsKey::new(&config.model_path, config.n_gpu_layers, &config.rpc_servers, &lora)
    }

    pub fn new(model: &Path, n_gpu_layers: u32, rpc_servers: &[String], lora: &[&Path]) -> WeightsKey {
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        WeightsKey {
            path: canonical(model),
            n_gpu_layers,
            rpc_servers: rpc_servers.to_vec(),
            lora: lora.iter().map(|p| canonical(p)).collect(),
            process: None,
        }
    }
}

/// A loaded model with its adapters.
pub struct Weights {
    pub key: WeightsKey,
    pub model: LlamaModel,
    /// In the order of the key's `lora`. llama-cpp-2's setter takes `&mut` though it only passes
    /// the pointer on; the lock gives each engine thread that access in turn.
    pub adapters: Mutex<Vec<LlamaLoraAdapter>>,
    /// Creating contexts from one model concurrently is unsound in llama.cpp (its model keeps
    /// per-context scratch state): contexts are created under this lock.
    pub context_lock: Mutex<()>,
    pub load_ms: u64,
    /// Which device holds which layers, as llama.cpp reported it while loading.
    pub placement: Vec<LayerPlacement>,
    /// The RPC workers' devices this model uses. After `model`: fields drop in order, so the
    /// lease ends once ggml has freed the model's buffers on them (and closed its connection).
    _rpc: Option<RpcLease>,
    /// Last: once the model is freed, its repacked weights go back to the system instead of
    /// staying in a malloc arena (see [`heap`](super::heap)). Parked weights are often freed
    /// by the registry, not by an engine thread, so this lives here.
    _release: ReleaseOnDrop,
}

impl Weights {
    /// Whether every layer sits in this process's RAM (none on a GPU or an RPC worker), as
    /// llama.cpp reported the placement; false when it did not say.
    pub fn in_host_memory(&self) -> bool {
        !self.placement.is_empty() && self.placement.iter().all(|p| p.device == "CPU")
    }
}

/// Consecutive layers on one device (`GET /api/instances/{name}` → `model.placement`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct LayerPlacement {
    /// ggml's device name: `CPU`, `RPC0`, `CUDA0`, …
    pub device: String,
    /// The RPC worker behind the device, as the instance's `rpc_servers` names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Layer indices, e.g. `0-8`; `output` is the output layer (llama.cpp's layer n_layer).
    pub layers: String,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights").field("key", &self.key).field("load_ms", &self.load_ms).finish()
    }
}

#[derive(Default)]
struct Cache {
    loaded: Mutex<HashMap<WeightsKey, Weak<Weights>>>,
    /// One lock per key being loaded, so two instances asking for the same weights at once load
    /// them once: the second waits for the first and then finds them.
    loading: Mutex<HashMap<WeightsKey, Arc<Mutex<()>>>>,
}

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(Cache::default)
}

/// The weights for `key` if some holder keeps them loaded.
pub fn resident(key: &WeightsKey) -> Option<Arc<Weights>> {
    cache().loaded.lock().get(key).and_then(Weak::upgrade)
}

/// Keys of every set of weights loaded now.
pub fn resident_keys() -> Vec<WeightsKey> {
    let mut map = cache().loaded.lock();
    map.retain(|_, w| w.strong_count() > 0);
    map.keys().cloned().collect()
}

/// The weights `config` asks for: the loaded ones if any (second value true), else loaded now.
/// Blocking: runs on the engine thread.
pub fn acquire(config: &EngineConfig) -> Result<(Arc<Weights>, bool), EngineError> {
    let key = WeightsKey::of(config);
    if let Some(w) = resident(&key) {
        return Ok((w, true));
    }
    let gate = cache().loading.lock().entry(key.clone()).or_default().clone();
    let loaded = {
        let _turn = gate.lock();
        match resident(&key) {
            Some(w) => Ok((w, true)),
            None => load(config, key.clone()).map(|w| {
                let w = Arc::new(w);
                cache().loaded.lock().insert(key.clone(), Arc::downgrade(&w));
                (w, false)
            }),
        }
    };
    let mut loading = cache().loading.lock();
    // Checked under the map's lock, where every waiter took its clone: 2 = the map and us.
    if Arc::strong_count(&gate) <= 2 {
        loading.remove(&key);
    }
    loaded
}

fn load(config: &EngineConfig, key: WeightsKey) -> Result<Weights, EngineError> {
    let backend = backend()?;
    let path = config.model_path.display().to_string();
    // llama.cpp's loader can crash on some corrupt files: paddock reads the header first.
    if let Err(e) = crate::models::gguf::validate_once(&config.model_path) {
        return Err(EngineError::Load { path, reason: e.to_string() });
    }
    let cancel = config.cancel_load.clone();
    let lease = if config.rpc_servers.is_empty() { None } else { Some(rpc::attach(&config.rpc_servers)?) };
    let mut params = LlamaModelParams::default()
        .with_n_gpu_layers(config.n_gpu_layers)
        .with_progress_callback(move |_| !cancel.load(Ordering::Relaxed));
    // Readers of ggml's device list hold this while a worker's registration could grow it.
    let devices_guard = rpc::devices_read();
    // Once any worker is registered, llama.cpp's default device choice would include it for
    // every model: name the devices, this instance's workers and the local GPUs only.
    if lease.is_some() || rpc::any_attached() {
        let devices = rpc::load_devices(lease.as_ref().unwrap_or(&RpcLease::default()))?;
        params = params
            .with_devices(&devices)
            .map_err(|e| EngineError::Config(format!("cannot use devices {devices:?}: {e}")))?;
    }
    let started = Instant::now();
    let (loaded, lines) =
        crate::logs::capture_llama_lines(|| LlamaModel::load_from_file(backend, &config.model_path, &params));
    drop(devices_guard);
    let mut model = loaded.map_err(|e| {
        if config.cancel_load.load(Ordering::Relaxed) {
            EngineError::LoadCancelled
        } else {
            EngineError::Load { path, reason: format!("{e} (see the instance's logs for llama.cpp's reason)") }
        }
    })?;
    let workers = lease.as_ref().map(|l| l.names.clone()).unwrap_or_default();
    let placement = placement(&lines, &workers);
    // Non-causal (embedding) and encoder-decoder models take other code paths in llama.cpp, some
    // of which abort on a generation batch (n_ubatch asserts, missing logits). Refuse them here.
    let arch = model.meta_val_str("general.architecture").unwrap_or_default();
    let causal = model.meta_val_str(&format!("{arch}.attention.causal")).map_or(true, |v| v != "false");
    if !causal || arch.starts_with("t5") {
        return Err(EngineError::Config(format!(
            "{} is a {arch} model without causal attention (an embedding or encoder model); instances serve causal language models",
            config.model_path.display()
        )));
    }
    let adapters = load_adapters(config, &mut model)?;
    Ok(Weights {
        key,
        model,
        adapters: Mutex::new(adapters),
        context_lock: Mutex::new(()),
        load_ms: started.elapsed().as_millis() as u64,
        placement,
        _rpc: lease,
        _release: ReleaseOnDrop("weights freed"),
    })
}

/// Groups llama.cpp's "load_tensors: layer N assigned to device D, is_swa = S" debug lines (one per
/// layer, then one for the output layer) into runs per device. `workers` maps RPC device names
/// to the worker behind them.
pub fn placement(lines: &[String], workers: &[(String, String)]) -> Vec<LayerPlacement> {
    let assigned: Vec<(u32, &str)> = lines
        .iter()
        .filter_map(|l| {
            // llama-cpp-2 moves the "load_tensors: " prefix into a field of the event.
            let (_, rest) = l.split_once("layer ")?;
            let (n, rest) = rest.trim_start().split_once(" assigned to device ")?;
            let device = rest.split(',').next()?.trim();
            Some((n.trim().parse().ok()?, device))
        })
        .collect();
    let output = assigned.iter().map(|&(n, _)| n).max();
    let mut runs: Vec<(String, Vec<String>)> = Vec::new();
    let mut start = 0;
    for (i, &(n, device)) in assigned.iter().enumerate() {
        let next_same = assigned.get(i + 1).is_some_and(|&(m, d)| d == device && m == n + 1 && Some(m) != output);
        if next_same {
            continue;
        }
        let first = assigned[start].0;
        let part = if Some(n) == output && first == n {
            "output".to_string()
        } else if first == n {
            n.to_string()
        } else {
            format!("{first}-{n}")
        };
        match runs.last_mut() {
            Some((d, parts)) if d == device => parts.push(part),
            _ => runs.push((device.to_string(), vec![part])),
        }
        start = i + 1;
    }
    runs.into_iter()
        .map(|(device, parts)| LayerPlacement {
            worker: workers.iter().find(|(name, _)| *name == device).map(|(_, w)| w.clone()),
            device,
            layers: parts.join(","),
        })
        .collect()
}

/// Loads every adapter of `config` into `model` (before any context exists, as llama.cpp
/// requires). A file that is missing, not a GGUF, or made for another model fails the start.
fn load_adapters(config: &EngineConfig, model: &mut LlamaModel) -> Result<Vec<LlamaLoraAdapter>, EngineError> {
    config
        .lora
        .iter()
        .map(|spec| {
            let path = spec.path.display().to_string();
            crate::models::gguf::validate(&spec.path)
                .map_err(|e| EngineError::LoraLoad { path: path.clone(), reason: e.to_string() })?;
            model.lora_adapter_init(&spec.path).map_err(|e| EngineError::LoraLoad {
                path,
                reason: format!("it does not fit this model ({e}); see the instance's logs"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_groups_layers_per_device_and_names_workers() {
        let line = |n: u32, d: &str| format!("layer {n:>3} assigned to device {d}, is_swa = 0 module=load_tensors");
        let mut lines: Vec<String> = (0..3).map(|n| line(n, "CPU")).collect();
        lines.extend((3..6).map(|n| line(n, "RPC0")));
        lines.extend((6..9).map(|n| line(n, "RPC1")));
        lines.push(line(9, "RPC1"));
        lines.push("load_tensors: offloaded 7/10 layers to GPU".into());
        let workers = vec![("RPC0".to_string(), "a:1".to_string()), ("RPC1".to_string(), "b:2".to_string())];
        let p = placement(&lines, &workers);
        let shown: Vec<(&str, Option<&str>, &str)> =
            p.iter().map(|p| (p.device.as_str(), p.worker.as_deref(), p.layers.as_str())).collect();
        assert_eq!(
            shown,
            vec![("CPU", None, "0-2"), ("RPC0", Some("a:1"), "3-5"), ("RPC1", Some("b:2"), "6-8,output")]
        );
        assert!(placement(&[], &[]).is_empty());
    }
}
