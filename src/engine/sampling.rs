//! Request sampling parameters → one llama.cpp sampler chain per slot.

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;
use llama_cpp_2::token::LlamaToken;

/// Validated sampling parameters; defaults are llama-server's. Every value here was range-checked
/// by the API layer (token ids included), because several samplers assert or panic on bad input.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// 0 (or below) means greedy.
    pub temperature: f32,
    /// Dynamic temperature: the temperature varies by ± this with the entropy (0 = off).
    pub dynatemp_range: f32,
    pub dynatemp_exponent: f32,
    /// 0 disables top-k.
    pub top_k: i32,
    pub top_p: f32,
    pub min_p: f32,
    /// 1 = off.
    pub typical_p: f32,
    /// 0 = off.
    pub xtc_probability: f32,
    pub xtc_threshold: f32,
    /// ≤ 0 = off.
    pub top_n_sigma: f32,
    /// 0 = off, 1 = Mirostat, 2 = Mirostat 2.0 (replace top-k/p/min-p, as in llama-server).
    pub mirostat: u8,
    pub mirostat_tau: f32,
    pub mirostat_eta: f32,
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub repeat_last_n: i32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// DRY ("don't repeat yourself"); multiplier 0 = off.
    pub dry_multiplier: f32,
    pub dry_base: f32,
    pub dry_allowed_length: i32,
    pub dry_penalty_last_n: i32,
    /// Free of NUL bytes (the sampler would panic on one).
    pub dry_sequence_breakers: Vec<String>,
    /// Added to the logits of these (in-vocabulary) tokens; −inf bans a token.
    pub logit_bias: Vec<(i32, f32)>,
    /// None: the instance's seed, or a random one.
    pub seed: Option<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            dynatemp_range: 0.0,
            dynatemp_exponent: 1.0,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            typical_p: 1.0,
            xtc_probability: 0.0,
            xtc_threshold: 0.1,
            top_n_sigma: -1.0,
            mirostat: 0,
            mirostat_tau: 5.0,
            mirostat_eta: 0.1,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            dry_multiplier: 0.0,
            dry_base: 1.75,
            dry_allowed_length: 2,
            dry_penalty_last_n: -1,
            dry_sequence_breakers: ["\n", ":", "\"", "*"].map(String::from).to_vec(),
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 && self.mirostat == 0
    }

    pub fn has_penalties(&self) -> bool {
        self.repeat_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }

    /// Builds the chain in llama-server's order: logit bias, penalties, DRY, top-n-σ, top-k,
    /// typical, top-p, min-p, XTC, temperature, then the selecting sampler. Samplers that would
    /// be no-ops are left out: each one is a pass over the candidates. A grammar is not part of
    /// the chain (see [`sample_with_grammar`]).
    ///
    /// `penalties` comes in separately because it has already seen the prompt (see
    /// [`Self::penalties_sampler`]).
    ///
    /// With `prefilter`, the logit bias is left out: [`Prefilter`] applies it.
    pub fn build_chain(
        &self,
        model: &LlamaModel,
        seed: u32,
        penalties: Option<LlamaSampler>,
        prefilter: Option<&Prefilter>,
    ) -> LlamaSampler {
        let n_vocab = model.n_vocab();
        let mut chain = Vec::with_capacity(12);
        if !self.logit_bias.is_empty() && prefilter.is_none() {
            let biases: Vec<LlamaLogitBias> =
                self.logit_bias.iter().map(|&(t, b)| LlamaLogitBias::new(LlamaToken(t), b)).collect();
            chain.push(LlamaSampler::logit_bias(n_vocab, &biases));
        }
        chain.extend(penalties);
        if self.dry_multiplier > 0.0 {
            let ctx_train = model.n_ctx_train() as i32;
            let last_n = if self.dry_penalty_last_n < 0 { ctx_train } else { self.dry_penalty_last_n };
            chain.push(LlamaSampler::dry(
                model,
                self.dry_multiplier,
                self.dry_base,
                self.dry_allowed_length,
                last_n,
                &self.dry_sequence_breakers,
            ));
        }
        if self.is_greedy() {
            chain.push(LlamaSampler::greedy());
        } else if self.mirostat > 0 {
            chain.push(LlamaSampler::temp(self.temperature));
            chain.push(match self.mirostat {
                1 => LlamaSampler::mirostat(n_vocab, seed, self.mirostat_tau, self.mirostat_eta, 100),
                _ => LlamaSampler::mirostat_v2(seed, self.mirostat_tau, self.mirostat_eta),
            });
        } else {
            if self.top_n_sigma > 0.0 {
                chain.push(LlamaSampler::top_n_sigma(self.top_n_sigma));
            }
            if self.top_k > 0 {
                chain.push(LlamaSampler::top_k(self.top_k));
            }
            if self.typical_p < 1.0 {
                chain.push(LlamaSampler::typical(self.typical_p, 1));
            }
            if self.top_p < 1.0 {
                chain.push(LlamaSampler::top_p(self.top_p, 1));
            }
            if self.min_p > 0.0 {
                chain.push(LlamaSampler::min_p(self.min_p, 1));
            }
            if self.xtc_probability > 0.0 {
                chain.push(LlamaSampler::xtc(self.xtc_probability, self.xtc_threshold, 1, seed));
            }
            if self.dynatemp_range > 0.0 {
                chain.push(LlamaSampler::temp_ext(self.temperature, self.dynatemp_range, self.dynatemp_exponent));
            } else {
                chain.push(LlamaSampler::temp(self.temperature));
            }
            chain.push(LlamaSampler::dist(seed));
        }
        LlamaSampler::chain(chain, true)
    }

    /// The repetition penalties, already fed the end of the prompt as llama-server does. Built
    /// apart from the chain because feeding the prompt to a chain would also feed it to the
    /// grammar, which rejects it.
    pub fn penalties_sampler(&self, n_vocab: i32, prompt: &[LlamaToken]) -> Option<LlamaSampler> {
        if !self.has_penalties() {
            return None;
        }
        let mut sampler = LlamaSampler::penalties(
            n_vocab,
            self.repeat_last_n,
            self.repeat_penalty,
            self.frequency_penalty,
            self.presence_penalty,
        );
        let last_n = self.repeat_last_n.max(0) as usize;
        sampler.accept_many(&prompt[prompt.len().saturating_sub(last_n)..]);
        Some(sampler)
    }
}

