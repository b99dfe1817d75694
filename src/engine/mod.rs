//! The engine: everything that touches llama.cpp, and nothing else does.
//!
//! # Layout
//! - [`worker`]: the dedicated OS thread that owns one `LlamaModel` + `LlamaContext` and runs
//!   the decode loop. Nothing outside that thread ever holds a llama.cpp object.
//! - [`scheduler`]: pure slot placement (prefix reuse) and batch planning.
//! - [`sampling`]: request parameters → sampler chain.
//! - [`text`]: UTF-8 assembly and stop strings.
//! - [`chat`]: chat templates (Jinja, from the GGUF), rendered on the HTTP side.
//! - [`rpc`]: llama.cpp's RPC backend: remote workers' devices, and `paddock worker`.
//! - [`weights`]: loaded models shared between instances.
//! - [`heap`]: returning freed llama.cpp buffers to the system after a stop (glibc arenas).
//!
//! [`Engine`] is the cheap, cloneable handle the rest of paddock uses; [`EngineThread`] owns the
//! thread and joins it on shutdown. A request reaches the worker as an [`EngineCommand`] over an
//! unbounded channel (bounded in effect by the admission semaphore) and its output comes back over
//! its own channel as [`StreamEvent`]s.

pub mod chat;
pub mod heap;
pub mod host;
pub mod rpc;
pub mod sampling;
pub mod scheduler;
pub mod text;
pub mod weights;
mod worker;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use llama_cpp_2::llama_backend::LlamaBackend;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::logs::LogBuffer;
pub use sampling::SamplingParams;

/// Context per slot when the instance gives no context size (capped at the model's training
/// context).
pub const DEFAULT_CTX_PER_SLOT: u32 = 4096;
/// Physical batch llama.cpp computes in when the instance gives none (llama-server's default).
pub const DEFAULT_UBATCH: u32 = 512;

/// Everything an engine thread needs to load a model and serve it. Plain data: built by the
/// instance layer from validated options.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EngineConfig {
    /// Instance name, for the thread name and log attribution.
    pub name: String,
    pub model_path: PathBuf,
    /// Total context (all slots). None: 4096 per slot, capped at the model's training context.
    pub n_ctx: Option<u32>,
    pub n_threads: i32,
    pub n_threads_batch: i32,
    pub n_gpu_layers: u32,
    /// ggml RPC workers (`host:port`, as the user wrote them) whose devices take layers before
    /// local GPUs (llama-server's `--rpc`). They count as GPUs: layers reach them only with
    /// `n_gpu_layers` > 0.
    pub rpc_servers: Vec<String>,
    /// Slots = llama.cpp sequences decoded together.
    pub n_parallel: u32,
    /// Most tokens in one decode call.
    pub n_batch: u32,
    /// Most tokens llama.cpp computes at once (its physical batch), and so in one scheduler step.
    pub n_ubatch: u32,
    /// Requests allowed to wait for a slot; past that they are refused (503).
    pub queue_size: u32,
    /// Default seed of requests that give none; None = random per request.
    pub seed: Option<u32>,
    pub flash_attn: llama_cpp_sys_2::llama_flash_attn_type,
    /// Serve embeddings too, from a second context created on first use.
    pub embeddings: bool,
    /// LoRA adapters loaded with the model, with their default scales (adapter id = index).
    pub lora: Vec<LoraSpec>,
    /// Not sent to an instance process: its log lines come back over the pipe.
    #[serde(skip)]
    pub logs: Arc<LogBuffer>,
    /// Set to abandon a load in progress (llama.cpp's progress callback checks it; an instance
    /// process is killed instead).
    #[serde(skip)]
    pub cancel_load: Arc<AtomicBool>,
    /// Where the slots' cached prompts are saved by a shutdown that asks for it, and restored
    /// from at the next start (see [`EngineThread::shutdown`]).
    pub kv_dir: Option<PathBuf>,
    /// Where the engine runs: a thread of this process, or a child process of its own.
    pub isolation: Isolation,
}

/// Where an instance's engine runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// A thread of paddock's process: no hop, weights shared between instances; a llama.cpp
    /// abort ends every instance.
    #[default]
    Thread,
    /// A child `paddock instance-host` process running the same engine: a llama.cpp abort (a
    /// failed assert, a lost RPC connection) ends this instance alone. Costs a pipe hop per
    /// event and the weights are not shared.
    Process,
}

