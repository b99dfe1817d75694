//! A model's GGUF header as `GET /api/admin/models/{id}/metadata` answers it: the general,
//! architecture and tokenizer fields by name, tensor counts, and every key/value pair — but
//! the vocabulary arrays, which run to hundreds of thousands of entries.

use serde_json::{json, Value};

use super::gguf::{GgufFile, GgufValue};

/// Keys whose values are the vocabulary (tokens, scores, types, merges): left out of `raw`,
/// listed in `omitted` with their lengths.
const VOCABULARY: [&str; 5] = [
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.precompiled_charsmap",
];

/// Arrays longer than this are summarised in `raw` rather than listed.
const MAX_RAW_ARRAY: usize = 1024;

pub fn describe(model_id: &str, file: &GgufFile) -> Value {
    let arch = file.architecture().unwrap_or_default().to_string();
    let value = |key: &str| file.get(key).map(to_json).unwrap_or(Value::Null);
    let arch_value = |suffix: &str| value(&format!("{arch}.{suffix}"));
    let file_type = file.get_u64("general.file_type");
    let vocab_size = file
        .get(&format!("{arch}.vocab_size"))
        .map(to_json)
        .or_else(|| file.get("tokenizer.ggml.tokens").and_then(GgufValue::as_array).map(|a| json!(a.len())))
        .unwrap_or(Value::Null);
    let mut raw = Vec::with_capacity(file.metadata.len());
    let mut omitted = Vec::new();
    for (key, v) in &file.metadata {
        match v.as_array() {
            Some(a) if VOCABULARY.contains(&key.as_str()) || a.len() > MAX_RAW_ARRAY => {
                omitted.push(json!({ "key": key, "length": a.len() }));
            }
            _ => raw.push(json!({ "key": key, "value": to_json(v) })),
        }
    }
    json!({
        "model_id": model_id,
        "general": {
            "name": value("general.name"),
            "architecture": arch,
            "architecture_supported": super::arch::supported(&arch),
            "file_type": file_type,
            "quantization": file_type.and_then(super::registry::quantization_name),
        },
        "model": {
            "context_length": arch_value("context_length"),
            "block_count": arch_value("block_count"),
            "embedding_length": arch_value("embedding_length"),
            "feed_forward_length": arch_value("feed_forward_length"),
            "head_count": arch_value("attention.head_count"),
            "head_count_kv": arch_value("attention.head_count_kv"),
            "rope_dimension_count": arch_value("rope.dimension_count"),
            "rope_freq_base": arch_value("rope.freq_base"),
            "layer_norm_rms_epsilon": arch_value("attention.layer_norm_rms_epsilon"),
            "vocab_size": vocab_size,
        },
        "tokenizer": {
            "model": value("tokenizer.ggml.model"),
            "pre": value("tokenizer.ggml.pre"),
            "eos_token_id": value("tokenizer.ggml.eos_token_id"),
            "bos_token_id": value("tokenizer.ggml.bos_token_id"),
            "padding_token_id": value("tokenizer.ggml.padding_token_id"),
            "has_chat_template": file.get("tokenizer.chat_template").is_some(),
        },
        "tensors": { "count": file.tensors.len(), "data_offset": file.data_offset },
        "gguf_version": file.version,
        "raw": raw,
        "omitted": omitted,
    })
}

/// A metadata value as JSON; a float that JSON cannot hold (NaN, ∞) becomes its text.
fn to_json(v: &GgufValue) -> Value {
    let float = |f: f64| serde_json::Number::from_f64(f).map(Value::Number).unwrap_or_else(|| json!(f.to_string()));
    match v {
        // Through the shortest decimal text, so 1e-6f32 reads 1e-6, not 9.999999974752427e-7.
        GgufValue::F32(f) => float(f.to_string().parse().unwrap_or(f64::from(*f))),
        GgufValue::F64(f) => float(*f),
        GgufValue::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        other => serde_json::to_value(other).unwrap_or(Value::Null),
    }
}
