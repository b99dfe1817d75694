//! Criterion benches of the engine's per-token pure work: these run once per generated token
//! (or per step), so a regression here shows directly in tokens per second.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use paddock::engine::scheduler::{pick_slot, plan_step, SlotCache, SlotDemand};
use paddock::engine::text::{StopMatcher, Utf8Assembler};

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

criterion_group!(benches, text, scheduler);
criterion_main!(benches);
