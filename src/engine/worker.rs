//! The engine thread: owns the model and context, and runs the decode loop.
//!
//! One step of the loop:
//! 1. take commands (blocking only when there is nothing to do), validate new requests;
//! 2. drop requests whose client went away, freeing their slots;
//! 3. place waiting requests into free slots, reusing the longest cached prefix;
//! 4. plan the batch (scheduler), fill one `LlamaBatch`, decode;
//! 5. sample every slot that got logits, emit text, finish what is finished.
//!
//! Every value that reaches llama.cpp is checked first (see shared/LLAMA-CPP-2.md): batch sizes
//! within `n_batch`, sequence ids within `n_seq_max`, positions within the slot's context,
//! token ids within the vocabulary, sampling only at indices that requested logits.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use super::scheduler::{self, Chunk, SlotCache, SlotDemand};
use super::text::{StopMatcher, StopOutcome, Utf8Assembler};
use super::{
    EngineCommand, EngineConfig, EngineError, EngineStats, EventSender, FinishReason, GenerateRequest, ModelInfo,
    Prompt, StreamEvent, Usage,
};

/// Default context per slot when the instance gives no context size.
const DEFAULT_CTX_PER_SLOT: u32 = 4096;
/// Below this a slot cannot hold a useful conversation; refuse the configuration.
const MIN_CTX_PER_SLOT: u32 = 16;
/// llama.cpp's limit on sequences in one context.
const MAX_SEQUENCES: u32 = 256;
/// One KV pool shared by the slots, as llama-server's default (`-np` auto) uses. Measured here
/// (4 streams, Gemma 3 270M, 2 threads): a 4-token decode step takes ~52 ms unified against ~80 ms
/// with one stream per slot, which is what llama-batched-bench's ceiling allows. The price: every
/// token's attention spans the pool's cells (masked), so a greedy answer may differ in a late
/// token when other requests share the batch (seen on 1 prompt in 6 at the 4th token); alone it
/// is reproducible. Copying a prefix between slots is metadata-only with it; without it a
/// partial `seq_cp` between slots aborts llama.cpp, so cross-slot copies follow this flag.
const KV_UNIFIED: bool = true;

/// A validated request waiting for a slot.
struct Job {
    tokens: Vec<LlamaToken>,
    request: GenerateRequest,
    events: EventSender,
    /// Held until the request ends: it is what bounds the queue.
    _permit: OwnedSemaphorePermit,
    received: Instant,
}

/// A request in a slot.
struct Active {
    job: Job,
    sampler: LlamaSampler,
    /// Sampled, not yet decoded; decoded in the next step to produce the next logits.
    next_token: Option<LlamaToken>,
    /// Index in the current batch whose logits belong to this slot.
    i_batch: Option<i32>,
    n_generated: u32,
    n_cached: u32,
    utf8: Utf8Assembler,
    stop: StopMatcher,
    prefill_done: Option<Instant>,
    admitted_order: u64,
}

struct Slot {
    seq: i32,
    /// Tokens whose KV is in this slot's sequence, in order: the invariant that makes prefix
    /// reuse correct. Extended only after a successful decode.
    cached: Vec<LlamaToken>,
    last_used: u64,
    active: Option<Active>,
}