/// A LoRA adapter (GGUF) and its scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub scale: f32,
}

/// What the engine tells the world once the model is loaded.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelInfo {
    pub n_ctx: u32,
    /// Context each slot may use: prompt + generated tokens.
    pub n_ctx_slot: u32,
    pub n_ctx_train: u32,
    pub n_parallel: u32,
    pub n_batch: u32,
    pub n_ubatch: u32,
    pub n_vocab: i32,
    pub n_params: u64,
    pub size_bytes: u64,
    pub architecture: Option<String>,
    pub description: Option<String>,
    /// The GGUF's `tokenizer.chat_template`, if any.
    #[serde(skip)]
    pub chat_template: Option<String>,
    #[serde(skip)]
    pub bos_token: String,
    #[serde(skip)]
    pub eos_token: String,
    /// Whether tokenizing adds BOS (so a template's own leading BOS text must be stripped).
    #[serde(skip)]
    pub add_bos: bool,
    #[serde(skip)]
    pub bos_id: i32,
    /// Fill-in-the-middle tokens (prefix, suffix, middle) when the vocabulary has all three.
    #[serde(skip)]
    pub fim: Option<[i32; 3]>,
    /// Size of an embedding vector.
    pub n_embd: i32,
    /// Whether `/v1/embeddings` is served (the instance's `embeddings` option).
    pub embeddings: bool,
    /// Largest input an embedding request may have: it must fit one micro-batch, because
    /// llama.cpp pools each micro-batch on its own.
    pub n_embd_input: u32,
    pub model_path: String,
    /// Time spent loading the weights for this start (0 when they were already loaded).
    pub load_ms: u64,
    /// The weights were already loaded (shared with another instance, or kept while parked).
    pub weights_reused: bool,
    /// Which device holds which layers (CPU, RPC workers, GPUs), from llama.cpp's load log.
    pub placement: Vec<weights::LayerPlacement>,
}

/// The prompt of a generation request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Prompt {
    /// Text, tokenized with special tokens parsed and BOS added as the vocabulary asks.
    Text(String),
    /// Token ids given by the client; checked against the vocabulary before use.
    Tokens(Vec<i32>),
}

/// A validated generation request (built by the API layer).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// None: until the end of the slot's context or an end-of-generation token.
    pub max_tokens: Option<u32>,
    /// GBNF the output must follow (root rule `root`); compiled by the engine, which reports a
    /// grammar llama.cpp cannot parse as [`EngineError::InvalidGrammar`] before any output.
    pub grammar: Option<String>,
    /// Report this many most likely tokens (with log-probabilities) for each generated token.
    pub n_probs: u32,
    /// Run in this slot (llama-server's `id_slot`); waits for it if it is busy.
    pub slot: Option<u32>,
    /// Reuse a cached prefix of the prompt (llama-server's `cache_prompt`, default true).
    pub cache_prompt: bool,
    /// Keep generating past end-of-generation tokens (they are banned).
    pub ignore_eos: bool,
    /// LoRA scales for this request by adapter id (llama-server's `lora`); adapters not named
    /// keep the instance's current scale.
    pub lora: Vec<(u32, f32)>,
}

impl Default for Prompt {
    fn default() -> Self {
        Prompt::Text(String::new())
    }
}

impl GenerateRequest {
    pub fn new(prompt: Prompt, sampling: SamplingParams, stop: Vec<String>, max_tokens: Option<u32>) -> Self {
        GenerateRequest { prompt, sampling, stop, max_tokens, cache_prompt: true, ..Default::default() }
    }
}

/// One generated token's probabilities, from the model's raw logits (before sampling).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenProbs {
    /// Log-probability of the token that was chosen.
    pub logprob: f32,
    /// The chosen token's bytes (a piece may be part of a UTF-8 character).
    pub bytes: Vec<u8>,
    /// The most likely tokens, best first: id, bytes, log-probability.
    pub top: Vec<(i32, Vec<u8>, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens whose KV was reused instead of decoded.
    pub cached_tokens: u32,
    pub prompt_ms: f64,
    pub generation_ms: f64,
}

