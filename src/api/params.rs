//! Generation parameters shared by OpenAI's routes and llama-server's `/completion`: parsed
//! and range-checked here into engine types, so nothing unchecked reaches a sampler.

use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::error::ApiError;
use crate::engine::{Engine, GenerateRequest, Prompt, SamplingParams};

/// Sampling and constraint fields, under both OpenAI's and llama-server's names. Values out of
/// range are refused with 400 naming the field.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct GenerationFields {
    temperature: Option<f32>,
    dynatemp_range: Option<f32>,
    dynatemp_exponent: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i32>,
    min_p: Option<f32>,
    typical_p: Option<f32>,
    xtc_probability: Option<f32>,
    xtc_threshold: Option<f32>,
    top_n_sigma: Option<f32>,
    mirostat: Option<u8>,
    mirostat_tau: Option<f32>,
    mirostat_eta: Option<f32>,
    repeat_penalty: Option<f32>,
    repeat_last_n: Option<i32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    dry_multiplier: Option<f32>,
    dry_base: Option<f32>,
    dry_allowed_length: Option<i32>,
    dry_penalty_last_n: Option<i32>,
    dry_sequence_breakers: Option<Vec<String>>,
    /// A fixed seed (fits in 32 bits); negative = random.
    seed: Option<i64>,
    /// At most 16 stop strings.
    stop: Option<StopField>,
    logit_bias: Option<LogitBiasIn>,
    /// GBNF (llama-server).
    grammar: Option<String>,
    /// A JSON schema the output must follow (llama-server).
    json_schema: Option<Value>,
    /// OpenAI's `{"type": "text" | "json_object" | "json_schema", "json_schema": {"schema"}}`;
    /// llama-server also takes `{"type": "json_object", "schema": …}`.
    response_format: Option<ResponseFormat>,
    ignore_eos: Option<bool>,
    /// llama-server's per-request LoRA scales: `[{"id", "scale"}]`.
    lora: Option<Vec<LoraScale>>,
}

/// A LoRA adapter's scale, by the adapter's id.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraScale {
    pub id: i64,
    pub scale: f32,
}

