//! LoRA adapters: loaded with the model, applied per decode step.
//!
//! llama.cpp applies adapters to a whole context, not per sequence, so requests with different
//! scales cannot share a decode step: each step serves one group of requests with equal scales,
//! alternating between groups. A slot's cached prefix is only reused by a request with the same
//! scales, since its KV was computed under them. `llama-cpp-2` sets one adapter at a time (its
//! adapter pointers are private and its setter replaces the whole set), so a request may give at
//! most one adapter a non-zero scale.

use std::sync::Arc;

use super::Worker;
use crate::engine::{EngineError, LoraSpec};

/// Scales by adapter id; all zero = the base model.
pub(super) type Scales = Arc<[f32]>;

/// Scales that llama-cpp-2 can apply: finite, within a sane range, at most one non-zero.
fn check(scales: &[f32]) -> Result<(), EngineError> {
    if let Some(bad) = scales.iter().find(|s| !s.is_finite() || s.abs() > 100.0) {
        return Err(EngineError::InvalidLora(format!("a LoRA scale must be between -100 and 100, got {bad}")));
    }
    if scales.iter().filter(|&&s| s != 0.0).count() > 1 {
        return Err(EngineError::InvalidLora(
            "paddock applies one LoRA adapter at a time: give at most one adapter a non-zero scale".into(),
        ));
    }
    Ok(())
}

impl Worker<'_> {
    /// The scales a request runs with: the instance's, overridden by the request's.
    pub(super) fn request_scales(&self, overrides: &[(u32, f32)]) -> Result<Scales, EngineError> {
        if overrides.is_empty() {
            return Ok(self.lora_global.clone());
        }
        let mut scales = self.lora_global.to_vec();
        for &(id, scale) in overrides {
            let slot = scales.get_mut(id as usize).ok_or_else(|| {
                EngineError::InvalidLora(format!(
                    "no LoRA adapter with id {id}; the instance has {}",
                    self.config.lora.len()
                ))
            })?;
            *slot = scale;
        }
        check(&scales)?;
        Ok(scales.into())
    }

    pub(super) fn lora_command(&mut self, set: Option<Vec<(u32, f32)>>) -> Result<Vec<LoraSpec>, EngineError> {
        if let Some(set) = set {
            self.lora_global = self.request_scales(&set)?;
        }
        Ok(self
            .config
            .lora
            .iter()
            .zip(self.lora_global.iter())
            .map(|(spec, &scale)| LoraSpec { path: spec.path.clone(), scale })
            .collect())
    }

    /// Keeps only the demands of one group of equal scales in `self.demands` (oldest first),
    /// and sets those scales on the context. With several groups waiting, the group served last
    /// step goes after the others, so groups alternate.
    pub(super) fn select_lora_group(&mut self) -> Result<(), EngineError> {
        let scales_of = |slot: usize| self.slots[slot].active.as_ref().map(|a| a.lora.clone());
        let mut chosen: Option<Scales> = None;
        for &(slot, _) in &self.demands {
            let Some(scales) = scales_of(slot) else { continue };
            let served_last = self.lora_last.as_ref() == Some(&scales);
            match &chosen {
                None => chosen = Some(scales),
                Some(c) if self.lora_last.as_ref() == Some(c) && !served_last => chosen = Some(scales),
                Some(_) => {}
            }
        }
        let Some(chosen) = chosen else { return Ok(()) };
        self.demands.retain(|&(slot, _)| scales_of(slot).as_ref() == Some(&chosen));
        if chosen != self.lora_applied {
            let mut adapters = self.weights.adapters.lock();
            let result = match chosen.iter().position(|&s| s != 0.0) {
                Some(k) => self.ctx.lora_adapter_set(&mut adapters[k], chosen[k]).map_err(|e| e.to_string()),
                None => self.ctx.lora_adapter_remove(&mut adapters[0]).map_err(|e| e.to_string()),
            };
            drop(adapters);
            result.map_err(|e| EngineError::Decode(format!("could not set LoRA adapters: {e}")))?;
            self.lora_applied = chosen.clone();
        }
        self.lora_last = Some(chosen);
        Ok(())
    }
}