/// What a request's channel carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum StreamEvent {
    /// Validated and queued (or placed): the prompt fits; streaming may begin.
    Accepted { prompt_tokens: u32 },
    /// Newly complete text (may be empty when a token only started a character or a stop string).
    Token {
        text: String,
        id: i32,
        /// Present when the request asked for `n_probs`.
        probs: Option<Box<TokenProbs>>,
    },
    Done {
        finish_reason: FinishReason,
        usage: Usage,
        /// The stop string that ended the generation, if one did.
        stop_word: Option<String>,
        /// The slot that ran the request.
        slot: u32,
    },
}

/// One token of [`Engine::tokenize`]'s answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenPiece {
    pub id: i32,
    pub piece: Vec<u8>,
}

/// A slot as `GET /slots` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlotView {
    pub id: u32,
    pub n_ctx: u32,
    pub is_processing: bool,
    /// Tokens in the slot's KV cache (prompt and output so far, or what the last request left).
    pub n_cached: u32,
    pub n_prompt_tokens: u32,
    pub n_decoded: u32,
    /// Tokens still allowed by `max_tokens` (−1: no limit but the context).
    pub n_remain: i64,
    /// The running request's prompt, or the cached text of an idle slot.
    pub prompt: String,
    pub sampling: Option<SamplingParams>,
    pub stop: Vec<String>,
}

/// What to do with a slot's saved state (`POST /slots/{id}?action=…`). Paths were confined to
/// the instance's slot directory by the caller.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SlotAction {
    Save(PathBuf),
    Restore(PathBuf),
    Erase,
}

/// Result of a [`SlotAction`]: tokens saved/restored/erased and bytes written or read.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct SlotActionReport {
    pub n_tokens: u32,
    pub n_bytes: u64,
    pub ms: f64,
}

/// Pooled, unnormalized embeddings, one per input.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    pub prompt_tokens: u32,
}

pub type EventSender = mpsc::UnboundedSender<Result<StreamEvent, EngineError>>;

#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize)]
pub enum EngineError {
    #[error("failed to load model {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("failed to load LoRA adapter {path}: {reason}")]
    LoraLoad { path: String, reason: String },
    #[error("model load was cancelled")]
    LoadCancelled,
    #[error("invalid engine configuration: {0}")]
    Config(String),
    /// An RPC worker that is down, busy, of another version, or badly named; the message names it.
    #[error("{0}")]
    Rpc(String),
    #[error("the prompt has {n_prompt} tokens, but a slot's context holds {n_ctx_slot} (context_size / parallel); at least one token must be left to generate")]
    PromptTooLong { n_prompt: usize, n_ctx_slot: u32 },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("token id {token} is outside the vocabulary (0..{n_vocab})")]
    InvalidToken { token: i32, n_vocab: i32 },
    #[error("all {slots} slots are busy and {queued} requests are already waiting; try again later")]
    Overloaded { slots: u32, queued: u32 },
    #[error("the instance is stopping or stopped")]
    Stopped,
    #[error("llama.cpp decode failed: {0}")]
    Decode(String),
    #[error("the engine ended the generation without finishing it")]
    IncompleteGeneration,
    #[error("llama.cpp could not parse the grammar (its log has the position): {0}")]
    InvalidGrammar(String),
    #[error("slot {slot} does not exist; the instance has {n_slots} (0..{n_slots})")]
    NoSuchSlot { slot: u32, n_slots: u32 },
    #[error("slot {0} is processing a request")]
    SlotBusy(u32),
    #[error("{0}")]
    SlotFile(String),
    #[error("this instance does not serve embeddings; set its option \"embeddings\": true (llama-server's --embeddings) and restart it")]
    EmbeddingsDisabled,
    #[error("{0}")]
    InvalidLora(String),
    #[error("input {index} has {n_tokens} tokens; an embedding input holds at most {max}")]
    EmbeddingInputTooLong { index: usize, n_tokens: usize, max: u32 },
    /// The instance's process died (isolation "process"): a llama.cpp abort, a kill.
    #[error("the instance's engine died: {0}")]
    Crashed(String),
}

