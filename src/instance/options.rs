//! Instance options as users write them (seed names and llama-server's names), and their
//! validation into an engine configuration.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::engine::rpc::{RpcEndpoint, MAX_DEVICES};
use crate::engine::weights::WeightsKey;
use crate::engine::{EngineConfig, Isolation, DEFAULT_CTX_PER_SLOT, DEFAULT_UBATCH};
use crate::logs::LogBuffer;
use crate::models::memory::{footprint, Footprint, Layout, Shape};

/// Options of an instance. Every field is optional; unset fields take the defaults below.
/// Unknown names are refused (with the list of known ones) rather than silently ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceOptions {
    /// Total context in tokens, shared by the slots (each gets context_size / parallel).
    /// Also accepted as `ctx_size`, `n_ctx`.
    #[serde(alias = "ctx_size", alias = "n_ctx", skip_serializing_if = "Option::is_none")]
    pub context_size: Option<u32>,
    /// Also accepted as `n_threads`.
    #[serde(alias = "n_threads", skip_serializing_if = "Option::is_none")]
    pub threads: Option<u32>,
    /// Also accepted as `n_threads_batch`.
    #[serde(alias = "n_threads_batch", skip_serializing_if = "Option::is_none")]
    pub threads_batch: Option<u32>,
    /// Layers offloaded to a GPU; -1 (the default) = all, a no-op on CPU-only builds.
    /// Also accepted as `n_gpu_layers`, `ngl`.
    #[serde(alias = "n_gpu_layers", alias = "ngl", skip_serializing_if = "Option::is_none")]
    pub gpu_layers: Option<i64>,
    /// Slots decoded together (llama-server's `-np`).
    /// Also accepted as `n_parallel`, `np`.
    #[serde(alias = "n_parallel", alias = "np", skip_serializing_if = "Option::is_none")]
    pub parallel: Option<u32>,
    /// Also accepted as `n_batch`, `batch`.
    #[serde(alias = "n_batch", alias = "batch", skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    /// Tokens computed at once (llama-server's `-ub`), at most `batch_size`. Paddock also plans
    /// each decode step to this size, so a prompt finished in one step streams its first token
    /// while the next prompts are computed. Also accepted as `n_ubatch`, `ubatch`.
    #[serde(alias = "n_ubatch", alias = "ubatch", skip_serializing_if = "Option::is_none")]
    pub ubatch_size: Option<u32>,
    /// Requests that may wait for a slot before new ones are refused with 503.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<u32>,
    /// Default sampling seed; -1 = random per request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// llama-server's `--flash-attn on|off|auto` (default auto).
    /// Also accepted as `fa`.
    #[serde(alias = "fa", skip_serializing_if = "Option::is_none")]
    pub flash_attn: Option<FlashAttn>,
    /// Serve `/v1/embeddings` too (llama-server's `--embeddings`). Unlike llama-server, the
    /// instance keeps generating: embeddings get their own context, made on first use.
    /// Also accepted as `embedding`.
    #[serde(alias = "embedding", skip_serializing_if = "Option::is_none")]
    pub embeddings: Option<bool>,
    /// LoRA adapters (GGUF) loaded with the model, by id = position; llama-server's `--lora`
    /// and `--lora-scaled`. Scales change at run time through `POST …/lora-adapters` or per request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<Vec<LoraOption>>,
    /// ggml RPC workers (`paddock worker`) whose devices hold layers, `host:port` with an IPv4
    /// address or a host name (llama-server's `--rpc`). Their devices come first, then local
    /// GPUs; they count as GPUs, so `gpu_layers` (default all) decides how many layers leave
    /// this machine, split between the devices in proportion to their free memory.
    /// Also accepted as `rpc`.
    #[serde(alias = "rpc", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<String>>, example = json!(["10.0.0.2:50052"]))]
    pub rpc_servers: Option<Vec<RpcEndpoint>>,
    /// llama-server's `--tensor-split`. Not supported yet: llama-cpp-2 0.1.160 has no setter for
    /// `llama_model_params.tensor_split`, so a non-empty list is refused at validation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensor_split: Option<Vec<f32>>,
    /// Where the engine runs: `"thread"` (in paddock's process, weights shared between
    /// instances) or `"process"` (a child process of its own, so a llama.cpp abort — a failed
    /// assert, a lost RPC worker — ends this instance alone and the supervisor restarts it by
    /// its policy). Default: `"process"` with `rpc_servers`, else `"thread"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub isolation: Option<Isolation>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraOption {
    #[schema(value_type = String)]
    pub path: PathBuf,
    #[serde(default = "full_scale")]
    pub scale: f32,
}

