//! Cached prompts that survive a stop: each slot's KV state saved at shutdown (when the
//! instance is parked or idles out) and restored at the next start, so a returning conversation
//! decodes only its new part.
//!
//! Layout of `kv_dir`: `slot-N.bin` (llama.cpp's per-sequence state with its tokens) and
//! `state.json` naming the slots and the shape they were saved under. `state.json` is written
//! last and removed first, so a crash mid-save leaves nothing that would be restored; and a
//! state is restored only into the same model file, context shape and LoRA set, because
//! llama.cpp refuses (or worse, misreads) state from another shape.

use std::path::{Path, PathBuf};
use std::time::{Instant, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{Worker, KV_UNIFIED};
use crate::models::download::write_atomically;

const STATE_FILE: &str = "state.json";
/// Shorter prompts are cheaper to recompute than to save and read back.
const MIN_TOKENS: usize = 16;

#[derive(Serialize, Deserialize)]
struct SavedState {
    shape: String,
    slots: Vec<usize>,
}

impl Worker<'_> {
    /// What a saved state must match to be restored here.
    fn kv_shape(&self) -> String {
        let meta = std::fs::metadata(&self.config.model_path).ok();
        let modified = meta
            .as_ref()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let lora: Vec<String> = self.config.lora.iter().map(|l| l.path.display().to_string()).collect();
        format!(
            "{}|{}|{modified}|ctx={}|slots={}|unified={KV_UNIFIED}|gpu_layers={}|lora={}",
            self.weights.key.path.display(),
            meta.map_or(0, |m| m.len()),
            self.info.n_ctx,
            self.info.n_parallel,
            self.config.n_gpu_layers,
            lora.join(",")
        )
    }

    pub(super) fn save_kv(&mut self) {
        let Some(dir) = self.config.kv_dir.clone() else { return };
        let started = Instant::now();
        match self.write_kv(&dir) {
            Ok((0, _)) => {}
            Ok((n_slots, n_tokens)) => tracing::info!(
                n_slots,
                n_tokens,
                ms = started.elapsed().as_millis() as u64,
                "saved the slots' cached prompts for the next start"
            ),
            Err(e) => {
                tracing::warn!("could not save the slots' cached prompts: {e}");
                let _ = std::fs::remove_file(dir.join(STATE_FILE));
            }
        }
    }

    fn write_kv(&mut self, dir: &Path) -> Result<(usize, usize), String> {
        let _ = std::fs::remove_file(dir.join(STATE_FILE));
        let wanted: Vec<usize> = (0..self.slots.len()).filter(|&i| self.slots[i].cached.len() >= MIN_TOKENS).collect();
        clear_dir(dir);
        if wanted.is_empty() {
            return Ok((0, 0));
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let mut n_tokens = 0;
        for &i in &wanted {
            let slot = &self.slots[i];
            let path = slot_file(dir, i);
            self.ctx.state_seq_save_file(&path, slot.seq, &slot.cached).map_err(|e| format!("slot {i}: {e}"))?;
            n_tokens += slot.cached.len();
        }
        let state = SavedState { shape: self.kv_shape(), slots: wanted.clone() };
        let json = serde_json::to_vec(&state).map_err(|e| e.to_string())?;
        write_atomically(&dir.join(STATE_FILE), &json).map_err(|e| format!("cannot write {STATE_FILE}: {e}"))?;
        Ok((wanted.len(), n_tokens))
    }

    /// Restores what [`Worker::save_kv`] saved, then removes it: from here on the state lives
    /// in the context again, and a later park saves it anew.
    pub(super) fn restore_kv(&mut self) {
        let Some(dir) = self.config.kv_dir.clone() else { return };
        let Ok(bytes) = std::fs::read(dir.join(STATE_FILE)) else {
            clear_dir(&dir);
            return;
        };
        let started = Instant::now();
        let state: Option<SavedState> = serde_json::from_slice(&bytes).ok();
        let shape = self.kv_shape();
        match state {
            Some(state) if state.shape == shape => {
                let (mut n_slots, mut n_tokens) = (0, 0);
                let max = self.info.n_ctx_slot as usize - 1;
                let n = self.slots.len();
                for i in state.slots.into_iter().filter(|&i| i < n) {
                    let seq = self.slots[i].seq;
                    match self.ctx.state_seq_load_file(slot_file(&dir, i), seq, max) {
                        Ok((tokens, _)) => {
                            n_tokens += tokens.len();
                            n_slots += 1;
                            self.slots[i].cached = tokens;
                        }
                        Err(e) => {
                            tracing::warn!(slot = i, "could not restore the slot's saved prompt: {e}");
                            self.clear_slot(i);
                        }
                    }
                }
                tracing::info!(
                    n_slots,
                    n_tokens,
                    ms = started.elapsed().as_millis() as u64,
                    "restored the slots' cached prompts"
                );
            }
            _ => tracing::info!("saved prompts were made with another model or context shape; discarded"),
        }
        clear_dir(&dir);
    }
}

fn slot_file(dir: &Path, slot: usize) -> PathBuf {
    dir.join(format!("slot-{slot}.bin"))
}

/// Removes the files this module writes (and nothing else a user may have put there).
fn clear_dir(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("slot-") || name.starts_with(STATE_FILE) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