/// Counters the worker updates and anyone may read. Relaxed atomics: they are statistics.
#[derive(Debug)]
pub struct EngineStats {
    /// `last_activity_ms` counts from here.
    epoch: Instant,
    pub requests_total: AtomicU64,
    pub prompt_tokens_total: AtomicU64,
    pub prompt_tokens_cached_total: AtomicU64,
    pub generated_tokens_total: AtomicU64,
    pub decode_calls_total: AtomicU64,
    /// Largest number of distinct sequences seen in one decode call: > 1 proves batching.
    pub max_batch_sequences: AtomicU64,
    pub slots_busy: AtomicU64,
    pub queued: AtomicU64,
    /// Milliseconds since the engine started when a request was last accepted or finished:
    /// inference traffic only (health pings do not count), for idle stops and LRU eviction.
    pub last_activity_ms: AtomicU64,
    /// Sum over finished requests of the time from arrival to first token, and of generation.
    pub prompt_us_total: AtomicU64,
    pub generation_us_total: AtomicU64,
    /// Tokens finished requests generated (the rate's numerator; cancelled ones have no time).
    pub generated_tokens_timed: AtomicU64,
    pub prompt_tokens_timed: AtomicU64,
    /// Sum over decode calls of the sequences in each (average = this / decode calls).
    pub batch_sequences_total: AtomicU64,
    /// Tokens held in the KV cache across all slots, after the last step.
    pub kv_tokens: AtomicU64,
    /// The engine thread's Linux thread id (0 until known, or where /proc is missing).
    pub thread_id: AtomicU64,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StatsSnapshot {
    pub requests_total: u64,
    pub prompt_tokens_total: u64,
    pub prompt_tokens_cached_total: u64,
    pub generated_tokens_total: u64,
    pub decode_calls_total: u64,
    pub max_batch_sequences: u64,
    pub slots_busy: u64,
    pub queued: u64,
    pub last_activity_ms: u64,
    pub prompt_us_total: u64,
    pub generation_us_total: u64,
    pub generated_tokens_timed: u64,
    pub prompt_tokens_timed: u64,
    pub batch_sequences_total: u64,
    pub kv_tokens: u64,
    #[serde(skip)]
    pub thread_id: u64,
}

impl StatsSnapshot {
    /// Generation speed over finished requests, tokens per second of generation time.
    pub fn tokens_per_second(&self) -> f64 {
        rate(self.generated_tokens_timed, self.generation_us_total)
    }

    /// Prompt processing speed over finished requests.
    pub fn prompt_tokens_per_second(&self) -> f64 {
        rate(self.prompt_tokens_timed, self.prompt_us_total)
    }
}

fn rate(tokens: u64, us: u64) -> f64 {
    if us == 0 {
        0.0
    } else {
        tokens as f64 * 1e6 / us as f64
    }
}

impl EngineStats {
    fn new() -> Self {
        EngineStats {
            epoch: Instant::now(),
            requests_total: AtomicU64::new(0),
            prompt_tokens_total: AtomicU64::new(0),
            prompt_tokens_cached_total: AtomicU64::new(0),
            generated_tokens_total: AtomicU64::new(0),
            decode_calls_total: AtomicU64::new(0),
            max_batch_sequences: AtomicU64::new(0),
            slots_busy: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            last_activity_ms: AtomicU64::new(0),
            prompt_us_total: AtomicU64::new(0),
            generation_us_total: AtomicU64::new(0),
            generated_tokens_timed: AtomicU64::new(0),
            prompt_tokens_timed: AtomicU64::new(0),
            batch_sequences_total: AtomicU64::new(0),
            kv_tokens: AtomicU64::new(0),
            thread_id: AtomicU64::new(0),
        }
    }

    /// Takes the counters an instance process reported (its own epoch and thread aside).
    fn absorb(&self, s: &StatsSnapshot) {
        let w = |a: &AtomicU64, v: u64| a.store(v, Ordering::Relaxed);
        w(&self.requests_total, s.requests_total);
        w(&self.prompt_tokens_total, s.prompt_tokens_total);
        w(&self.prompt_tokens_cached_total, s.prompt_tokens_cached_total);
        w(&self.generated_tokens_total, s.generated_tokens_total);
        w(&self.decode_calls_total, s.decode_calls_total);
        w(&self.max_batch_sequences, s.max_batch_sequences);
        w(&self.slots_busy, s.slots_busy);
        w(&self.queued, s.queued);
        w(&self.prompt_us_total, s.prompt_us_total);
        w(&self.generation_us_total, s.generation_us_total);
        w(&self.generated_tokens_timed, s.generated_tokens_timed);
        w(&self.prompt_tokens_timed, s.prompt_tokens_timed);
        w(&self.batch_sequences_total, s.batch_sequences_total);
        w(&self.kv_tokens, s.kv_tokens);
    }