/// Runs the engine until Shutdown (Ok) or an unrecoverable error (Err, reported as the exit reason).
pub(super) fn run(
    config: EngineConfig,
    mut rx: mpsc::UnboundedReceiver<EngineCommand>,
    ready: oneshot::Sender<Result<ModelInfo, EngineError>>,
    stats: Arc<EngineStats>,
) -> Result<(), String> {
    let loaded = match load(&config) {
        Ok(m) => m,
        Err(e) => {
            let reason = e.to_string();
            let _ = ready.send(Err(e));
            return Err(reason);
        }
    };
    let (model, load_ms) = loaded;
    let ctx = match new_context(&config, &model) {
        Ok(c) => c,
        Err(e) => {
            let reason = e.to_string();
            let _ = ready.send(Err(e));
            return Err(reason);
        }
    };
    let info = model_info(&config, &model, &ctx, load_ms);
    tracing::info!(
        n_ctx = info.n_ctx,
        n_ctx_slot = info.n_ctx_slot,
        n_parallel = info.n_parallel,
        load_ms,
        "model loaded"
    );
    let mut worker = Worker::new(&model, ctx, info.clone(), stats, config.seed);
    if ready.send(Ok(info)).is_err() {
        return Ok(()); // nobody waits for us: the start was abandoned
    }
    worker.serve(&mut rx);
    Ok(())
}

fn load(config: &EngineConfig) -> Result<(LlamaModel, u64), EngineError> {
    let backend = super::backend()?;
    if config.n_parallel == 0 || config.n_parallel > MAX_SEQUENCES {
        return Err(EngineError::Config(format!(
            "parallel must be between 1 and {MAX_SEQUENCES}, got {}",
            config.n_parallel
        )));
    }
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
    let model = LlamaModel::load_from_file(backend, &config.model_path, &params).map_err(|e| {
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
    Ok((model, started.elapsed().as_millis() as u64))
}

fn new_context<'m>(config: &EngineConfig, model: &'m LlamaModel) -> Result<LlamaContext<'m>, EngineError> {
    let n_train = model.n_ctx_train().max(MIN_CTX_PER_SLOT);
    let n_ctx = config.n_ctx.unwrap_or_else(|| (DEFAULT_CTX_PER_SLOT * config.n_parallel).min(n_train));
    if n_ctx / config.n_parallel < MIN_CTX_PER_SLOT {
        return Err(EngineError::Config(format!(
            "context_size {n_ctx} leaves {} tokens per slot for {} slots; give at least {} per slot",
            n_ctx / config.n_parallel,
            config.n_parallel,
            MIN_CTX_PER_SLOT
        )));
    }
    if config.n_batch < config.n_parallel {
        return Err(EngineError::Config(format!(
            "batch_size {} is smaller than parallel {}: every generating slot needs a place in each batch",
            config.n_batch, config.n_parallel
        )));
    }
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(config.n_batch)
        .with_n_ubatch(config.n_batch.min(512))
        .with_n_seq_max(config.n_parallel)
        .with_n_threads(config.n_threads)
        .with_n_threads_batch(config.n_threads_batch)
        .with_flash_attention_policy(config.flash_attn)
        .with_kv_unified(KV_UNIFIED)
        // Sliding-window layers keep every position (the crate's default, unlike llama-server's):
        // with only the window kept, cutting a cached prefix back could leave positions the next
        // token attends to missing from those layers, and prefix reuse would have to detect it.
        .with_swa_full(true);
    let backend = super::backend()?;
    model.new_context(backend, params).map_err(|e| EngineError::Config(format!("cannot create context: {e}")))
}

fn model_info(config: &EngineConfig, model: &LlamaModel, ctx: &LlamaContext<'_>, load_ms: u64) -> ModelInfo {
    let vocab = model.vocab();
    let piece = |t: LlamaToken| String::from_utf8_lossy(&vocab.token_to_piece(t, true, None)).into_owned();
    let n_ctx = ctx.n_ctx();
    ModelInfo {
        n_ctx,
        n_ctx_slot: n_ctx / config.n_parallel,
        n_ctx_train: model.n_ctx_train(),
        n_parallel: config.n_parallel,
        n_batch: ctx.n_batch(),
        n_vocab: model.n_vocab(),
        n_params: model.n_params(),
        size_bytes: model.size(),
        architecture: model.meta_val_str("general.architecture").ok(),
        description: model.meta_val_str("general.name").ok(),
        chat_template: model.chat_template(None).ok().and_then(|t| t.to_string().ok()),
        bos_token: piece(vocab.bos()),
        eos_token: piece(vocab.eos()),
        add_bos: vocab.should_add_bos(),
        load_ms,
    }
}