fn full_scale() -> f32 {
    1.0
}

/// Most LoRA adapters one instance loads.
const MAX_LORA: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FlashAttn {
    On,
    Off,
    Auto,
}

/// llama-server command-line flags (long or short, without dashes) that paddock understands,
/// and the option each sets. Anything else in `extra` is refused by name, never ignored.
const LLAMA_SERVER_FLAGS: [(&str, &str); 24] = [
    ("ctx-size", "context_size"),
    ("c", "context_size"),
    ("threads", "threads"),
    ("t", "threads"),
    ("threads-batch", "threads_batch"),
    ("tb", "threads_batch"),
    ("n-gpu-layers", "gpu_layers"),
    ("ngl", "gpu_layers"),
    ("gpu-layers", "gpu_layers"),
    ("parallel", "parallel"),
    ("np", "parallel"),
    ("batch-size", "batch_size"),
    ("b", "batch_size"),
    ("ubatch-size", "ubatch_size"),
    ("ub", "ubatch_size"),
    ("seed", "seed"),
    ("s", "seed"),
    ("flash-attn", "flash_attn"),
    ("fa", "flash_attn"),
    ("embeddings", "embeddings"),
    ("embedding", "embeddings"),
    ("rpc", "rpc_servers"),
    ("tensor-split", "tensor_split"),
    ("ts", "tensor_split"),
];

/// Folds `extra` (llama-server flags by their names, e.g. `{"ctx-size": 4096, "fa": "on"}`) into
/// the typed options object `options`, before it is parsed. A flag paddock does not support, or
/// one that repeats an option given by its own name, is an error naming it.
pub fn fold_extra(
    options: &mut serde_json::Map<String, serde_json::Value>,
    extra: serde_json::Map<String, serde_json::Value>,
) -> Result<(), String> {
    for (flag, value) in extra {
        let bare = flag.trim_start_matches('-');
        let Some((_, option)) = LLAMA_SERVER_FLAGS.iter().find(|(f, _)| *f == bare).or_else(|| {
            LLAMA_SERVER_FLAGS.iter().find(|(_, o)| *o == bare.replace('-', "_"))
            // e.g. "flash_attn"
        }) else {
            return Err(format!("the llama-server flag `{flag}` is not supported by paddock"));
        };
        if options.contains_key(*option) {
            return Err(format!("`{flag}` in extra repeats the option `{option}`"));
        }
        let value = match (*option, value) {
            // llama-server's -fa also takes booleans in config files.
            ("flash_attn", serde_json::Value::Bool(b)) => serde_json::Value::from(if b { "on" } else { "off" }),
            // llama-server takes lists as one comma-separated argument: `--rpc a:1,b:2`, `-ts 3,1`.
            ("rpc_servers", serde_json::Value::String(list)) => {
                list.split(',').map(|s| serde_json::Value::from(s.trim())).collect()
            }
            ("tensor_split", serde_json::Value::String(list)) => list
                .split([',', '/'])
                .map(|s| s.trim().parse::<f64>().map(serde_json::Value::from).unwrap_or_else(|_| s.trim().into()))
                .collect(),
            (_, v) => v,
        };
        options.insert((*option).to_string(), value);
    }
    Ok(())
}

pub const DEFAULT_PARALLEL: u32 = 4;
pub const DEFAULT_BATCH: u32 = 2048;
pub const DEFAULT_QUEUE: u32 = 64;