    pub(crate) fn mark_active(&self) {
        self.last_activity_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            requests_total: r(&self.requests_total),
            prompt_tokens_total: r(&self.prompt_tokens_total),
            prompt_tokens_cached_total: r(&self.prompt_tokens_cached_total),
            generated_tokens_total: r(&self.generated_tokens_total),
            decode_calls_total: r(&self.decode_calls_total),
            max_batch_sequences: r(&self.max_batch_sequences),
            slots_busy: r(&self.slots_busy),
            queued: r(&self.queued),
            last_activity_ms: r(&self.last_activity_ms),
            prompt_us_total: r(&self.prompt_us_total),
            generation_us_total: r(&self.generation_us_total),
            generated_tokens_timed: r(&self.generated_tokens_timed),
            prompt_tokens_timed: r(&self.prompt_tokens_timed),
            batch_sequences_total: r(&self.batch_sequences_total),
            kv_tokens: r(&self.kv_tokens),
            thread_id: r(&self.thread_id),
        }
    }
}

pub(crate) enum EngineCommand {
    Generate {
        request: GenerateRequest,
        events: EventSender,
        permit: OwnedSemaphorePermit,
    },
    /// A round trip through the decode loop, for health checks.
    Ping(oneshot::Sender<()>),
    Tokenize {
        text: String,
        add_special: bool,
        parse_special: bool,
        reply: oneshot::Sender<Vec<TokenPiece>>,
    },
    /// Token ids were checked against the vocabulary by the caller.
    Detokenize {
        tokens: Vec<i32>,
        reply: oneshot::Sender<String>,
    },
    Slots(oneshot::Sender<Vec<SlotView>>),
    Slot {
        slot: u32,
        action: SlotAction,
        reply: oneshot::Sender<Result<SlotActionReport, EngineError>>,
    },
    /// The adapters and their scales; with `set`, first changes the instance's scales.
    Lora {
        set: Option<Vec<(u32, f32)>>,
        reply: oneshot::Sender<Result<Vec<LoraSpec>, EngineError>>,
    },
    Embed {
        inputs: Vec<Prompt>,
        reply: oneshot::Sender<Result<Embeddings, EngineError>>,
        permit: OwnedSemaphorePermit,
    },
    /// `save_kv`: write each slot's cached prompt to the config's `kv_dir` before exiting.
    Shutdown {
        save_kv: bool,
    },
}

/// Cheap handle to a running engine. Cloned into every request handler.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::UnboundedSender<EngineCommand>,
    permits: Arc<Semaphore>,
    info: Arc<ModelInfo>,
    stats: Arc<EngineStats>,
    queue_size: u32,
}

/// Owns the engine thread (or instance process); `shutdown` stops and joins it.
pub struct EngineThread {
    engine: Engine,
    owner: Owner,
}

enum Owner {
    Thread(Option<JoinHandle<()>>),
    Process(host::Process),
}

/// Why an engine thread ended, reported once through [`EngineThread::start`]'s `exited` channel.
pub type ExitReport = Result<(), String>;

static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();

/// The process-wide llama.cpp backend, initialised on first use. llama.cpp's logs are sent to
/// `tracing` before it starts, so nothing goes raw to stderr.
pub fn backend() -> Result<&'static LlamaBackend, EngineError> {
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default().with_logs_enabled(true));
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| EngineError::Config(format!("llama.cpp backend: {e}")))
}