struct Worker<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    info: ModelInfo,
    stats: Arc<EngineStats>,
    slots: Vec<Slot>,
    queue: VecDeque<Job>,
    batch: LlamaBatch<'static>,
    plan: Vec<Chunk>,
    demands: Vec<(usize, SlotDemand)>,
    default_seed: Option<u32>,
    /// Scratch buffers reused every token.
    piece: Vec<u8>,
    decoded: String,
    text: String,
    clock: u64,
    shutting_down: bool,
}

impl<'m> Worker<'m> {
    fn new(
        model: &'m LlamaModel,
        ctx: LlamaContext<'m>,
        info: ModelInfo,
        stats: Arc<EngineStats>,
        default_seed: Option<u32>,
    ) -> Self {
        let slots = (0..info.n_parallel)
            .map(|i| Slot { seq: i as i32, cached: Vec::new(), last_used: 0, active: None })
            .collect();
        Worker {
            model,
            batch: LlamaBatch::new(info.n_batch as usize, 1),
            ctx,
            info,
            stats,
            slots,
            queue: VecDeque::new(),
            plan: Vec::new(),
            demands: Vec::new(),
            default_seed,
            piece: Vec::with_capacity(64),
            decoded: String::with_capacity(64),
            text: String::with_capacity(64),
            clock: 0,
            shutting_down: false,
        }
    }

    fn serve(&mut self, rx: &mut mpsc::UnboundedReceiver<EngineCommand>) {
        loop {
            if self.is_idle() {
                match rx.blocking_recv() {
                    Some(cmd) => self.handle(cmd),
                    None => break,
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                self.handle(cmd);
            }
            if self.shutting_down {
                break;
            }
            self.drop_cancelled();
            self.place_waiting();
            self.step();
        }
        self.fail_all(EngineError::Stopped);
    }

    fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.slots.iter().all(|s| s.active.is_none())
    }