/// Checks ids are non-negative and scales finite; the engine checks them against its adapters.
pub fn lora_scales(scales: Vec<LoraScale>) -> Result<Vec<(u32, f32)>, ApiError> {
    scales
        .into_iter()
        .map(|l| match (u32::try_from(l.id), l.scale.is_finite()) {
            (Ok(id), true) => Ok((id, l.scale)),
            _ => Err(bad(
                "lora",
                format!("a LoRA entry needs an adapter id ≥ 0 and a finite scale, got id {} scale {}", l.id, l.scale),
            )),
        })
        .collect()
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

/// OpenAI's `{"<token id>": bias}` or llama-server's `[[token id | text, bias | false], …]`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
enum LogitBiasIn {
    #[schema(value_type = std::collections::BTreeMap<String, BiasIn>)]
    Map(serde_json::Map<String, Value>),
    Pairs(Vec<(TokenOrText, BiasIn)>),
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
enum TokenOrText {
    Token(i32),
    Text(String),
}

/// A bias between -100 and 100, or `false` to ban the token.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
enum BiasIn {
    Value(f32),
    /// `false` bans the token.
    Ban(bool),
}

/// `type` is `text`, `json_object` or `json_schema`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
    json_schema: Option<JsonSchemaFormat>,
    schema: Option<Value>,
}

#[derive(Debug, Deserialize, ToSchema)]
struct JsonSchemaFormat {
    #[serde(default)]
    schema: Option<Value>,
}

const MAX_STOP_STRINGS: usize = 16;

/// The checked form of [`GenerationFields`].
#[derive(Debug, Default)]
pub struct ValidGeneration {
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub grammar: Option<String>,
    pub ignore_eos: bool,
    pub lora: Vec<(u32, f32)>,
}

impl ValidGeneration {
    /// The engine request for `prompt` with these settings.
    pub fn into_request(self, prompt: Prompt, max_tokens: Option<u32>, n_probs: u32) -> GenerateRequest {
        let mut request = GenerateRequest::new(prompt, self.sampling, self.stop, max_tokens);
        request.grammar = self.grammar;
        request.ignore_eos = self.ignore_eos;
        request.lora = self.lora;
        request.n_probs = n_probs;
        request
    }
}

fn bad(param: &'static str, msg: String) -> ApiError {
    ApiError::bad_request(msg).with_param(param)
}

impl GenerationFields {
    /// Checks every field. `engine` tokenizes text keys of `logit_bias` and gives the
    /// vocabulary size token ids are checked against.
    pub async fn validate(self, engine: &Engine) -> Result<ValidGeneration, ApiError> {
        let d = SamplingParams::default();
        let check = |param: &'static str, v: Option<f32>, lo: f32, hi: f32, default: f32| -> Result<f32, ApiError> {
            match v {
                None => Ok(default),
                Some(x) if x.is_finite() && x >= lo && x <= hi => Ok(x),
                Some(x) => Err(bad(param, format!("{param} must be between {lo} and {hi}, got {x}"))),
            }
        };
        let int = |param: &'static str, v: Option<i32>, lo: i32, hi: i32, default: i32| -> Result<i32, ApiError> {
            match v {
                None => Ok(default),
                Some(x) if x >= lo && x <= hi => Ok(x),
                Some(x) => Err(bad(param, format!("{param} must be between {lo} and {hi}, got {x}"))),
            }
        };
        let breakers = self.dry_sequence_breakers.unwrap_or(d.dry_sequence_breakers);
        if breakers.iter().any(|b| b.contains('\0')) {
            return Err(bad("dry_sequence_breakers", "dry_sequence_breakers must not contain NUL characters".into()));
        }
        let mut sampling = SamplingParams {
            temperature: check("temperature", self.temperature, 0.0, 100.0, d.temperature)?,
            dynatemp_range: check("dynatemp_range", self.dynatemp_range, 0.0, 100.0, d.dynatemp_range)?,
            dynatemp_exponent: check("dynatemp_exponent", self.dynatemp_exponent, 0.0, 100.0, d.dynatemp_exponent)?,
            top_p: check("top_p", self.top_p, 0.0, 1.0, d.top_p)?,
            min_p: check("min_p", self.min_p, 0.0, 1.0, d.min_p)?,
            typical_p: check("typical_p", self.typical_p, 0.0, 1.0, d.typical_p)?,
            xtc_probability: check("xtc_probability", self.xtc_probability, 0.0, 1.0, d.xtc_probability)?,
            xtc_threshold: check("xtc_threshold", self.xtc_threshold, 0.0, 1.0, d.xtc_threshold)?,
            top_n_sigma: check("top_n_sigma", self.top_n_sigma, -1.0, 1000.0, d.top_n_sigma)?,
            mirostat: match self.mirostat {
                Some(m) if m > 2 => return Err(bad("mirostat", format!("mirostat must be 0, 1 or 2, got {m}"))),
                m => m.unwrap_or(d.mirostat),
            },
            mirostat_tau: check("mirostat_tau", self.mirostat_tau, 0.0, 100.0, d.mirostat_tau)?,
            mirostat_eta: check("mirostat_eta", self.mirostat_eta, 0.0, 1.0, d.mirostat_eta)?,
            repeat_penalty: check("repeat_penalty", self.repeat_penalty, 0.0, 100.0, d.repeat_penalty)?,
            presence_penalty: check("presence_penalty", self.presence_penalty, -2.0, 2.0, d.presence_penalty)?,
            frequency_penalty: check("frequency_penalty", self.frequency_penalty, -2.0, 2.0, d.frequency_penalty)?,
            dry_multiplier: check("dry_multiplier", self.dry_multiplier, 0.0, 100.0, d.dry_multiplier)?,
            dry_base: check("dry_base", self.dry_base, 1.0, 100.0, d.dry_base)?,
            top_k: int("top_k", self.top_k, 0, i32::MAX, d.top_k)?,
            repeat_last_n: int("repeat_last_n", self.repeat_last_n, 0, 1 << 20, d.repeat_last_n)?,
            dry_allowed_length: int("dry_allowed_length", self.dry_allowed_length, 0, 1 << 20, d.dry_allowed_length)?,
            dry_penalty_last_n: int("dry_penalty_last_n", self.dry_penalty_last_n, -1, 1 << 20, d.dry_penalty_last_n)?,
            dry_sequence_breakers: breakers,
            logit_bias: Vec::new(),
            seed: match self.seed {
                None => None,
                Some(s) if s < 0 => None, // llama-server: -1 = random
                Some(s) => {
                    Some(u32::try_from(s).map_err(|_| bad("seed", format!("seed must fit in 32 bits, got {s}")))?)
                }
            },
        };
        if let Some(bias) = self.logit_bias {
            sampling.logit_bias = logit_bias(bias, engine).await?;
        }
        let stop = match self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s],
            Some(StopField::Many(v)) => v,
        };
        if stop.len() > MAX_STOP_STRINGS {
            return Err(bad("stop", format!("at most {MAX_STOP_STRINGS} stop strings, got {}", stop.len())));
        }
        let grammar = grammar(self.grammar, self.json_schema, self.response_format)?;
        let lora = lora_scales(self.lora.unwrap_or_default())?;
        Ok(ValidGeneration { sampling, stop, grammar, ignore_eos: self.ignore_eos.unwrap_or(false), lora })
    }
}

