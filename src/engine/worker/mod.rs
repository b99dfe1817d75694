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
//! within `n_ubatch`, sequence ids within `n_seq_max`, positions within the slot's context,
//! token ids within the vocabulary, sampling only at indices that requested logits.

mod kv;
mod load;
mod lora;
mod service;

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use super::sampling::{self, Prefilter};
use super::scheduler::{self, Chunk, SlotCache, SlotDemand};
use super::text::{StopMatcher, StopOutcome, Utf8Assembler};
use super::weights::{self, Weights};
use super::{
    EngineCommand, EngineConfig, EngineError, EngineStats, EventSender, FinishReason, GenerateRequest, ModelInfo,
    Prompt, StreamEvent, TokenProbs, Usage,
};
use load::{model_info, new_context};
use lora::Scales;
use service::EmbedJob;
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
    /// The request's grammar, compiled when it was validated.
    grammar: Option<LlamaSampler>,
    /// LoRA scales it runs with.
    lora: Scales,
    events: EventSender,
    /// Held until the request ends: it is what bounds the queue.
    _permit: OwnedSemaphorePermit,
    received: Instant,
}

/// A request in a slot.
struct Active {
    job: Job,
    lora: Scales,
    sampler: LlamaSampler,
    /// Set when the sampler needs only the largest logits (see [`Prefilter`]).
    prefilter: Option<Prefilter>,
    grammar: Option<LlamaSampler>,
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
    /// The LoRA scales `cached` was computed under.
    cached_lora: Scales,
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
    let (weights, reused) = match weights::acquire(&config) {
        Ok(w) => w,
        Err(e) => {
            let reason = e.to_string();
            let _ = ready.send(Err(e));
            return Err(reason);
        }
    };
    let ctx = match new_context(&config, &weights) {
        Ok(c) => c,
        Err(e) => {
            let reason = e.to_string();
            let _ = ready.send(Err(e));
            return Err(reason);
        }
    };
    let info = model_info(&config, &weights, &ctx, reused);
    tracing::info!(
        n_ctx = info.n_ctx,
        n_ctx_slot = info.n_ctx_slot,
        n_parallel = info.n_parallel,
        load_ms = info.load_ms,
        "{}",
        if reused { "context created on weights already loaded" } else { "model loaded" }
    );
    stats.thread_id.store(current_thread_id(), Ordering::Relaxed);
    let mut worker = Worker::new(&config, &weights, ctx, info.clone(), stats);
    worker.restore_kv();
    if ready.send(Ok(info)).is_err() {
        return Ok(()); // nobody waits for us: the start was abandoned
    }
    worker.serve(&mut rx);
    Ok(())
}

/// This thread's Linux thread id, for reading its CPU time from /proc; 0 where there is none.
fn current_thread_id() -> u64 {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

struct Worker<'m> {
    config: EngineConfig,
    weights: &'m Weights,
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    /// Created on the first embedding request (see [`load::new_embedding_context`]).
    embd_ctx: Option<LlamaContext<'m>>,
    /// Scales requests get unless they say otherwise.
    lora_global: Scales,
    /// Scales set on the context now, and those of the group served last step.
    lora_applied: Scales,
    lora_last: Option<Scales>,
    embed_jobs: VecDeque<EmbedJob>,
    info: ModelInfo,
    stats: Arc<EngineStats>,
    slots: Vec<Slot>,
    queue: VecDeque<Job>,
    batch: LlamaBatch<'static>,
    plan: Vec<Chunk>,
    demands: Vec<(usize, SlotDemand)>,
    /// End-of-generation tokens, found on the first `ignore_eos` request.
    eog_tokens: Option<Vec<i32>>,
    /// Scratch buffers reused every token.
    piece: Vec<u8>,
    ranked: Vec<(f32, i32)>,
    candidates: Vec<LlamaTokenData>,
    decoded: String,
    text: String,
    clock: u64,
    shutting_down: bool,
    save_kv_on_exit: bool,
}

impl<'m> Worker<'m> {
    fn new(
        config: &EngineConfig,
        weights: &'m Weights,
        ctx: LlamaContext<'m>,
        info: ModelInfo,
        stats: Arc<EngineStats>,
    ) -> Self {
        let base: Scales = vec![0.0; config.lora.len()].into();
        let slots = (0..info.n_parallel)
            .map(|i| Slot { seq: i as i32, cached: Vec::new(), cached_lora: base.clone(), last_used: 0, active: None })
            .collect();
        Worker {
            config: config.clone(),
            weights,
            model: &weights.model,
            batch: LlamaBatch::new(info.n_ubatch as usize, 1),
            ctx,
            embd_ctx: None,
            embed_jobs: VecDeque::new(),
            lora_global: config.lora.iter().map(|l| l.scale).collect(),
            lora_applied: base,
            lora_last: None,
            info,
            stats,
            slots,
            queue: VecDeque::new(),
            plan: Vec::new(),
            demands: Vec::new(),
            eog_tokens: None,
            piece: Vec::with_capacity(64),
            ranked: Vec::new(),
            candidates: Vec::new(),
            decoded: String::with_capacity(64),
            text: String::with_capacity(64),
            clock: 0,
            shutting_down: false,
            save_kv_on_exit: false,
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
            // One embedding request per loop turn, between decode steps, so neither kind
            // starves the other.
            if let Some(job) = self.embed_jobs.pop_front() {
                self.run_embed_job(job);
            }
            self.place_waiting();
            self.step();
        }
        self.fail_all(EngineError::Stopped);
        if self.save_kv_on_exit {
            self.save_kv();
        }
    }

    fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.embed_jobs.is_empty() && self.slots.iter().all(|s| s.active.is_none())
    }

    fn handle(&mut self, cmd: EngineCommand) {
        match cmd {
            EngineCommand::Generate { request, events, permit } => match self.validate(&request) {
                Ok((tokens, grammar, lora)) => {
                    let n = tokens.len() as u32;
                    if events.send(Ok(StreamEvent::Accepted { prompt_tokens: n })).is_ok() {
                        self.queue.push_back(Job {
                            tokens,
                            request,
                            grammar,
                            lora,
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
            EngineCommand::Shutdown { save_kv } => {
                self.shutting_down = true;
                self.save_kv_on_exit = save_kv;
            }
            other => self.serve_query(other),
        }
    }

    /// Tokenizes and checks the request against the vocabulary and the slot's context, and
    /// compiles its grammar.
    fn validate(
        &self,
        request: &GenerateRequest,
    ) -> Result<(Vec<LlamaToken>, Option<LlamaSampler>, Scales), EngineError> {
        let tokens = self.prompt_tokens(&request.prompt)?;
        if tokens.len() >= self.info.n_ctx_slot as usize {
            return Err(EngineError::PromptTooLong { n_prompt: tokens.len(), n_ctx_slot: self.info.n_ctx_slot });
        }
        let n_vocab = self.info.n_vocab;
        if let Some(&(bad, _)) = request.sampling.logit_bias.iter().find(|&&(t, _)| t < 0 || t >= n_vocab) {
            return Err(EngineError::InvalidToken { token: bad, n_vocab });
        }
        let grammar = match &request.grammar {
            None => None,
            Some(g) => Some(
                LlamaSampler::grammar(self.model, g, "root").map_err(|e| EngineError::InvalidGrammar(e.to_string()))?,
            ),
        };
        let lora = self.request_scales(&request.lora)?;
        Ok((tokens, grammar, lora))
    }

    /// A prompt's tokens: text tokenized with special tokens parsed and BOS as the vocabulary
    /// wants; ids checked against the vocabulary. Never empty.
    fn prompt_tokens(&self, prompt: &Prompt) -> Result<Vec<LlamaToken>, EngineError> {
        let tokens: Vec<LlamaToken> = match prompt {
            // Checked before tokenizing: BOS alone would make an empty text a one-token prompt.
            Prompt::Text(text) if text.is_empty() => return Err(EngineError::EmptyPrompt),
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
    /// A request pinned to a slot (`id_slot`) waits for that slot without holding up the
    /// requests behind it; an unpinned one that finds no free slot ends the pass (FIFO).
    fn place_waiting(&mut self) {
        let mut i = 0;
        while i < self.queue.len() {
            let placement = {
                let job = &self.queue[i];
                let caches: Vec<SlotCache<'_, LlamaToken>> = self
                    .slots
                    .iter()
                    .enumerate()
                    .map(|(k, s)| SlotCache {
                        free: s.active.is_none() && job.request.slot.is_none_or(|want| want as usize == k),
                        // KV computed under other LoRA scales is no prefix for this request.
                        cached: if s.cached_lora == job.lora { &s.cached } else { &[] },
                        last_used: s.last_used,
                    })
                    .collect();
                scheduler::pick_slot(&job.tokens, &caches, KV_UNIFIED).map(|mut p| {
                    if !job.request.cache_prompt {
                        p.n_keep = 0;
                        p.copy_from = None;
                    }
                    p
                })
            };
            match placement {
                Some(p) => {
                    let job = self.queue.remove(i).expect("index is in the queue");
                    let n_keep = self.reuse_prefix(p, &job.tokens);
                    self.start(p.slot, job, n_keep);
                }
                None if self.queue[i].request.slot.is_some() => i += 1,
                None => break,
            }
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

    fn start(&mut self, slot: usize, mut job: Job, n_keep: usize) {
        if job.request.ignore_eos {
            let eog = self.eog_tokens.get_or_insert_with(|| {
                let vocab = self.model.vocab();
                (0..self.info.n_vocab).filter(|&t| vocab.is_eog(LlamaToken(t))).collect()
            });
            job.request.sampling.logit_bias.extend(eog.iter().map(|&t| (t, f32::NEG_INFINITY)));
        }
        let p = &job.request.sampling;
        let seed = p.seed.or(self.config.seed).unwrap_or_else(|| fastrand::u32(..));
        let penalties = p.penalties_sampler(self.info.n_vocab, &job.tokens);
        let grammar = job.grammar.take();
        // A grammar checks the chain's pick against the whole vocabulary (sample_with_grammar).
        let prefilter = grammar.is_none().then(|| Prefilter::of(p)).flatten();
        let sampler = p.build_chain(self.model, seed, penalties, prefilter.as_ref());
        let lora = job.lora.clone();
        self.slots[slot].cached_lora = lora.clone();
        self.clock += 1;
        self.stats.requests_total.fetch_add(1, Ordering::Relaxed);
        self.stats.prompt_tokens_cached_total.fetch_add(n_keep as u64, Ordering::Relaxed);
        self.stats.slots_busy.fetch_add(1, Ordering::Relaxed);
        let stop = StopMatcher::new(job.request.stop.clone());
        self.slots[slot].active = Some(Active {
            job,
            lora,
            sampler,
            prefilter,
            grammar,
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
        if !self.config.lora.is_empty() {
            if let Err(e) = self.select_lora_group() {
                self.plan.clear();
                self.plan.extend(self.demands.iter().map(|&(slot, _)| Chunk { slot, n_tokens: 0, logits: false }));
                self.fail_planned(e);
                return;
            }
        }
        scheduler::plan_step(&self.demands, self.info.n_ubatch as usize, &mut self.plan);
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
        self.stats.batch_sequences_total.fetch_add(self.plan.len() as u64, Ordering::Relaxed);
        self.commit_batch();
        let kv: usize = self.slots.iter().map(|s| s.cached.len()).sum();
        self.stats.kv_tokens.store(kv as u64, Ordering::Relaxed);
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
            // stay below n_ctx_slot; the plan stays within n_ubatch. Assert our own invariants
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
        let tok = match a.grammar.as_mut() {
            None => match &a.prefilter {
                Some(p) => sampling::sample_prefiltered(&self.ctx, i_batch, p, &mut a.sampler, &mut self.candidates),
                None => a.sampler.sample(&self.ctx, i_batch),
            },
            // No candidate left means the grammar is stuck; ending the generation is all that is left.
            Some(grammar) => sampling::sample_with_grammar(&self.ctx, i_batch, &mut a.sampler, grammar)
                .unwrap_or_else(|| self.model.vocab().eos()),
        };
        let probs = (a.job.request.n_probs > 0).then(|| {
            Box::new(token_probs(&self.ctx, i_batch, tok, a.job.request.n_probs, &mut self.ranked, self.model))
        });
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
            if a.job.events.send(Ok(StreamEvent::Token { text, id: tok.0, probs })).is_err() {
                self.release(slot_idx);
            }
            return;
        };
        let stop_word = a.stop.matched().map(str::to_string);
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
        let st = &self.stats;
        st.prompt_us_total.fetch_add((usage.prompt_ms * 1e3) as u64, Ordering::Relaxed);
        st.prompt_tokens_timed.fetch_add((usage.prompt_tokens - usage.cached_tokens) as u64, Ordering::Relaxed);
        st.generation_us_total.fetch_add((usage.generation_ms * 1e3) as u64, Ordering::Relaxed);
        st.generated_tokens_timed.fetch_add(usage.completion_tokens as u64, Ordering::Relaxed);
        // Free the slot (and the admission permit) before the client can hear that it is done,
        // so a client that follows up at once finds the slot free.
        self.release(slot_idx);
        let _ = events.send(Ok(StreamEvent::Token { text, id: tok.0, probs }));
        let _ = events.send(Ok(StreamEvent::Done { finish_reason, usage, stop_word, slot: slot_idx as u32 }));
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

/// Log-probabilities from the raw logits at `i_batch` (llama-server's default, and what OpenAI's
/// `logprobs` report): the chosen token's, and the `n` most likely. `ranked` is scratch space.
fn token_probs(
    ctx: &LlamaContext<'_>,
    i_batch: i32,
    chosen: LlamaToken,
    n: u32,
    ranked: &mut Vec<(f32, i32)>,
    model: &LlamaModel,
) -> TokenProbs {
    // i_batch requested logits (the caller just sampled at it).
    let logits = ctx.get_logits_ith(i_batch);
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    ranked.clear();
    ranked.extend(logits.iter().enumerate().map(|(i, &l)| (l, i as i32)));
    let n = (n as usize).min(ranked.len());
    let by_logit = |a: &(f32, i32), b: &(f32, i32)| b.0.total_cmp(&a.0);
    if n < ranked.len() {
        ranked.select_nth_unstable_by(n, by_logit);
    }
    ranked[..n].sort_unstable_by(by_logit);
    let vocab = model.vocab();
    let piece = |t: i32| vocab.token_to_piece(LlamaToken(t), false, None);
    TokenProbs {
        logprob: logits.get(chosen.0 as usize).map_or(f32::NEG_INFINITY, |&l| l - log_sum),
        bytes: piece(chosen.0),
        top: ranked[..n].iter().map(|&(l, t)| (t, piece(t), l - log_sum)).collect(),
    }
}
