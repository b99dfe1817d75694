//! Criterion benches of the engine's per-token pure work: these run once per generated token
//! (or per step), so a regression here shows directly in tokens per second.

use axum::response::IntoResponse;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;
use paddock::api::oai_output::{self, Kind, Output};
use paddock::engine::sampling::Prefilter;
use paddock::engine::scheduler::{pick_slot, plan_step, SlotCache, SlotDemand};
use paddock::engine::text::{StopMatcher, Utf8Assembler};
use paddock::engine::SamplingParams;
use paddock::engine::{FinishReason, Generation, StreamEvent, Usage};

fn text(c: &mut Criterion) {
    // Pieces as a vocabulary produces them: mostly short words, some split multi-byte characters.
    let sample = "The quick brown fox — jumps over the lazy dog; 東京は日本の首都です。 😀 ".repeat(8);
    let bytes = sample.as_bytes();
    let pieces: Vec<&[u8]> = bytes.chunks(3).collect();

    c.bench_function("utf8_assembler_per_piece", |b| {
        let mut asm = Utf8Assembler::default();
        let mut out = String::with_capacity(64);
        b.iter(|| {
            for p in &pieces {
                out.clear();
                asm.push(black_box(p), &mut out);
            }
        })
    });

    let words: Vec<String> = sample.split_inclusive(' ').map(String::from).collect();
    c.bench_function("stop_matcher_per_piece_4_stops", |b| {
        let mut out = String::with_capacity(64);
        b.iter(|| {
            let mut m = StopMatcher::new(vec!["\n\nUser:".into(), "</s>".into(), "###".into(), "<|im_end|>".into()]);
            for w in &words {
                out.clear();
                m.push(black_box(w), &mut out);
            }
        })
    });
}

fn scheduler(c: &mut Criterion) {
    let demands: Vec<(usize, SlotDemand)> = (0..8)
        .map(|i| (i, if i % 3 == 0 { SlotDemand::Prefill { remaining: 700 } } else { SlotDemand::Generate }))
        .collect();
    c.bench_function("plan_step_8_slots", |b| {
        let mut plan = Vec::with_capacity(8);
        b.iter(|| plan_step(black_box(&demands), 2048, &mut plan))
    });

    let caches: Vec<Vec<i32>> =
        (0..8).map(|i| (0..2000).map(|t| if t < 300 * i { t } else { t + 7 }).collect()).collect();
    let prompt: Vec<i32> = (0..2000).collect();
    c.bench_function("pick_slot_8_slots_2k_tokens", |b| {
        b.iter(|| {
            let slots: Vec<SlotCache<'_, i32>> = caches
                .iter()
                .enumerate()
                .map(|(i, c)| SlotCache { free: i % 2 == 0, cached: c, last_used: i as u64 })
                .collect();
            pick_slot(black_box(&prompt), &slots, true)
        })
    });
}

/// Gemma 3's vocabulary: every sampling step starts from this many candidates.
const N_VOCAB: usize = 262_144;

fn sampling(c: &mut Criterion) {
    // Logits shaped like a model's: mostly low noise, a few dozen plausible tokens.
    let mut rng = fastrand::Rng::with_seed(1);
    let logits: Vec<f32> =
        (0..N_VOCAB).map(|i| if i % 9973 == 0 { 8.0 + rng.f32() * 4.0 } else { rng.f32() * 6.0 - 3.0 }).collect();
    // What llama_sampler_sample does per slot and step: build the candidate array from the
    // logits, run the chain, read the selection.
    let step = |chain: &mut LlamaSampler| {
        let mut candidates = LlamaTokenDataArray::from_iter(
            logits.iter().enumerate().map(|(i, &l)| LlamaTokenData::new(LlamaToken(i as i32), l, 0.0)),
            false,
        );
        chain.apply(&mut candidates);
        candidates.selected_token()
    };
    // llama-server's (and paddock's) default chain for temperature 0.8.
    let default_chain = || {
        LlamaSampler::chain(
            [
                LlamaSampler::top_k(40),
                LlamaSampler::top_p(0.95, 1),
                LlamaSampler::min_p(0.05, 1),
                LlamaSampler::temp(0.8),
                LlamaSampler::dist(1),
            ],
            true,
        )
    };
    c.bench_function("sample_262k_vocab_default_chain", |b| {
        let mut chain = default_chain();
        b.iter(|| step(black_box(&mut chain)))
    });
    // The same chain from the 40 largest logits, found by paddock's prefilter (what the worker
    // does for every request whose chain allows it).
    c.bench_function("sample_262k_vocab_default_chain_prefiltered", |b| {
        let prefilter = Prefilter::of(&SamplingParams::default()).unwrap();
        let mut chain = default_chain();
        let mut scratch = Vec::new();
        b.iter(|| {
            prefilter.candidates(black_box(&logits), &mut scratch);
            let mut candidates = LlamaTokenDataArray::new(std::mem::take(&mut scratch), true);
            chain.apply(&mut candidates);
            let tok = candidates.selected_token();
            scratch = candidates.data;
            tok
        })
    });
    c.bench_function("sample_262k_vocab_greedy", |b| {
        let mut chain = LlamaSampler::chain([LlamaSampler::greedy()], true);
        b.iter(|| step(black_box(&mut chain)))
    });
}

fn sse(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let pieces: Vec<String> =
        " the quick brown fox jumps over the lazy dog".split_inclusive(' ').map(String::from).collect();
    let usage =
        Usage { prompt_tokens: 128, completion_tokens: 64, cached_tokens: 0, prompt_ms: 40.0, generation_ms: 900.0 };
    // One streamed completion of 64 tokens with usage: every chunk's JSON and SSE framing.
    c.bench_function("sse_completion_stream_64_tokens", |b| {
        b.iter(|| {
            let (tx, generation) = Generation::fed(128);
            for i in 0..64 {
                let text = pieces[i % pieces.len()].clone();
                let _ = tx.send(Ok(StreamEvent::Token { text, id: i as i32, probs: None }));
            }
            let done = StreamEvent::Done { finish_reason: FinishReason::Length, usage, stop_word: None, slot: 0 };
            let _ = tx.send(Ok(done));
            // As the engine does after Done: the stream ends when the channel closes.
            drop(tx);
            let mut output = Output::new("gemma".into(), Kind::Completion);
            output.include_usage = true;
            // Inside the runtime: the SSE keep-alive arms a timer when the response is built.
            runtime.block_on(async {
                let body = oai_output::stream(vec![generation], output).into_response().into_body();
                axum::body::to_bytes(body, usize::MAX).await.unwrap()
            })
        })
    });
}

criterion_group!(benches, text, scheduler, sampling, sse);
criterion_main!(benches);