async fn logit_bias(bias: LogitBiasIn, engine: &Engine) -> Result<Vec<(i32, f32)>, ApiError> {
    let n_vocab = engine.info().n_vocab;
    let token = |t: i64| -> Result<i32, ApiError> {
        if t < 0 || t >= n_vocab as i64 {
            return Err(bad("logit_bias", format!("token id {t} is outside the vocabulary (0..{n_vocab})")));
        }
        Ok(t as i32)
    };
    let value = |b: BiasIn| -> Result<f32, ApiError> {
        match b {
            BiasIn::Ban(false) => Ok(f32::NEG_INFINITY),
            BiasIn::Ban(true) => Err(bad("logit_bias", "a bias of true means nothing; give a number or false".into())),
            BiasIn::Value(v) if v.is_finite() && (-100.0..=100.0).contains(&v) => Ok(v),
            BiasIn::Value(v) => Err(bad("logit_bias", format!("a bias must be between -100 and 100, got {v}"))),
        }
    };
    let mut out = Vec::new();
    match bias {
        LogitBiasIn::Map(map) => {
            for (key, v) in map {
                let id = key
                    .parse::<i64>()
                    .map_err(|_| bad("logit_bias", format!("logit_bias keys are token ids, got '{key}'")))?;
                let b = serde_json::from_value(v)
                    .map_err(|_| bad("logit_bias", format!("the bias of token {key} must be a number")))?;
                out.push((token(id)?, value(b)?));
            }
        }
        LogitBiasIn::Pairs(pairs) => {
            for (t, b) in pairs {
                let b = value(b)?;
                match t {
                    TokenOrText::Token(id) => out.push((token(id as i64)?, b)),
                    // llama-server: a text biases every token it tokenizes to.
                    TokenOrText::Text(text) => {
                        let pieces = engine.tokenize(text, false, false).await.map_err(ApiError::from)?;
                        out.extend(pieces.into_iter().map(|p| (p.id, b)));
                    }
                }
            }
        }
    }
    Ok(out)
}

