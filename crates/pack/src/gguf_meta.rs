//! The metadata of an exported GGUF file (`formats/gguf.md`, "Metadata"): llama architecture
//! keys as llama.cpp's `convert_hf_to_gguf.py` writes them for `LlamaForCausalLM`, the
//! SentencePiece vocabulary, and qat's scheme and provenance.

use crate::gguf::{self, Value};
use crate::gguf_export::GgufSummary;
use crate::pack::TOOL;
use crate::vocab::{Vocab, TYPE_UNKNOWN};
use qat_model::{LlamaConfig, ModelDir};
use qat_quant::Scheme;

/// `general.file_type` (llama.cpp's `llama_ftype`): the commonest block type of the quantized
/// layers, else (none quantized) the float type.
pub(crate) fn file_type(summary: &GgufSummary) -> u32 {
    let top = summary
        .types
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(t, _)| t.as_str());
    match top {
        Some("Q4_0") => 2,
        Some("Q4_1") => 3,
        Some("Q8_0") => 7,
        _ => summary.float_type.file_type(), // ALL_F32, MOSTLY_F16 or MOSTLY_BF16
    }
}

pub(crate) fn metadata(
    cfg: &LlamaConfig,
    vocab: &Vocab,
    scheme: &Scheme,
    s: &GgufSummary,
    dir: &ModelDir,
) -> Vec<(String, Value)> {
    let u = |x: usize| Value::U32(x as u32);
    let provenance = serde_json::json!({
        "tool": TOOL,
        "source_weights_sha256": s.source_weights_sha256,
        "scheme": scheme,
        "dropped": s.dropped,
        "float_type": s.float_type,
    });
    let name = dir
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut kvs: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::Str("llama".into())),
        ("general.type", Value::Str("model".into())),
        ("general.name", Value::Str(name)),
        ("general.alignment", u(gguf::ALIGNMENT)),
        ("general.file_type", Value::U32(file_type(s))),
        ("general.quantization_version", Value::U32(2)),
        ("llama.context_length", u(cfg.max_position_embeddings)),
        ("llama.embedding_length", u(cfg.hidden_size)),
        ("llama.block_count", u(cfg.num_layers)),
        ("llama.feed_forward_length", u(cfg.intermediate_size)),
        ("llama.attention.head_count", u(cfg.num_heads)),
        ("llama.attention.head_count_kv", u(cfg.num_kv_heads)),
        ("llama.rope.freq_base", Value::F32(cfg.rope_theta as f32)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        ("llama.attention.key_length", u(cfg.head_dim)),
        ("llama.attention.value_length", u(cfg.head_dim)),
        ("llama.rope.dimension_count", u(cfg.head_dim)),
        ("llama.vocab_size", u(cfg.vocab_size)),
        ("tokenizer.ggml.model", Value::Str("llama".into())),
        (
            "tokenizer.ggml.tokens",
            Value::StrArray(vocab.tokens.clone()),
        ),
        (
            "tokenizer.ggml.scores",
            Value::F32Array(vocab.scores.clone()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::I32Array(vocab.types.clone()),
        ),
    ];
    if let Some(bos) = cfg.bos_token_id {
        kvs.push(("tokenizer.ggml.bos_token_id", Value::U32(bos)));
    }
    if let Some(&eos) = cfg.eos_token_ids.first() {
        kvs.push(("tokenizer.ggml.eos_token_id", Value::U32(eos)));
    }
    if let Some(unk) = vocab.first_of_type(TYPE_UNKNOWN) {
        kvs.push(("tokenizer.ggml.unknown_token_id", Value::U32(unk)));
    }
    let tok_cfg: serde_json::Value = std::fs::read_to_string(dir.dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    kvs.push((
        "tokenizer.ggml.add_bos_token",
        Value::Bool(tok_cfg["add_bos_token"].as_bool().unwrap_or(true)),
    ));
    kvs.push((
        "tokenizer.ggml.add_eos_token",
        Value::Bool(tok_cfg["add_eos_token"].as_bool().unwrap_or(false)),
    ));
    kvs.push((
        "tokenizer.ggml.add_space_prefix",
        Value::Bool(vocab.add_space_prefix),
    ));
    kvs.push((
        "tokenizer.ggml.remove_extra_whitespaces",
        Value::Bool(vocab.remove_extra_whitespaces),
    ));
    kvs.push((
        "qat.scheme",
        Value::Str(serde_json::to_string(scheme).unwrap_or_default()),
    ));
    kvs.push(("qat.provenance", Value::Str(provenance.to_string())));
    kvs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_type_is_the_commonest_block_type_else_the_float_type() {
        let mut s = GgufSummary::default();
        assert_eq!(file_type(&s), 0);
        s.float_type = crate::FloatType::F16;
        assert_eq!(file_type(&s), 1);
        s.float_type = crate::FloatType::Bf16;
        assert_eq!(file_type(&s), 32);
        s.types.insert("Q4_1".into(), 30);
        s.types.insert("Q8_0".into(), 5);
        assert_eq!(file_type(&s), 3);
    }
}
