//! Loading: the model, the generation context, and (on first use) the embedding context.

use std::num::NonZeroU32;

use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::token::LlamaToken;

use super::super::weights::Weights;
use super::super::{backend, EngineConfig, EngineError, ModelInfo, DEFAULT_CTX_PER_SLOT};
use super::KV_UNIFIED;

/// Below this a slot cannot hold a useful conversation; refuse the configuration.
const MIN_CTX_PER_SLOT: u32 = 16;
/// llama.cpp's limit on sequences in one context.
pub(super) const MAX_SEQUENCES: u32 = 256;
/// Largest embedding input, llama-server's default micro-batch. llama.cpp pools each
/// micro-batch on its own, so an input must fit one; and an embedding context outputs every
/// token, so its logits buffer is n_vocab × this (512 MiB for Gemma 3's 262k vocabulary).
const EMBD_MAX_INPUT: u32 = 512;
/// Inputs decoded together in one embedding batch (one sequence each).
pub(super) const EMBD_SEQUENCES: u32 = 8;

pub(super) fn new_context<'m>(config: &EngineConfig, weights: &'m Weights) -> Result<LlamaContext<'m>, EngineError> {
    let model = &weights.model;
    if config.n_parallel == 0 || config.n_parallel > MAX_SEQUENCES {
        return Err(EngineError::Config(format!(
            "parallel must be between 1 and {MAX_SEQUENCES}, got {}",
            config.n_parallel
        )));
    }
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
    // llama.cpp caps the physical batch at the logical one; so does paddock, before checking it.
    let n_ubatch = config.n_ubatch.min(config.n_batch);
    if n_ubatch < config.n_parallel {
        return Err(EngineError::Config(format!(
            "batch_size {} / ubatch_size {} is smaller than parallel {}: every generating slot needs a place in each step",
            config.n_batch, config.n_ubatch, config.n_parallel
        )));
    }
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(config.n_batch)
        .with_n_ubatch(n_ubatch)
        .with_n_seq_max(config.n_parallel)
        .with_n_threads(config.n_threads)
        .with_n_threads_batch(config.n_threads_batch)
        .with_flash_attention_policy(config.flash_attn)
        .with_kv_unified(KV_UNIFIED)
        // Sliding-window layers keep every position (the crate's default, unlike llama-server's):
        // with only the window kept, cutting a cached prefix back could leave positions the next
        // token attends to missing from those layers, and prefix reuse would have to detect it.
        .with_swa_full(true);
    let backend = backend()?;
    let _serialized = weights.context_lock.lock();
    // llama.cpp enumerates ggml's device list while creating a context.
    let _devices = super::super::rpc::devices_read();
    model.new_context(backend, params).map_err(|e| EngineError::Config(format!("cannot create context: {e}")))
}

pub(super) fn model_info(config: &EngineConfig, weights: &Weights, ctx: &LlamaContext<'_>, reused: bool) -> ModelInfo {
    let model = &weights.model;
    let vocab = model.vocab();
    let piece = |t: LlamaToken| String::from_utf8_lossy(&vocab.token_to_piece(t, true, None)).into_owned();
    let n_ctx = ctx.n_ctx();
    ModelInfo {
        n_ctx,
        n_ctx_slot: n_ctx / config.n_parallel,
        n_ctx_train: model.n_ctx_train(),
        n_parallel: config.n_parallel,
        n_batch: ctx.n_batch(),
        n_ubatch: ctx.n_ubatch(),
        n_vocab: model.n_vocab(),
        n_params: model.n_params(),
        size_bytes: model.size(),
        architecture: model.meta_val_str("general.architecture").ok(),
        description: model.meta_val_str("general.name").ok(),
        chat_template: model.chat_template(None).ok().and_then(|t| t.to_string().ok()),
        bos_token: piece(vocab.bos()),
        eos_token: piece(vocab.eos()),
        add_bos: vocab.should_add_bos(),
        bos_id: vocab.bos().0,
        fim: {
            let ids = [vocab.fim_pre().0, vocab.fim_suf().0, vocab.fim_mid().0];
            ids.iter().all(|&t| t >= 0 && t < model.n_vocab()).then_some(ids)
        },
        n_embd: model.n_embd(),
        embeddings: config.embeddings,
        n_embd_input: EMBD_MAX_INPUT.min(n_ctx / config.n_parallel),
        model_path: config.model_path.display().to_string(),
        load_ms: if reused { 0 } else { weights.load_ms },
        placement: weights.placement.clone(),
        weights_reused: reused,
    }
}

/// The context embeddings are computed in: its own KV (cleared after every batch), every token
/// an output, pooled per sequence. The model's own pooling when its GGUF names one (embedding
/// models), else mean pooling (a causal LM used for embeddings, as llama-server does).
pub(super) fn new_embedding_context<'m>(
    config: &EngineConfig,
    weights: &'m Weights,
    n_input: u32,
) -> Result<LlamaContext<'m>, EngineError> {
    let model = &weights.model;
    let arch = model.meta_val_str("general.architecture").unwrap_or_default();
    let own = model.meta_val_str(&format!("{arch}.pooling_type")).ok().and_then(|v| v.parse::<i32>().ok());
    let pooling = match own {
        Some(p) if p > 0 => LlamaPoolingType::Unspecified,
        _ => LlamaPoolingType::Mean,
    };
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_input))
        .with_n_batch(n_input)
        .with_n_ubatch(n_input)
        .with_n_seq_max(EMBD_SEQUENCES)
        .with_n_threads(config.n_threads)
        .with_n_threads_batch(config.n_threads_batch)
        .with_flash_attention_policy(config.flash_attn)
        .with_kv_unified(true)
        .with_embeddings(true)
        .with_pooling_type(pooling);
    let _serialized = weights.context_lock.lock();
    let _devices = super::super::rpc::devices_read();
    model
        .new_context(backend()?, params)
        .map_err(|e| EngineError::Config(format!("cannot create the embedding context: {e}")))
}