/// The candidates a chain needs, taken straight from the logits. llama.cpp hands a chain every
/// token of the vocabulary (262k for Gemma 3: a 3 MiB array written and partially sorted per
/// token and slot); but when nothing before top-k can change a logit except a bias (no
/// penalties, DRY or top-n-σ), everything after top-k sees only its k survivors, and greedy only
/// the largest. Those are found here with one pass over the logits that skips whole blocks
/// below the current k-th largest, and handed to the same chain, bias already applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Prefilter {
    k: usize,
    /// Summed per token, sorted by token.
    bias: Vec<(i32, f32)>,
}

impl Prefilter {
    /// None when the chain needs the whole vocabulary.
    pub fn of(p: &SamplingParams) -> Option<Prefilter> {
        if p.has_penalties() || p.dry_multiplier > 0.0 || p.top_n_sigma > 0.0 {
            return None;
        }
        let k = if p.is_greedy() {
            1
        } else if p.mirostat == 0 && p.top_k > 0 {
            p.top_k as usize
        } else {
            return None;
        };
        let mut bias: Vec<(i32, f32)> = Vec::with_capacity(p.logit_bias.len());
        let mut sorted = p.logit_bias.clone();
        sorted.sort_by_key(|&(t, _)| t);
        for (t, b) in sorted {
            match bias.last_mut() {
                Some(last) if last.0 == t => last.1 += b,
                _ => bias.push((t, b)),
            }
        }
        Some(Prefilter { k, bias })
    }

    /// The k largest biased logits, largest first (ties: the lower token first, as llama.cpp's
    /// greedy picks), into `out`.
    pub fn candidates(&self, logits: &[f32], out: &mut Vec<LlamaTokenData>) {
        const BLOCK: usize = 64;
        let k = self.k.min(logits.len());
        out.clear();
        let is_biased = |t: usize| self.bias.binary_search_by_key(&(t as i32), |&(t, _)| t).is_ok();
        // Biased tokens are placed after the scan, with their biased logit.
        for (b, block) in logits.chunks(BLOCK).enumerate() {
            let threshold = if out.len() < k { f32::NEG_INFINITY } else { out[k - 1].logit() };
            if block_max(block) <= threshold && out.len() >= k {
                continue;
            }
            for (i, &logit) in block.iter().enumerate() {
                let ranks = out.len() < k || logit > out[k - 1].logit();
                if ranks && !is_biased(b * BLOCK + i) {
                    insert(out, k, (b * BLOCK + i) as i32, logit);
                }
            }
        }
        for &(t, b) in &self.bias {
            if let Some(&logit) = logits.get(t as usize) {
                insert(out, k, t, logit + b);
            }
        }
    }
}

