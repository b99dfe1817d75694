//! What a model costs in memory once llama.cpp has it loaded and serving, computed from its GGUF
//! header before loading it. One formula for the model list's estimates and for the instance
//! budget, calibrated against this build of llama.cpp on the CPU (resident memory measured
//! after a load and a 600-token prompt; see `tests/memory.rs`):
//!
//! - weights: the tensor data (mapped from the file and all read once loaded), plus the copies
//!   llama.cpp makes of some quantized tensors in the CPU's preferred layout (≈ 5% of the
//!   tensor data for a Q4_K_M model), plus the vocabulary's tables (token texts, scores, the
//!   piece cache and the tokenizer's maps): ≈ 420 bytes per token measured;
//! - KV cache: every layer at the full context (paddock keeps full-size sliding-window layers),
//!   keys and values in f16, the context rounded up to llama.cpp's 256-cell padding; llama.cpp
//!   clears it at creation, so all of it is resident at once;
//! - compute: the logits buffer (one row of the vocabulary per slot), the activations of one
//!   micro-batch that a prompt touches, and ≈ 4 MiB of graph and scheduler state per context.
//!   llama.cpp reserves far more address space for its compute graph (for a micro-batch that
//!   outputs every token) but only touches what a batch uses, and the budget is about resident
//!   memory.
//!
//! Calibrated on one model (Gemma 3 270M Q4_K_M, a 262k vocabulary): the vocabulary and repack
//! terms are the least certain for other models; the KV term is exact.

use serde::Serialize;

/// The parts of a header the arithmetic needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    /// Bytes of tensor data over all parts.
    pub tensor_bytes: u64,
    /// Of those, the input layer's (`token_embd.*`): llama.cpp keeps it on the CPU wherever the
    /// other layers go.
    pub input_bytes: u64,
    /// Repeating layers (`block_count`).
    pub n_layer: u64,
    /// KV heads of each layer.
    pub n_head_kv: Vec<u64>,
    pub key_length: u64,
    pub value_length: u64,
    pub n_vocab: u64,
    pub n_embd: u64,
    pub n_ff: u64,
    pub n_head: u64,
    pub context_length: Option<u64>,
}

/// How an instance lays out its context.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Layout {
    /// Total context, all slots.
    pub n_ctx: u64,
    pub n_parallel: u64,
    /// Tokens per micro-batch.
    pub n_ubatch: u64,
    /// Repeating layers held by RPC workers: their weights and KV cells are not in this
    /// machine's memory.
    pub remote_layers: u64,
}

/// Bytes, by what holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Footprint {
    pub weights: u64,
    pub kv: u64,
    pub compute: u64,
}

impl Footprint {
    pub fn total(&self) -> u64 {
        self.weights + self.kv + self.compute
    }

    /// What the instance needs besides its weights (which instances may share).
    pub fn context(&self) -> u64 {
        self.kv + self.compute
    }
}

/// Measured resident bytes of the vocabulary's tables per token (see the module's notes).
const VOCAB_BYTES_PER_TOKEN: u64 = 420;
/// Share of the tensor data copied into the CPU's repacked layouts, as 1/N.
const REPACK_SHARE: u64 = 20;
/// Graph metadata and scheduler buffers of one context.
const CONTEXT_FIXED: u64 = 4 << 20;
/// llama.cpp pads the KV cache to this many cells.
const KV_PAD: u64 = 256;

pub fn footprint(shape: &Shape, layout: Layout) -> Footprint {
    let n_ctx = layout.n_ctx.div_ceil(KV_PAD) * KV_PAD;
    let per_cell: u64 = shape.n_head_kv.iter().map(|h| h * (shape.key_length + shape.value_length) * 2).sum();
    let logits = layout.n_parallel * shape.n_vocab * 4;
    // f32 activations of one micro-batch: the residual stream and its attention and norm
    // temporaries (≈ 8 rows of n_embd), the feed-forward's gate, up and product (3 of n_ff),
    // and the attention scores over up to 4k cells per head (flash attention tiles them).
    let per_token = 4 * (8 * shape.n_embd + 3 * shape.n_ff + shape.n_head * n_ctx.min(4096) / 8);
    // What stays here of the layered part (everything but the input layer), pro rata.
    let n_layer = shape.n_layer.max(1);
    let local = |bytes: u64| bytes / n_layer * (n_layer - layout.remote_layers.min(n_layer));
    let layered = local(shape.tensor_bytes.saturating_sub(shape.input_bytes));
    let tensors = shape.input_bytes.min(shape.tensor_bytes) + layered;
    Footprint {
        weights: tensors + tensors / REPACK_SHARE + shape.n_vocab * VOCAB_BYTES_PER_TOKEN,
        kv: local(n_ctx.saturating_mul(per_cell)),
        compute: CONTEXT_FIXED + logits + layout.n_ubatch * per_token,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gemma() -> Shape {
        Shape {
            tensor_bytes: 246_582_272,
            input_bytes: 178_257_920,
            n_layer: 18,
            n_head_kv: vec![1; 18],
            key_length: 256,
            value_length: 256,
            n_vocab: 262_144,
            n_embd: 640,
            n_ff: 2048,
            n_head: 4,
            context_length: Some(32768),
        }
    }

    #[test]
    fn kv_is_every_layer_at_the_padded_context_in_f16() {
        let f = footprint(&gemma(), Layout { n_ctx: 2048, n_parallel: 1, n_ubatch: 512, remote_layers: 0 });
        assert_eq!(f.kv, 36 << 20);
        // 2000 cells are padded to 2048.
        assert_eq!(footprint(&gemma(), Layout { n_ctx: 2000, n_parallel: 1, n_ubatch: 512, remote_layers: 0 }).kv, 36 << 20);
    }

    #[test]
    fn layers_on_rpc_workers_leave_only_the_input_layer_and_the_rest_here() {
        let layout = Layout { n_ctx: 2048, n_parallel: 1, n_ubatch: 512, remote_layers: 0 };
        let here = footprint(&gemma(), layout);
        let all_remote = footprint(&gemma(), Layout { remote_layers: u32::MAX as u64, ..layout });
        let input = 178_257_920;
        assert_eq!(all_remote.weights, input + input / 20 + 262_144 * 420);
        assert_eq!(all_remote.kv, 0);
        assert_eq!(all_remote.compute, here.compute, "the compute buffers stay here");
        let half = footprint(&gemma(), Layout { remote_layers: 9, ..layout });
        assert_eq!(half.kv, here.kv / 2);
        assert!(half.weights > all_remote.weights && half.weights < here.weights);
    }

    #[test]
    fn slots_add_logits_rows_and_weights_do_not_depend_on_the_layout() {
        let one = footprint(&gemma(), Layout { n_ctx: 4096, n_parallel: 1, n_ubatch: 512, remote_layers: 0 });
        let eight = footprint(&gemma(), Layout { n_ctx: 4096, n_parallel: 8, n_ubatch: 512, remote_layers: 0 });
        assert_eq!(eight.compute - one.compute, 7 * 262_144 * 4);
        assert_eq!(one.weights, eight.weights);
        assert_eq!(one.total(), one.weights + one.context());
    }
}
