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

use super::{backend, EngineConfig, EngineError};

/// What makes two loads the same: the file, where its layers go, and the adapters loaded into
/// it (llama.cpp attaches adapters to the model, so they are part of what is shared).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WeightsKey {
    /// Canonical, so two spellings of one path share.
    pub path: PathBuf,
    pub n_gpu_layers: u32,
    pub lora: Vec<PathBuf>,
    /// The instance whose own process holds these weights (isolation "process"): nobody shares
    /// them, and this process never has them loaded.
    pub process: Option<String>,
}

impl WeightsKey {
    pub fn of(config: &EngineConfig) -> WeightsKey {
        let lora: Vec<&Path> = config.lora.iter().map(|l| l.path.as_path()).collect();
        WeightsKey::new(&config.model_path, config.n_gpu_layers, &lora)
    }

    pub fn new(model: &Path, n_gpu_layers: u32, lora: &[&Path]) -> WeightsKey {
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        WeightsKey {
            path: canonical(model),
            n_gpu_layers,
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
    if let Err(e) = crate::models::gguf::validate(&config.model_path) {
        return Err(EngineError::Load { path, reason: e.to_string() });
    }
    let cancel = config.cancel_load.clone();
    let params = LlamaModelParams::default()
        .with_n_gpu_layers(config.n_gpu_layers)
        .with_progress_callback(move |_| !cancel.load(Ordering::Relaxed));
    let started = Instant::now();
    let mut model = LlamaModel::load_from_file(backend, &config.model_path, &params).map_err(|e| {
        if config.cancel_load.load(Ordering::Relaxed) {
            EngineError::LoadCancelled
        } else {
            EngineError::Load { path, reason: format!("{e} (see the instance's logs for llama.cpp's reason)") }
        }
    })?;
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
    })
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