impl EngineThread {
    /// Spawns the engine thread and waits (without blocking the runtime) until the model is
    /// loaded or the load failed. `exited` fires when the thread ends, with why.
    pub async fn start(config: EngineConfig) -> Result<(EngineThread, oneshot::Receiver<ExitReport>), EngineError> {
        if config.isolation == Isolation::Process {
            let (engine, process, exited) = host::start(config).await?;
            return Ok((EngineThread { engine, owner: Owner::Process(process) }, exited));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (exit_tx, exit_rx) = oneshot::channel();
        let stats = Arc::new(EngineStats::new());
        let queue_size = config.queue_size;
        let n_permits = (config.n_parallel + config.queue_size) as usize;
        let thread_stats = stats.clone();
        let span = tracing::info_span!("instance", name = %config.name);
        let join = std::thread::Builder::new()
            .name(format!("engine-{}", config.name))
            .spawn(move || {
                let _entered = span.enter();
                crate::logs::route_thread_to(config.logs.clone());
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    worker::run(config, rx, ready_tx, thread_stats)
                }));
                // The context (and the weights, if this was their last holder) is freed by
                // now: hand its buffers back before the next engine's thread allocates anew.
                heap::release_freed_memory("engine stopped");
                let report = match outcome {
                    Ok(r) => r,
                    Err(panic) => Err(panic_message(&panic)),
                };
                if let Err(reason) = &report {
                    tracing::error!("engine thread ended: {reason}");
                }
                let _ = exit_tx.send(report);
            })
            .map_err(|e| EngineError::Config(format!("cannot spawn engine thread: {e}")))?;
        let info = match ready_rx.await {
            Ok(Ok(info)) => info,
            Ok(Err(e)) => {
                let _ = join.join();
                return Err(e);
            }
            Err(_) => {
                // The thread died before answering: it panicked during load.
                let _ = join.join();
                let reason = exit_rx.await.ok().and_then(|r| r.err()).unwrap_or_else(|| "engine thread died".into());
                return Err(EngineError::Load { path: String::new(), reason });
            }
        };
        let engine =
            Engine { tx, permits: Arc::new(Semaphore::new(n_permits)), info: Arc::new(info), stats, queue_size };
        Ok((EngineThread { engine, owner: Owner::Thread(Some(join)) }, exit_rx))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The instance process's id, for an engine that runs in one.
    pub fn pid(&self) -> Option<u32> {
        match &self.owner {
            Owner::Process(p) => Some(p.pid()),
            Owner::Thread(_) => None,
        }
    }

    /// Asks the worker to stop (in-flight requests end with [`EngineError::Stopped`]) and joins
    /// it, waiting at most `deadline`. With `save_kv` the slots' cached prompts are saved first,
    /// for the next start to reuse. Blocking: call from a blocking context.
    pub fn shutdown(mut self, deadline: Duration, save_kv: bool) -> bool {
        let _ = self.engine.tx.send(EngineCommand::Shutdown { save_kv });
        let join = match &mut self.owner {
            Owner::Process(p) => return p.join(deadline),
            Owner::Thread(join) => join.take(),
        };
        let Some(join) = join else { return true };
        let start = Instant::now();
        while !join.is_finished() {
            if start.elapsed() > deadline {
                tracing::warn!("engine thread did not stop within {deadline:?}; leaving it detached");
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = join.join();
        true
    }
}

impl Drop for EngineThread {
    fn drop(&mut self) {
        // Not joined here: Drop may run on an async thread. The worker exits on its own once it
        // sees Shutdown or the channel closing.
        let _ = self.engine.tx.send(EngineCommand::Shutdown { save_kv: false });
    }
}

impl Engine {
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Admits a request and waits until the worker has validated it (tokenized, within the
    /// context). Errors here happen before any response byte is sent, so they get real statuses.
    pub async fn generate(&self, request: GenerateRequest) -> Result<Generation, EngineError> {
        let permit = self.admit()?;
        self.stats.mark_active();
        let (events, mut rx) = mpsc::unbounded_channel();
        self.tx.send(EngineCommand::Generate { request, events, permit }).map_err(|_| EngineError::Stopped)?;
        match rx.recv().await {
            Some(Ok(StreamEvent::Accepted { prompt_tokens })) => Ok(Generation { rx, prompt_tokens }),
            Some(Ok(_)) => Err(EngineError::IncompleteGeneration),
            Some(Err(e)) => Err(e),
            None => Err(EngineError::Stopped),
        }
    }

    /// How long since inference traffic last touched this engine.
    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.stats.last_activity_ms.load(Ordering::Relaxed));
        self.stats.epoch.elapsed().saturating_sub(last)
    }

    /// Whether any request is generating or waiting.
    pub fn is_busy(&self) -> bool {
        self.stats.slots_busy.load(Ordering::Relaxed) > 0 || self.stats.queued.load(Ordering::Relaxed) > 0
    }

    /// Waits until every admitted request has finished, at most `timeout`; then refuses new
    /// ones. Returns whether it drained in time (if not, a shutdown cancels what is left).
    pub async fn drain(&self, timeout: Duration) -> bool {
        let total = self.info.n_parallel + self.queue_size;
        let drained = tokio::time::timeout(timeout, self.permits.acquire_many(total)).await;
        self.permits.close();
        matches!(drained, Ok(Ok(_)))
    }

    async fn ask<T>(&self, command: impl FnOnce(oneshot::Sender<T>) -> EngineCommand) -> Result<T, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(command(tx)).map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    /// Tokenizes on the engine thread (the vocabulary lives there), between decode steps.
    pub async fn tokenize(
        &self,
        text: String,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<TokenPiece>, EngineError> {
        self.ask(|reply| EngineCommand::Tokenize { text, add_special, parse_special, reply }).await
    }

    pub async fn detokenize(&self, tokens: Vec<i32>) -> Result<String, EngineError> {
        let n_vocab = self.info.n_vocab;
        if let Some(&bad) = tokens.iter().find(|&&t| t < 0 || t >= n_vocab) {
            return Err(EngineError::InvalidToken { token: bad, n_vocab });
        }
        self.ask(|reply| EngineCommand::Detokenize { tokens, reply }).await
    }

    /// The LoRA adapters with their current scales, after applying `set` if given. New scales
    /// apply to requests admitted from then on.
    pub async fn lora(&self, set: Option<Vec<(u32, f32)>>) -> Result<Vec<LoraSpec>, EngineError> {
        self.ask(|reply| EngineCommand::Lora { set, reply }).await?
    }

    pub async fn slots(&self) -> Result<Vec<SlotView>, EngineError> {
        self.ask(EngineCommand::Slots).await
    }

    pub async fn slot_action(&self, slot: u32, action: SlotAction) -> Result<SlotActionReport, EngineError> {
        if slot >= self.info.n_parallel {
            return Err(EngineError::NoSuchSlot { slot, n_slots: self.info.n_parallel });
        }
        self.ask(|reply| EngineCommand::Slot { slot, action, reply }).await?
    }

    /// Embeds each input (pooled, not normalized). Takes an admission permit like a generation,
    /// so embeddings count against the queue and a drain waits for them.
    pub async fn embed(&self, inputs: Vec<Prompt>) -> Result<Embeddings, EngineError> {
        if !self.info.embeddings {
            return Err(EngineError::EmbeddingsDisabled);
        }
        let permit = self.admit()?;
        self.stats.mark_active();
        self.ask(|reply| EngineCommand::Embed { inputs, reply, permit }).await?
    }

    fn admit(&self) -> Result<OwnedSemaphorePermit, EngineError> {
        self.permits.clone().try_acquire_owned().map_err(|e| match e {
            // Closed by a drain: the instance is stopping.
            tokio::sync::TryAcquireError::Closed => EngineError::Stopped,
            tokio::sync::TryAcquireError::NoPermits => {
                EngineError::Overloaded { slots: self.info.n_parallel, queued: self.queue_size }
            }
        })
    }

    /// A round trip through the engine's loop; false if it did not answer within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(EngineCommand::Ping(tx)).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(())))
    }
}

