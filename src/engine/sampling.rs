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
    pub fn build_chain(&self, model: &LlamaModel, seed: u32, penalties: Option<LlamaSampler>) -> LlamaSampler {
        let n_vocab = model.n_vocab();
        let mut chain = Vec::with_capacity(12);
        if !self.logit_bias.is_empty() {
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