impl InstanceOptions {
    /// Checks every field's range; the message names the field and the limit.
    pub fn validate(&self) -> Result<(), String> {
        fn range<T: PartialOrd + std::fmt::Display + Copy>(
            name: &str,
            v: Option<T>,
            lo: T,
            hi: T,
        ) -> Result<(), String> {
            match v {
                Some(v) if v < lo || v > hi => Err(format!("{name} must be between {lo} and {hi}, got {v}")),
                _ => Ok(()),
            }
        }
        range("context_size", self.context_size, 16, 1 << 24)?;
        range("threads", self.threads, 1, 1024)?;
        range("threads_batch", self.threads_batch, 1, 1024)?;
        range("gpu_layers", self.gpu_layers, -1, 1 << 20)?;
        range("parallel", self.parallel, 1, 256)?;
        range("batch_size", self.batch_size, 1, 1 << 20)?;
        range("ubatch_size", self.ubatch_size, 1, 1 << 20)?;
        range("queue_size", self.queue_size, 0, 1 << 20)?;
        range("seed", self.seed, -1, u32::MAX as i64)?;
        let parallel = self.parallel.unwrap_or(DEFAULT_PARALLEL);
        if let Some(ctx) = self.context_size {
            if ctx / parallel < 16 {
                return Err(format!(
                    "context_size {ctx} gives {} tokens per slot with parallel {parallel}; each slot needs at least 16",
                    ctx / parallel
                ));
            }
        }
        if self.batch_size.unwrap_or(DEFAULT_BATCH) < parallel {
            return Err(format!("batch_size must be at least parallel ({parallel})"));
        }
        if self.n_ubatch() < parallel {
            return Err(format!("ubatch_size must be at least parallel ({parallel})"));
        }
        if let Some(lora) = &self.lora {
            if lora.len() > MAX_LORA {
                return Err(format!("at most {MAX_LORA} LoRA adapters, got {}", lora.len()));
            }
            for (i, l) in lora.iter().enumerate() {
                if l.path.as_os_str().is_empty() {
                    return Err(format!("lora[{i}].path is empty"));
                }
                if !l.scale.is_finite() || l.scale.abs() > 100.0 {
                    return Err(format!("lora[{i}].scale must be between -100 and 100, got {}", l.scale));
                }
            }
            if lora.iter().filter(|l| l.scale != 0.0).count() > 1 {
                return Err("paddock applies one LoRA adapter at a time: give at most one a non-zero scale".into());
            }
        }
        if self.tensor_split.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err("tensor_split is not supported yet (llama-cpp-2 0.1.160 cannot pass it to llama.cpp); \
                        layers are split between devices in proportion to their free memory"
                .into());
        }
        if let Some(servers) = self.rpc_servers.as_ref().filter(|s| !s.is_empty()) {
            if !cfg!(feature = "rpc") {
                return Err("rpc_servers: this paddock was built without the `rpc` feature".into());
            }
            if servers.len() > MAX_DEVICES {
                return Err(format!("rpc_servers: at most {MAX_DEVICES} workers, got {}", servers.len()));
            }
            if let Some((i, e)) = servers.iter().enumerate().find(|(i, e)| servers[..*i].contains(e)) {
                return Err(format!("rpc_servers[{i}]: {e} is listed twice"));
            }
            if self.gpu_layers == Some(0) {
                return Err("rpc_servers: with gpu_layers 0 no layer goes to the workers (they count as GPUs); \
                            leave gpu_layers unset for all layers, or give how many"
                    .into());
            }
        }
        Ok(())
    }

    /// Overlays `other`'s set fields on these (a partial update).
    pub fn merge(&mut self, other: &InstanceOptions) {
        macro_rules! take {
            ($($f:ident),*) => { $( if other.$f.is_some() { self.$f = other.$f; } )* };
        }
        take!(
            context_size,
            threads,
            threads_batch,
            gpu_layers,
            parallel,
            batch_size,
            ubatch_size,
            queue_size,
            seed,
            flash_attn,
            embeddings,
            isolation
        );
        if other.lora.is_some() {
            self.lora = other.lora.clone();
        }
        if other.rpc_servers.is_some() {
            self.rpc_servers = other.rpc_servers.clone();
        }
        if other.tensor_split.is_some() {
            self.tensor_split = other.tensor_split.clone();
        }
    }

    /// Where the engine runs. A lost RPC worker aborts the process holding its connection, so
    /// instances with workers get a process of their own unless told otherwise.
    pub fn isolation(&self) -> Isolation {
        self.isolation.unwrap_or(if self.rpc_servers.as_ref().is_some_and(|s| !s.is_empty()) {
            Isolation::Process
        } else {
            Isolation::Thread
        })
    }

    /// Layers offloaded: all unless a non-negative number is given (llama-server's -1 = all).
    fn n_gpu_layers(&self) -> u32 {
        match self.gpu_layers {
            Some(n) if n >= 0 => n as u32,
            _ => u32::MAX,
        }
    }

    /// What these options cost in memory with a model of `shape`: the engine's own context
    /// layout (see `engine::worker::load`) put through the memory arithmetic.
    pub fn footprint(&self, shape: &Shape) -> Footprint {
        let parallel = self.parallel.unwrap_or(DEFAULT_PARALLEL);
        let n_train = shape.context_length.unwrap_or(u64::MAX).max(16);
        let n_ctx =
            self.context_size.map_or_else(|| (DEFAULT_CTX_PER_SLOT as u64 * parallel as u64).min(n_train), u64::from);
        let n_ubatch = self.n_ubatch();
        // Layers offloaded go to the workers when there are any (a GPU build would split them
        // with local GPUs, whose memory the budget does not count either).
        let remote_layers = if self.rpc_server_names().is_empty() { 0 } else { self.n_gpu_layers() as u64 };
        footprint(shape, Layout { n_ctx, n_parallel: parallel as u64, n_ubatch: n_ubatch as u64, remote_layers })
    }

    /// Which loaded weights the instance `name` with these options and `model` can share: none
    /// when its engine runs in a process of its own.
    pub fn weights_key(&self, name: &str, model: &Path) -> WeightsKey {
        let lora: Vec<&Path> = self.lora.iter().flatten().map(|l| l.path.as_path()).collect();
        let mut key = WeightsKey::new(model, self.n_gpu_layers(), &self.rpc_server_names(), &lora);
        if self.isolation() == Isolation::Process {
            key.process = Some(name.to_string());
        }
        key
    }

    /// The physical batch, as llama.cpp will use it: never above the logical one.
    fn n_ubatch(&self) -> u32 {
        self.ubatch_size.unwrap_or(DEFAULT_UBATCH).min(self.batch_size.unwrap_or(DEFAULT_BATCH))
    }

    /// The workers as `host:port` strings (what the engine takes).
    fn rpc_server_names(&self) -> Vec<String> {
        self.rpc_servers.iter().flatten().map(ToString::to_string).collect()
    }

    pub fn engine_config(
        &self,
        name: &str,
        model_path: PathBuf,
        logs: Arc<LogBuffer>,
        cancel_load: Arc<AtomicBool>,
    ) -> EngineConfig {
        let threads = self.threads.unwrap_or_else(|| num_cpus::get_physical().max(1) as u32);
        EngineConfig {
            name: name.to_string(),
            model_path,
            n_ctx: self.context_size,
            n_threads: threads as i32,
            n_threads_batch: self.threads_batch.unwrap_or(threads) as i32,
            n_gpu_layers: self.n_gpu_layers(),
            rpc_servers: self.rpc_server_names(),
            n_parallel: self.parallel.unwrap_or(DEFAULT_PARALLEL),
            n_batch: self.batch_size.unwrap_or(DEFAULT_BATCH),
            n_ubatch: self.n_ubatch(),
            queue_size: self.queue_size.unwrap_or(DEFAULT_QUEUE),
            seed: self.seed.filter(|&s| s >= 0).map(|s| s as u32),
            flash_attn: match self.flash_attn.unwrap_or(FlashAttn::Auto) {
                FlashAttn::On => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED,
                FlashAttn::Off => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED,
                FlashAttn::Auto => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_AUTO,
            },
            embeddings: self.embeddings.unwrap_or(false),
            lora: (self.lora.iter().flatten())
                .map(|l| crate::engine::LoraSpec { path: l.path.clone(), scale: l.scale })
                .collect(),
            logs,
            cancel_load,
            kv_dir: None,
            isolation: self.isolation(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_server_names_are_accepted() {
        let o: InstanceOptions = serde_json::from_str(r#"{"ctx_size":2048,"n_gpu_layers":0,"np":2}"#).unwrap();
        assert_eq!(o.context_size, Some(2048));
        assert_eq!(o.gpu_layers, Some(0));
        assert_eq!(o.parallel, Some(2));
    }

    #[test]
    fn unknown_options_are_refused_by_name() {
        let err = serde_json::from_str::<InstanceOptions>(r#"{"flash":true}"#).unwrap_err().to_string();
        assert!(err.contains("unknown field `flash`"), "{err}");
    }

    #[test]
    fn ranges_name_the_field_and_limit() {
        let o = InstanceOptions { parallel: Some(0), ..Default::default() };
        assert_eq!(o.validate().unwrap_err(), "parallel must be between 1 and 256, got 0");
        let o = InstanceOptions { context_size: Some(64), parallel: Some(8), ..Default::default() };
        assert!(o.validate().unwrap_err().contains("8 tokens per slot"));
        assert!(InstanceOptions::default().validate().is_ok());
    }

    #[test]
    fn llama_server_flags_in_extra_fold_into_options() {
        let mut options = serde_json::Map::new();
        options.insert("threads".into(), 2.into());
        let extra = serde_json::json!({ "ctx-size": 4096, "-fa": true, "np": 2 }).as_object().unwrap().clone();
        fold_extra(&mut options, extra).unwrap();
        let o: InstanceOptions = serde_json::from_value(serde_json::Value::Object(options.clone())).unwrap();
        assert_eq!(
            (o.context_size, o.parallel, o.threads, o.flash_attn),
            (Some(4096), Some(2), Some(2), Some(FlashAttn::On))
        );
        let unknown = serde_json::json!({ "mlock": true }).as_object().unwrap().clone();
        assert_eq!(
            fold_extra(&mut options, unknown).unwrap_err(),
            "the llama-server flag `mlock` is not supported by paddock"
        );
        let repeat = serde_json::json!({ "t": 4 }).as_object().unwrap().clone();
        assert!(fold_extra(&mut options, repeat).unwrap_err().contains("repeats the option `threads`"));
    }

    #[test]
    fn rpc_servers_parse_and_validate() {
        let o: InstanceOptions = serde_json::from_str(r#"{"rpc":["127.0.0.1:50052","box:1"]}"#).unwrap();
        assert_eq!(o.rpc_server_names(), vec!["127.0.0.1:50052", "box:1"]);
        assert!(o.validate().is_ok());
        let err = serde_json::from_str::<InstanceOptions>(r#"{"rpc_servers":["[::1]:5"]}"#).unwrap_err().to_string();
        assert!(err.contains("IPv4 only"), "{err}");
        let twice: InstanceOptions = serde_json::from_str(r#"{"rpc_servers":["a:1","a:1"]}"#).unwrap();
        assert_eq!(twice.validate().unwrap_err(), "rpc_servers[1]: a:1 is listed twice");
        let none: InstanceOptions = serde_json::from_str(r#"{"rpc_servers":["a:1"],"ngl":0}"#).unwrap();
        assert!(none.validate().unwrap_err().contains("gpu_layers 0"));
        let split: InstanceOptions = serde_json::from_str(r#"{"tensor_split":[3,1]}"#).unwrap();
        assert!(split.validate().unwrap_err().starts_with("tensor_split is not supported yet"));
        // llama-server's comma-separated flag values.
        let mut options = serde_json::Map::new();
        let extra = serde_json::json!({ "rpc": "a:1, b:2", "ts": "3,1" }).as_object().unwrap().clone();
        fold_extra(&mut options, extra).unwrap();
        let o: InstanceOptions = serde_json::from_value(serde_json::Value::Object(options)).unwrap();
        assert_eq!(
            (o.rpc_server_names(), o.tensor_split.clone()),
            (vec!["a:1".to_string(), "b:2".into()], Some(vec![3.0, 1.0]))
        );
        // Workers are part of what weights are shared by.
        let model = Path::new("/m.gguf");
        assert_ne!(o.weights_key("i", model), InstanceOptions::default().weights_key("i", model));
        // And an instance with workers runs in a process of its own, sharing nothing.
        assert_eq!(o.isolation(), Isolation::Process);
        assert_eq!(o.weights_key("i", model).process.as_deref(), Some("i"));
        let threaded = InstanceOptions { isolation: Some(Isolation::Thread), ..o.clone() };
        assert_eq!(threaded.weights_key("i", model).process, None);
    }

    #[test]
    fn merge_overlays_only_set_fields() {
        let mut a = InstanceOptions { threads: Some(2), context_size: Some(1024), ..Default::default() };
        a.merge(&InstanceOptions { threads: Some(4), ..Default::default() });
        assert_eq!((a.threads, a.context_size), (Some(4), Some(1024)));
    }
}
