//! The engine's answers besides generation: tokenizing, slot views and saved slot state,
//! embeddings. All run on the engine thread between decode steps, since the vocabulary and the
//! contexts live there.

use std::path::Path;
use std::time::Instant;

use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::load::{new_embedding_context, EMBD_SEQUENCES};
use super::Worker;
use crate::engine::{
    Embeddings, EngineCommand, EngineError, Prompt, SlotAction, SlotActionReport, SlotView, TokenPiece,
};

/// An admitted embedding request.
pub(super) struct EmbedJob {
    inputs: Vec<Prompt>,
    reply: oneshot::Sender<Result<Embeddings, EngineError>>,
    _permit: OwnedSemaphorePermit,
}

impl Worker<'_> {
    pub(super) fn serve_query(&mut self, command: EngineCommand) {
        match command {
            EngineCommand::Tokenize { text, add_special, parse_special, reply } => {
                let vocab = self.model.vocab();
                let pieces = vocab
                    .tokenize(text.as_bytes(), add_special, parse_special)
                    .into_iter()
                    .map(|t| TokenPiece { id: t.0, piece: vocab.token_to_piece(t, true, None) })
                    .collect();
                let _ = reply.send(pieces);
            }
            EngineCommand::Detokenize { tokens, reply } => {
                let tokens: Vec<LlamaToken> = tokens.into_iter().map(LlamaToken).collect();
                let bytes = self.model.vocab().detokenize(&tokens, false, true);
                let _ = reply.send(String::from_utf8_lossy(&bytes).into_owned());
            }
            EngineCommand::Slots(reply) => {
                let _ = reply.send(self.slot_views());
            }
            EngineCommand::Slot { slot, action, reply } => {
                let _ = reply.send(self.slot_action(slot as usize, action));
            }
            EngineCommand::Lora { set, reply } => {
                let _ = reply.send(self.lora_command(set));
            }
            EngineCommand::Embed { inputs, reply, permit } => {
                self.embed_jobs.push_back(EmbedJob { inputs, reply, _permit: permit });
            }
            EngineCommand::Generate { .. } | EngineCommand::Ping(_) | EngineCommand::Shutdown { .. } => {
                unreachable!("handled by Worker::handle")
            }
        }
    }

    fn slot_views(&self) -> Vec<SlotView> {
        let vocab = self.model.vocab();
        let text = |tokens: &[LlamaToken]| String::from_utf8_lossy(&vocab.detokenize(tokens, false, true)).into_owned();
        self.slots
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                let active = slot.active.as_ref();
                SlotView {
                    id: i as u32,
                    n_ctx: self.info.n_ctx_slot,
                    is_processing: active.is_some(),
                    n_cached: slot.cached.len() as u32,
                    n_prompt_tokens: active.map_or(0, |a| a.job.tokens.len() as u32),
                    n_decoded: active.map_or(0, |a| a.n_generated),
                    n_remain: active
                        .and_then(|a| a.job.request.max_tokens.map(|m| m as i64 - a.n_generated as i64))
                        .unwrap_or(-1),
                    prompt: text(active.map_or(&slot.cached[..], |a| &a.job.tokens[..])),
                    sampling: active.map(|a| a.job.request.sampling.clone()),
                    stop: active.map(|a| a.job.request.stop.clone()).unwrap_or_default(),
                }
            })
            .collect()
    }

    fn slot_action(&mut self, slot: usize, action: SlotAction) -> Result<SlotActionReport, EngineError> {
        if self.slots[slot].active.is_some() {
            return Err(EngineError::SlotBusy(slot as u32));
        }
        let started = Instant::now();
        let seq = self.slots[slot].seq;
        let (n_tokens, n_bytes) = match action {
            SlotAction::Save(path) => {
                // Written beside the target and renamed, so a crash never leaves half a file
                // under the name a restore would read.
                let tmp = path.with_extension(format!("tmp-{}", fastrand::u32(..)));
                let cached = &self.slots[slot].cached;
                let result = self.ctx.state_seq_save_file(&tmp, seq, cached);
                let saved = result
                    .map_err(|e| e.to_string())
                    .and_then(|n| std::fs::rename(&tmp, &path).map(|()| n).map_err(|e| e.to_string()));
                if let Err(e) = saved {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(EngineError::SlotFile(format!("could not save slot {slot}: {e}")));
                }
                (cached.len(), file_len(&path))
            }
            SlotAction::Restore(path) => {
                if !path.is_file() {
                    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    return Err(EngineError::SlotFile(format!("no saved slot state named '{name}'")));
                }
                self.clear_slot(slot);
                let max = self.info.n_ctx_slot as usize - 1;
                match self.ctx.state_seq_load_file(&path, seq, max) {
                    Ok((tokens, n_read)) => {
                        self.slots[slot].cached = tokens;
                        (self.slots[slot].cached.len(), n_read as u64)
                    }
                    Err(e) => {
                        // Part of the state may have been written: leave the slot empty.
                        self.clear_slot(slot);
                        return Err(EngineError::SlotFile(format!(
                            "could not restore slot {slot}: {e} (was the file saved by this model with the same context size?)"
                        )));
                    }
                }
            }
            SlotAction::Erase => {
                let n = self.slots[slot].cached.len();
                self.clear_slot(slot);
                (n, 0)
            }
        };
        Ok(SlotActionReport { n_tokens: n_tokens as u32, n_bytes, ms: started.elapsed().as_secs_f64() * 1e3 })
    }

    pub(super) fn run_embed_job(&mut self, job: EmbedJob) {
        if job.reply.is_closed() {
            return; // the client went away while it waited
        }
        let result = self.embed(&job.inputs);
        let _ = job.reply.send(result);
    }

    fn embed(&mut self, inputs: &[Prompt]) -> Result<Embeddings, EngineError> {
        let max = self.info.n_embd_input;
        let mut all = Vec::with_capacity(inputs.len());
        for (index, input) in inputs.iter().enumerate() {
            let tokens = self.prompt_tokens(input)?;
            if tokens.len() > max as usize {
                return Err(EngineError::EmbeddingInputTooLong { index, n_tokens: tokens.len(), max });
            }
            all.push(tokens);
        }
        if self.embd_ctx.is_none() {
            self.embd_ctx = Some(new_embedding_context(&self.config, self.weights, max)?);
        }
        let ctx = self.embd_ctx.as_mut().expect("created above");
        let mut batch = LlamaBatch::new(max as usize, 1);
        let mut vectors = Vec::with_capacity(all.len());
        let mut next = 0;
        while next < all.len() {
            // Pack whole inputs, one sequence each, within the batch and sequence limits.
            batch.clear();
            let first = next;
            while next < all.len()
                && next - first < EMBD_SEQUENCES as usize
                && batch.n_tokens() as usize + all[next].len() <= max as usize
            {
                let seq = (next - first) as i32;
                batch.add_sequence(&all[next], seq, true).map_err(|e| EngineError::Decode(e.to_string()))?;
                next += 1;
            }
            let decoded = ctx.decode(&mut batch).map_err(|e| EngineError::Decode(e.to_string()));
            let pooled = decoded.and_then(|()| {
                (0..(next - first) as i32)
                    .map(|seq| {
                        ctx.embeddings_seq_ith(seq)
                            .map(<[f32]>::to_vec)
                            .map_err(|e| EngineError::Decode(format!("no pooled embedding: {e}")))
                    })
                    .collect::<Result<Vec<_>, _>>()
            });
            ctx.clear_kv_cache();
            vectors.extend(pooled?);
        }
        let prompt_tokens = all.iter().map(Vec::len).sum::<usize>() as u32;
        self.stats.prompt_tokens_total.fetch_add(prompt_tokens as u64, std::sync::atomic::Ordering::Relaxed);
        self.stats.mark_active();
        Ok(Embeddings { vectors, prompt_tokens })
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}