/// An admitted request's output. Dropping it cancels the request: the worker notices the
/// closed channel at its next step and frees the slot.
pub struct Generation {
    rx: mpsc::UnboundedReceiver<Result<StreamEvent, EngineError>>,
    pub prompt_tokens: u32,
}

impl Generation {
    /// A generation fed through the returned sender instead of by an engine, so the response
    /// encoders can be benched (`benches/hot_paths.rs`) without a model.
    #[doc(hidden)]
    pub fn fed(prompt_tokens: u32) -> (mpsc::UnboundedSender<Result<StreamEvent, EngineError>>, Generation) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, Generation { rx, prompt_tokens })
    }

    /// The next event; `None` once `Done` was delivered (or the engine went away, which callers
    /// see as [`EngineError::IncompleteGeneration`] if no `Done` came).
    pub async fn next(&mut self) -> Option<Result<StreamEvent, EngineError>> {
        self.rx.recv().await
    }

    /// Runs the generation to the end and returns its whole text.
    pub async fn collect(mut self) -> Result<(String, FinishReason, Usage), EngineError> {
        let mut text = String::new();
        while let Some(event) = self.next().await {
            match event? {
                StreamEvent::Token { text: t, .. } => text.push_str(&t),
                StreamEvent::Done { finish_reason, usage, .. } => return Ok((text, finish_reason, usage)),
                StreamEvent::Accepted { .. } => {}
            }
        }
        Err(EngineError::IncompleteGeneration)
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        format!("panic: {s}")
    } else if let Some(s) = panic.downcast_ref::<String>() {
        format!("panic: {s}")
    } else {
        "panic".into()
    }
}
