//! The scheduler: pure decisions, no FFI.
//!
//! The worker asks two questions of it, and executes the answers:
//! - [`pick_slot`]: which free slot a new request takes, and which cached prefix it reuses
//!   (its own, or another slot's through a KV copy).
//! - [`plan_step`]: what goes into the next `llama_batch` — one token for every generating slot,
//!   then prompt chunks of prefilling slots in admission order, up to `n_ubatch` tokens.
//!
//! A step is one physical batch (`n_ubatch`), not the logical `n_batch`: llama.cpp would split a
//! larger batch into physical ones and compute them in turn anyway, but tokens could only be
//! sampled after the last of them. Planned step by step, prompts that arrived together get their
//! first tokens one step after another (the oldest first) instead of all after the slowest.
//! On a CPU the aggregate throughput stays level; what moves is when each stream waits, since a
//! newer prompt's step now lands between two tokens of the older streams. (Multi-GPU pipeline
//! parallelism, which overlaps the physical batches of one call, is what this gives up.)
//!
//! Keeping these pure makes them unit-testable like TGI's queue tests and benchable on their own.

/// What one busy slot needs from the next decode step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotDemand {
    /// Has sampled a token that must be decoded to get the next logits.
    Generate,
    /// Still has `remaining` prompt tokens to decode.
    Prefill { remaining: usize },
}

/// One slot's share of a decode step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Slot index (also its llama.cpp sequence id).
    pub slot: usize,
    /// How many tokens of this slot go into the batch.
    pub n_tokens: usize,
    /// Whether the last of them needs logits (a generating token, or a prompt's final token).
    pub logits: bool,
}

/// Fills `plan` for one decode step. `demands` lists busy slots in admission order (oldest first),
/// so an older prompt finishes prefilling before a newer one starts taking batch space.
///
/// Generating slots come first and always fit: `n_ubatch` is at least the number of slots
/// (checked when the engine starts), so decoding never starves behind a long prompt.
pub fn plan_step(demands: &[(usize, SlotDemand)], n_ubatch: usize, plan: &mut Vec<Chunk>) {
    plan.clear();
    let mut budget = n_ubatch;
    for &(slot, demand) in demands {
        if demand == SlotDemand::Generate && budget > 0 {
            plan.push(Chunk { slot, n_tokens: 1, logits: true });
            budget -= 1;
        }
    }
    for &(slot, demand) in demands {
        if budget == 0 {
            break;
        }
        if let SlotDemand::Prefill { remaining } = demand {
            if remaining == 0 {
                continue;
            }
            let n = remaining.min(budget);
            plan.push(Chunk { slot, n_tokens: n, logits: n == remaining });
            budget -= n;
        }
    }
}

/// A slot as [`pick_slot`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct SlotCache<'a, T> {
    pub free: bool,
    /// Tokens whose KV is in this slot's sequence.
    pub cached: &'a [T],
    /// When the slot was last released (higher = more recent); used to keep warm caches.
    pub last_used: u64,
}

/// Where a new request goes and what it reuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub slot: usize,
    /// Tokens of the prompt already in `slot`'s KV after the reuse (the rest must be decoded).
    pub n_keep: usize,
    /// Copy the first `n_keep` positions from this other slot's sequence first.
    pub copy_from: Option<usize>,
}

pub fn common_prefix<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Chooses a free slot for `prompt`: the one whose cache shares the longest prefix with it, and
/// among equals the least recently used (so warm caches of other conversations survive).
/// With `allow_copy` (a unified KV cache, where copying a sequence is metadata-only), a longer
/// prefix held by any other slot, busy or free, is copied over.
///
/// At least one prompt token is always left to decode, because the step that decodes it is what
/// produces the logits for the first generated token.
pub fn pick_slot<T: PartialEq>(prompt: &[T], slots: &[SlotCache<'_, T>], allow_copy: bool) -> Option<Placement> {
    let max_keep = prompt.len().saturating_sub(1);
    let (slot, own) = slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.free)
        .map(|(i, s)| (i, common_prefix(s.cached, prompt).min(max_keep), s.last_used))
        .max_by(|a, b| a.1.cmp(&b.1).then(b.2.cmp(&a.2)))
        .map(|(i, lcp, _)| (i, lcp))?;
    let mut placement = Placement { slot, n_keep: own, copy_from: None };
    if allow_copy {
        let donor = slots
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != slot)
            .map(|(i, s)| (i, common_prefix(s.cached, prompt).min(max_keep)))
            .max_by_key(|&(_, lcp)| lcp);
        if let Some((donor, lcp)) = donor {
            if lcp > own {
                placement = Placement { slot, n_keep: lcp, copy_from: Some(donor) };
            }
        }
    }
    Some(placement)
}