/// The largest of `block`, in lanes of 16 with plain comparisons (not `f32::max`, whose NaN
/// rule keeps the compiler from vector max instructions); NaN never wins.
fn block_max(block: &[f32]) -> f32 {
    const LANES: usize = 16;
    let max = |a: f32, b: f32| if b > a { b } else { a };
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = block.chunks_exact(LANES);
    let rest = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &l| max(m, l));
    for chunk in chunks {
        for (lane, &l) in lanes.iter_mut().zip(chunk) {
            *lane = max(*lane, l);
        }
    }
    lanes.into_iter().fold(rest, max)
}

/// Puts a candidate into `out` (sorted, at most `k`) if it ranks; equal logits keep the order
/// they came in.
fn insert(out: &mut Vec<LlamaTokenData>, k: usize, token: i32, logit: f32) {
    // NaN never ranks; −∞ (a banned token) only fills a vocabulary smaller than k.
    if logit.is_nan() || (out.len() >= k && logit <= out[k - 1].logit()) {
        return;
    }
    let at = out.partition_point(|c| c.logit() >= logit);
    if out.len() >= k {
        out.pop();
    }
    out.insert(at, LlamaTokenData::new(LlamaToken(token), logit, 0.0));
}

/// Samples with `chain` from the prefiltered candidates at `i_batch`, as `llama_sampler_sample`
/// does from the whole vocabulary (and accepts the token). `scratch` keeps its allocation.
pub fn sample_prefiltered(
    ctx: &LlamaContext<'_>,
    i_batch: i32,
    prefilter: &Prefilter,
    chain: &mut LlamaSampler,
    scratch: &mut Vec<LlamaTokenData>,
) -> LlamaToken {
    prefilter.candidates(ctx.get_logits_ith(i_batch), scratch);
    let mut candidates = LlamaTokenDataArray::new(std::mem::take(scratch), true);
    chain.apply(&mut candidates);
    let tok = candidates.selected_token().or_else(|| candidates.data.first().map(|c| c.id())).unwrap_or(LlamaToken(0));
    chain.accept(tok);
    *scratch = candidates.data;
    tok
}

/// Samples under a grammar the way llama.cpp's common sampler does: sample with the chain
/// alone, and only if the grammar rejects that token, mask the whole vocabulary with the grammar
/// and sample again. Masking first costs a grammar check of every token of the vocabulary (262k
/// for Gemma 3) each step, which made constrained generation several times slower.
pub fn sample_with_grammar(
    ctx: &LlamaContext<'_>,
    i_batch: i32,
    chain: &mut LlamaSampler,
    grammar: &mut LlamaSampler,
) -> Option<LlamaToken> {
    let mut candidates = ctx.token_data_array_ith(i_batch);
    chain.apply(&mut candidates);
    let allowed = candidates.selected_token().filter(|&tok| {
        let mut single = LlamaTokenDataArray::new(vec![LlamaTokenData::new(tok, 1.0, 0.0)], false);
        grammar.apply(&mut single);
        single.data[0].logit() != f32::NEG_INFINITY
    });
    let tok = match allowed {
        Some(tok) => tok,
        None => {
            let mut candidates = ctx.token_data_array_ith(i_batch);
            grammar.apply(&mut candidates);
            chain.apply(&mut candidates);
            candidates.selected_token()?
        }
    };
    grammar.accept(tok);
    chain.accept(tok);
    Some(tok)
}

#[cfg(test)]
mod tests {
    use super::*;

    const N_VOCAB: usize = 50_000;

    /// Logits shaped like a model's: low noise, a few dozen plausible tokens; with `tie`, two
    /// tokens share the largest. (Ties among the candidates of a random pick are ordered by
    /// llama.cpp's partial sort as it happens to, so only greedy picks are compared with them.)
    fn logits(rng: &mut fastrand::Rng, tie: bool) -> Vec<f32> {
        let mut l: Vec<f32> = (0..N_VOCAB).map(|_| rng.f32() * 6.0 - 3.0).collect();
        for _ in 0..30 {
            l[rng.usize(..N_VOCAB)] = 6.0 + rng.f32() * 6.0;
        }
        if tie {
            let top = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            l[rng.usize(..N_VOCAB)] = top;
        }
        l
    }