    fn handle(&mut self, cmd: EngineCommand) {
        match cmd {
            EngineCommand::Generate { request, events, permit } => match self.validate(&request) {
                Ok(tokens) => {
                    let n = tokens.len() as u32;
                    if events.send(Ok(StreamEvent::Accepted { prompt_tokens: n })).is_ok() {
                        self.queue.push_back(Job {
                            tokens,
                            request,
                            events,
                            _permit: permit,
                            received: Instant::now(),
                        });
                        self.stats.queued.store(self.queue.len() as u64, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    let _ = events.send(Err(e));
                }
            },
            EngineCommand::Ping(reply) => {
                let _ = reply.send(());
            }
            EngineCommand::Shutdown => self.shutting_down = true,
        }
    }

    /// Tokenizes and checks the request against the vocabulary and the slot's context.
    fn validate(&self, request: &GenerateRequest) -> Result<Vec<LlamaToken>, EngineError> {
        let tokens = match &request.prompt {
            Prompt::Text(text) => self.model.vocab().tokenize(text.as_bytes(), true, true),
            Prompt::Tokens(ids) => {
                let n_vocab = self.info.n_vocab;
                if let Some(&bad) = ids.iter().find(|&&t| t < 0 || t >= n_vocab) {
                    return Err(EngineError::InvalidToken { token: bad, n_vocab });
                }
                ids.iter().map(|&t| LlamaToken(t)).collect()
            }
        };
        if tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if tokens.len() >= self.info.n_ctx_slot as usize {
            return Err(EngineError::PromptTooLong { n_prompt: tokens.len(), n_ctx_slot: self.info.n_ctx_slot });
        }
        Ok(tokens)
    }

    fn drop_cancelled(&mut self) {
        self.queue.retain(|job| !job.events.is_closed());
        for i in 0..self.slots.len() {
            if self.slots[i].active.as_ref().is_some_and(|a| a.job.events.is_closed()) {
                tracing::debug!(slot = i, "client went away; slot freed");
                self.release(i);
            }
        }
    }

    /// Moves waiting requests into free slots, FIFO, each into the slot with the best prefix.
    fn place_waiting(&mut self) {
        while !self.queue.is_empty() {
            let placement = {
                let prompt = &self.queue[0].tokens;
                let caches: Vec<SlotCache<'_, LlamaToken>> = self
                    .slots
                    .iter()
                    .map(|s| SlotCache { free: s.active.is_none(), cached: &s.cached, last_used: s.last_used })
                    .collect();
                scheduler::pick_slot(prompt, &caches, KV_UNIFIED)
            };
            let Some(p) = placement else { break };
            let job = self.queue.pop_front().expect("queue is not empty");
            let n_keep = self.reuse_prefix(p, &job.tokens);
            self.start(p.slot, job, n_keep);
        }
        self.stats.queued.store(self.queue.len() as u64, Ordering::Relaxed);
    }

    /// Makes `slot`'s KV hold exactly the first `n_keep` prompt tokens; returns how many it holds
    /// (fewer when llama.cpp refuses a partial removal, e.g. for recurrent models).
    fn reuse_prefix(&mut self, p: scheduler::Placement, prompt: &[LlamaToken]) -> usize {
        let seq = self.slots[p.slot].seq;
        if let Some(donor) = p.copy_from {
            let donor_seq = self.slots[donor].seq;
            // seq ids are slot indices < n_seq_max; positions < n_ctx_slot.
            let cleared = self.ctx.kv_cache_seq_rm(seq, None, None).is_ok();
            if cleared && self.ctx.kv_cache_seq_cp(donor_seq, seq, Some(0), Some(p.n_keep as u32)).is_ok() {
                self.slots[p.slot].cached.clear();
                self.slots[p.slot].cached.extend_from_slice(&prompt[..p.n_keep]);
                return p.n_keep;
            }
            self.clear_slot(p.slot);
            return 0;
        }
        if self.ctx.kv_cache_seq_rm(seq, Some(p.n_keep as u32), None).is_ok() {
            self.slots[p.slot].cached.truncate(p.n_keep);
            p.n_keep
        } else {
            self.clear_slot(p.slot);
            0
        }
    }

    fn clear_slot(&mut self, slot: usize) {
        let _ = self.ctx.kv_cache_seq_rm(self.slots[slot].seq, None, None);
        self.slots[slot].cached.clear();
    }

    fn start(&mut self, slot: usize, job: Job, n_keep: usize) {
        let p = &job.request.sampling;
        let seed = p.seed.or(self.default_seed).unwrap_or_else(|| fastrand::u32(..));
        let mut sampler = p.build_chain(self.info.n_vocab, seed);
        if p.has_penalties() {
            // As llama-server does: penalties see the prompt too.
            let last_n = p.repeat_last_n.max(0) as usize;
            sampler.accept_many(&job.tokens[job.tokens.len().saturating_sub(last_n)..]);
        }
        self.clock += 1;
        self.stats.requests_total.fetch_add(1, Ordering::Relaxed);
        self.stats.prompt_tokens_cached_total.fetch_add(n_keep as u64, Ordering::Relaxed);
        self.stats.slots_busy.fetch_add(1, Ordering::Relaxed);
        let stop = StopMatcher::new(job.request.stop.clone());
        self.slots[slot].active = Some(Active {
            job,
            sampler,
            next_token: None,
            i_batch: None,
            n_generated: 0,
            n_cached: n_keep as u32,
            utf8: Utf8Assembler::default(),
            stop,
            prefill_done: None,
            admitted_order: self.clock,
        });
    }

    /// Frees a slot; its KV stays as a prefix cache for the next request.
    fn release(&mut self, slot: usize) {
        if self.slots[slot].active.take().is_some() {
            self.clock += 1;
            self.slots[slot].last_used = self.clock;
            self.stats.slots_busy.fetch_sub(1, Ordering::Relaxed);
            self.stats.mark_active();
        }
    }

    fn step(&mut self) {
        self.demands.clear();
        for (i, slot) in self.slots.iter().enumerate() {
            let Some(a) = &slot.active else { continue };
            let demand = match a.next_token {
                Some(_) => SlotDemand::Generate,
                None => SlotDemand::Prefill { remaining: a.job.tokens.len() - slot.cached.len() },
            };
            self.demands.push((i, demand));
        }
        // Oldest first, so an older prompt finishes prefilling before a newer one starts.
        self.demands.sort_by_key(|&(i, _)| self.slots[i].active.as_ref().map_or(0, |a| a.admitted_order));
        scheduler::plan_step(&self.demands, self.info.n_batch as usize, &mut self.plan);
        if self.plan.is_empty() {
            return;
        }
        if let Err(e) = self.fill_batch() {
            self.fail_planned(e);
            return;
        }
        if let Err(e) = self.ctx.decode(&mut self.batch) {
            tracing::error!("decode failed: {e}");
            self.fail_planned(EngineError::Decode(e.to_string()));
            return;
        }
        self.stats.decode_calls_total.fetch_add(1, Ordering::Relaxed);
        self.stats.max_batch_sequences.fetch_max(self.plan.len() as u64, Ordering::Relaxed);
        self.commit_batch();
        for k in 0..self.plan.len() {
            let chunk = self.plan[k];
            if chunk.logits {
                self.sample(chunk.slot);
            }
        }
    }

    fn fill_batch(&mut self) -> Result<(), EngineError> {
        self.batch.clear();
        for chunk in &self.plan {
            let slot = &mut self.slots[chunk.slot];
            let a = slot.active.as_mut().expect("planned slots are active");
            let pos0 = slot.cached.len();
            // The prompt fits (validated) and generation stops at the slot's end, so positions
            // stay below n_ctx_slot; the plan stays within n_batch. Assert our own invariants
            // in Rust rather than let llama.cpp abort.
            if pos0 + chunk.n_tokens > self.info.n_ctx_slot as usize {
                return Err(EngineError::Decode(format!("slot {} would pass its context", chunk.slot)));
            }
            let seq = slot.seq;
            let add = |batch: &mut LlamaBatch, tok: LlamaToken, pos: usize, logits: bool| {
                batch.add(tok, pos as i32, &[seq], logits).map_err(|e| EngineError::Decode(e.to_string()))
            };
            match a.next_token {
                Some(tok) => {
                    add(&mut self.batch, tok, pos0, true)?;
                    a.i_batch = Some(self.batch.n_tokens() - 1);
                }
                None => {
                    for (k, &tok) in a.job.tokens[pos0..pos0 + chunk.n_tokens].iter().enumerate() {
                        let last = k + 1 == chunk.n_tokens;
                        add(&mut self.batch, tok, pos0 + k, chunk.logits && last)?;
                    }
                    a.i_batch = chunk.logits.then(|| self.batch.n_tokens() - 1);
                }
            }
        }
        Ok(())
    }

    /// After a successful decode, records what is now in each slot's KV.
    fn commit_batch(&mut self) {
        let mut prompt_tokens = 0;
        for chunk in &self.plan {
            let slot = &mut self.slots[chunk.slot];
            let a = slot.active.as_mut().expect("planned slots are active");
            match a.next_token.take() {
                Some(tok) => slot.cached.push(tok),
                None => {
                    let pos0 = slot.cached.len();
                    slot.cached.extend_from_slice(&a.job.tokens[pos0..pos0 + chunk.n_tokens]);
                    prompt_tokens += chunk.n_tokens as u64;
                    if chunk.logits {
                        a.prefill_done = Some(Instant::now());
                    }
                }
            }
        }
        self.stats.prompt_tokens_total.fetch_add(prompt_tokens, Ordering::Relaxed);
    }

    fn sample(&mut self, slot_idx: usize) {
        let n_ctx_slot = self.info.n_ctx_slot as usize;
        let vocab = self.model.vocab();
        let slot = &mut self.slots[slot_idx];
        let a = slot.active.as_mut().expect("sampled slots are active");
        let Some(i_batch) = a.i_batch.take() else { return };
        let tok = a.sampler.sample(&self.ctx, i_batch);
        a.n_generated += 1;
        self.stats.generated_tokens_total.fetch_add(1, Ordering::Relaxed);

        self.text.clear();
        let mut finish = None;
        let mut hit_stop_string = false;
        if vocab.is_eog(tok) {
            finish = Some(FinishReason::Stop);
        } else {
            self.piece.clear();
            vocab.token_to_piece_into(tok, &mut self.piece, false, None);
            self.decoded.clear();
            a.utf8.push(&self.piece, &mut self.decoded);
            if a.stop.push(&self.decoded, &mut self.text) == StopOutcome::Stopped {
                finish = Some(FinishReason::Stop);
                hit_stop_string = true;
            } else if a.job.request.max_tokens.is_some_and(|m| a.n_generated >= m) || slot.cached.len() >= n_ctx_slot {
                // The next decode would need position cached.len(), past the slot's end.
                finish = Some(FinishReason::Length);
            } else {
                a.next_token = Some(tok);
            }
        }
        if finish.is_some() && !hit_stop_string {
            // Text held back as a possible stop string, or an unfinished character, is released:
            // no stop string can match any more.
            self.decoded.clear();
            a.utf8.finish(&mut self.decoded);
            if a.stop.push(&self.decoded, &mut self.text) == StopOutcome::Continue {
                a.stop.finish(&mut self.text);
            }
        }
        let text = std::mem::take(&mut self.text);
        let Some(finish_reason) = finish else {
            if a.job.events.send(Ok(StreamEvent::Token { text, id: tok.0 })).is_err() {
                self.release(slot_idx);
            }
            return;
        };
        let now = Instant::now();
        let prefill_done = a.prefill_done.unwrap_or(now);
        let usage = Usage {
            prompt_tokens: a.job.tokens.len() as u32,
            completion_tokens: a.n_generated,
            cached_tokens: a.n_cached,
            prompt_ms: (prefill_done - a.job.received).as_secs_f64() * 1e3,
            generation_ms: (now - prefill_done).as_secs_f64() * 1e3,
        };
        let events = a.job.events.clone();
        // Free the slot (and the admission permit) before the client can hear that it is done,
        // so a client that follows up at once finds the slot free.
        self.release(slot_idx);
        let _ = events.send(Ok(StreamEvent::Token { text, id: tok.0 }));
        let _ = events.send(Ok(StreamEvent::Done { finish_reason, usage }));
    }

    /// A batch failed: its requests end with `error`, and their sequences are cleared because
    /// llama.cpp may have kept part of the batch in memory.
    fn fail_planned(&mut self, error: EngineError) {
        let failed: Vec<usize> = self.plan.iter().map(|c| c.slot).collect();
        for slot in failed {
            if let Some(a) = self.slots[slot].active.as_ref() {
                let _ = a.job.events.send(Err(error.clone()));
            }
            self.release(slot);
            self.clear_slot(slot);
        }
    }

    fn fail_all(&mut self, error: EngineError) {
        for job in self.queue.drain(..) {
            let _ = job.events.send(Err(error.clone()));
        }
        for i in 0..self.slots.len() {
            if let Some(a) = self.slots[i].active.as_ref() {
                let _ = a.job.events.send(Err(error.clone()));
            }
            self.release(i);
        }
    }
}