#[cfg(test)]
mod tests {
    use super::*;
    use SlotDemand::*;

    #[test]
    fn generating_slots_come_first_then_prompts_fill_the_rest() {
        let mut plan = Vec::new();
        plan_step(&[(0, Prefill { remaining: 10 }), (1, Generate), (2, Generate)], 8, &mut plan);
        assert_eq!(
            plan,
            vec![
                Chunk { slot: 1, n_tokens: 1, logits: true },
                Chunk { slot: 2, n_tokens: 1, logits: true },
                Chunk { slot: 0, n_tokens: 6, logits: false },
            ]
        );
    }

    #[test]
    fn prompt_finishing_in_this_step_asks_for_logits() {
        let mut plan = Vec::new();
        plan_step(&[(3, Prefill { remaining: 4 }), (1, Prefill { remaining: 100 })], 10, &mut plan);
        assert_eq!(
            plan,
            vec![Chunk { slot: 3, n_tokens: 4, logits: true }, Chunk { slot: 1, n_tokens: 6, logits: false }]
        );
    }

    #[test]
    fn never_exceeds_the_batch() {
        let mut plan = Vec::new();
        let demands: Vec<_> = (0..5).map(|i| (i, Prefill { remaining: 1000 })).collect();
        plan_step(&demands, 512, &mut plan);
        assert_eq!(plan.iter().map(|c| c.n_tokens).sum::<usize>(), 512);
        assert_eq!(plan.len(), 1, "the oldest prompt takes the whole batch");
    }

    #[test]
    fn empty_when_idle() {
        let mut plan = vec![Chunk { slot: 9, n_tokens: 1, logits: true }];
        plan_step(&[], 512, &mut plan);
        assert!(plan.is_empty());
    }

    fn cache(free: bool, cached: &[i32], last_used: u64) -> SlotCache<'_, i32> {
        SlotCache { free, cached, last_used }
    }

    #[test]
    fn picks_the_free_slot_with_the_longest_prefix() {
        let a = [1, 2, 9];
        let b = [1, 2, 3, 4];
        let slots = [cache(true, &a, 5), cache(true, &b, 1), cache(false, &[], 0)];
        let p = pick_slot(&[1, 2, 3, 4, 5], &slots, false).unwrap();
        assert_eq!(p, Placement { slot: 1, n_keep: 4, copy_from: None });
    }

    #[test]
    fn keeps_one_prompt_token_to_decode() {
        let a = [1, 2, 3];
        let p = pick_slot(&[1, 2, 3], &[cache(true, &a, 0)], false).unwrap();
        assert_eq!(p.n_keep, 2);
    }

    #[test]
    fn without_a_shared_prefix_takes_the_least_recently_used() {
        let (a, b) = ([7], [8]);
        let slots = [cache(true, &a, 10), cache(true, &b, 3)];
        assert_eq!(pick_slot(&[1, 2], &slots, false).unwrap().slot, 1);
    }

    #[test]
    fn copies_a_busy_slots_longer_prefix_when_allowed() {
        let busy = [1, 2, 3, 4, 5, 6];
        let free = [1];
        let slots = [cache(false, &busy, 0), cache(true, &free, 0)];
        let prompt = [1, 2, 3, 4, 9];
        assert_eq!(pick_slot(&prompt, &slots, true).unwrap(), Placement { slot: 1, n_keep: 4, copy_from: Some(0) });
        assert_eq!(pick_slot(&prompt, &slots, false).unwrap(), Placement { slot: 1, n_keep: 1, copy_from: None });
    }

    #[test]
    fn no_free_slot_means_wait() {
        assert_eq!(pick_slot(&[1], &[cache(false, &[], 0)], true), None);
    }
}