/// At most one of `grammar`, `json_schema` and `response_format` may constrain the output.
fn grammar(
    gbnf: Option<String>,
    json_schema: Option<Value>,
    format: Option<ResponseFormat>,
) -> Result<Option<String>, ApiError> {
    let format_schema = match format {
        None => None,
        Some(f) => match f.kind.as_str() {
            "text" => None,
            // Any JSON object, as OpenAI's JSON mode promises.
            "json_object" => Some(f.schema.unwrap_or_else(|| json!({ "type": "object" }))),
            "json_schema" => match f.json_schema.and_then(|j| j.schema).or(f.schema) {
                Some(schema) => Some(schema),
                None => {
                    return Err(bad("response_format", "response_format json_schema needs json_schema.schema".into()))
                }
            },
            other => {
                return Err(bad(
                    "response_format",
                    format!("response_format type must be text, json_object or json_schema, got '{other}'"),
                ))
            }
        },
    };
    let given = [gbnf.is_some(), json_schema.is_some(), format_schema.is_some()].iter().filter(|&&b| b).count();
    if given > 1 {
        return Err(bad("grammar", "give only one of grammar, json_schema and response_format".into()));
    }
    if let Some(g) = gbnf {
        if g.trim().is_empty() {
            return Err(bad("grammar", "grammar is empty".into()));
        }
        if g.contains('\0') {
            return Err(bad("grammar", "grammar must not contain NUL characters".into()));
        }
        return Ok(Some(g));
    }
    match json_schema.or(format_schema) {
        None => Ok(None),
        Some(schema) => schema_grammar(&schema).map(Some),
    }
}

/// A JSON schema → GBNF, with llama.cpp's converter (the one llama-server uses).
pub fn schema_grammar(schema: &Value) -> Result<String, ApiError> {
    if !schema.is_object() && !schema.is_boolean() {
        return Err(bad("json_schema", format!("a JSON schema is an object, got {schema}")));
    }
    schema_text_grammar(&schema.to_string())
}

/// [`schema_grammar`] for schema text, whose key order is kept: the converter emits object
/// properties in the order it reads them.
pub fn schema_text_grammar(schema: &str) -> Result<String, ApiError> {
    llama_cpp_2::json_schema_to_grammar(schema).map_err(|e| {
        bad("json_schema", "the JSON schema could not be converted to a grammar".into())
            .with_details(format!("{e}; llama.cpp's converter supports types, properties, required, enum, const, anyOf/oneOf/allOf, items, $ref/$defs, string formats and lengths, patterns"))
    })
}

/// A request's sampling settings under llama-server's names (`generation_settings`, `/slots`).
pub fn settings_json(p: &SamplingParams, stop: &[String], n_predict: i64) -> Value {
    json!({
        "n_predict": n_predict,
        "seed": p.seed.map_or(-1, i64::from),
        "temperature": p.temperature,
        "dynatemp_range": p.dynatemp_range,
        "dynatemp_exponent": p.dynatemp_exponent,
        "top_k": p.top_k,
        "top_p": p.top_p,
        "min_p": p.min_p,
        "typical_p": p.typical_p,
        "xtc_probability": p.xtc_probability,
        "xtc_threshold": p.xtc_threshold,
        "top_n_sigma": p.top_n_sigma,
        "repeat_last_n": p.repeat_last_n,
        "repeat_penalty": p.repeat_penalty,
        "presence_penalty": p.presence_penalty,
        "frequency_penalty": p.frequency_penalty,
        "dry_multiplier": p.dry_multiplier,
        "dry_base": p.dry_base,
        "dry_allowed_length": p.dry_allowed_length,
        "dry_penalty_last_n": p.dry_penalty_last_n,
        "dry_sequence_breakers": p.dry_sequence_breakers,
        "mirostat": p.mirostat,
        "mirostat_tau": p.mirostat_tau,
        "mirostat_eta": p.mirostat_eta,
        "stop": stop,
        "logit_bias": p.logit_bias.iter().map(|&(t, b)| json!([t, if b.is_finite() { json!(b) } else { json!(false) }])).collect::<Vec<_>>(),
    })
}