    /// The chain build_chain makes for `p` (no penalties, DRY or top-n-σ), with or without the bias.
    fn chain(p: &SamplingParams, seed: u32, with_bias: bool) -> LlamaSampler {
        let mut chain = Vec::new();
        if with_bias && !p.logit_bias.is_empty() {
            let biases: Vec<LlamaLogitBias> =
                p.logit_bias.iter().map(|&(t, b)| LlamaLogitBias::new(LlamaToken(t), b)).collect();
            chain.push(LlamaSampler::logit_bias(N_VOCAB as i32, &biases));
        }
        if p.is_greedy() {
            chain.push(LlamaSampler::greedy());
        } else {
            chain.extend([
                LlamaSampler::top_k(p.top_k),
                LlamaSampler::top_p(p.top_p, 1),
                LlamaSampler::min_p(p.min_p, 1),
                LlamaSampler::temp(p.temperature),
                LlamaSampler::dist(seed),
            ]);
        }
        LlamaSampler::chain(chain, true)
    }

    #[test]
    fn prefiltered_candidates_pick_what_the_whole_vocabulary_picks() {
        let mut rng = fastrand::Rng::with_seed(7);
        let banned = 3; // as ignore_eos bans the end-of-generation tokens
        let cases = [
            SamplingParams::default(),
            SamplingParams { temperature: 1.5, top_k: 5, top_p: 1.0, min_p: 0.0, ..Default::default() },
            SamplingParams { temperature: 0.0, ..Default::default() },
            SamplingParams {
                logit_bias: vec![(banned, f32::NEG_INFINITY), (17, 9.0), (17, 2.0), (N_VOCAB as i32 - 1, 30.0)],
                ..Default::default()
            },
            SamplingParams { temperature: 0.0, logit_bias: vec![(banned, f32::NEG_INFINITY)], ..Default::default() },
        ];
        for (i, p) in cases.iter().enumerate() {
            let prefilter = Prefilter::of(p).expect("these chains need only top-k");
            let (mut whole, mut filtered) = (chain(p, 42, true), chain(p, 42, false));
            let mut scratch = Vec::new();
            for step in 0..30 {
                let mut l = logits(&mut rng, p.is_greedy());
                let bans = p.logit_bias.contains(&(banned, f32::NEG_INFINITY));
                if bans {
                    l[banned as usize] = 100.0; // would win, were it not banned
                }
                let mut all = LlamaTokenDataArray::from_iter(
                    l.iter().enumerate().map(|(t, &x)| LlamaTokenData::new(LlamaToken(t as i32), x, 0.0)),
                    false,
                );
                whole.apply(&mut all);
                let want = all.selected_token().unwrap();
                whole.accept(want);

                prefilter.candidates(&l, &mut scratch);
                assert!(scratch.windows(2).all(|w| w[0].logit() >= w[1].logit()), "case {i}: not sorted");
                let mut some = LlamaTokenDataArray::new(std::mem::take(&mut scratch), true);
                filtered.apply(&mut some);
                let got = some.selected_token().unwrap();
                filtered.accept(got);
                scratch = some.data;
                assert_eq!(got, want, "case {i}, step {step}: {p:?}");
                if bans {
                    assert_ne!(got, LlamaToken(banned), "case {i}");
                }
            }
        }
    }

    #[test]
    fn the_chain_needs_every_logit_when_something_before_top_k_changes_them() {
        let with = |f: fn(&mut SamplingParams)| {
            let mut p = SamplingParams::default();
            f(&mut p);
            Prefilter::of(&p)
        };
        assert!(with(|p| p.repeat_penalty = 1.1).is_none());
        assert!(with(|p| p.dry_multiplier = 0.8).is_none());
        assert!(with(|p| p.top_n_sigma = 1.0).is_none());
        assert!(with(|p| p.mirostat = 2).is_none());
        assert!(with(|p| p.top_k = 0).is_none());
        assert_eq!(with(|p| p.temperature = 0.0).map(|f| f.k), Some(1));
        assert_eq!(
            with(|p| p.logit_bias = vec![(5, 1.0), (2, -1.0), (5, 0.5)]).map(|f| f.bias),
            Some(vec![(2, -1.0), (5, 1.5)])
        );
    }
}
