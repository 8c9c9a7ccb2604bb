//! Shared helpers of the `qat-pack` tests: a tiny synthetic Llama student with odd shapes and a
//! scheme that exercises every weight format, bit widths 2..=8, row padding and a
//! full-precision layer; rewriting packed files to corrupt them.
#![allow(dead_code)]

use qat_pack::st::{self, OwnedTensor};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::Path;

/// hidden 40 (4 heads of 10, 2 KV heads), intermediate 100, 2 blocks, vocab 24, untied LM head.
pub const CONFIG: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "hidden_size": 40, "intermediate_size": 100, "num_hidden_layers": 2,
  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 10,
  "vocab_size": 24, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
  "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": false,
  "bos_token_id": 1, "eos_token_id": 2
}"#;

/// Every format; bits 2..=8; rows padded (3 x 100, 7 x 100 bits); `layers.0.self_attn.o_proj`
/// full precision; activations and KV quantized.
pub const SCHEME: &str = r#"{
  "format_version": 1,
  "weight": {"bits": 3, "format": {"kind": "asym_group", "group_size": 20}},
  "act": {"bits": 8},
  "kv": {"bits": 6},
  "overrides": [
    {"pattern": "layers.0.self_attn.q_proj", "weight": {"bits": 3, "format": {"kind": "nf3", "group_size": 10}}},
    {"pattern": "layers.0.self_attn.k_proj", "weight": {"bits": 4, "format": {"kind": "nf4", "group_size": null}}},
    {"pattern": "layers.0.self_attn.v_proj", "weight": {"bits": 8, "format": {"kind": "sym_per_channel"}}},
    {"pattern": "layers.0.self_attn.o_proj", "weight": null},
    {"pattern": "layers.0.mlp.gate_proj", "weight": {"bits": 2, "format": {"kind": "asym_group", "group_size": 8}}},
    {"pattern": "layers.0.mlp.up_proj", "weight": {"bits": 5, "format": {"kind": "sym_per_channel"}}},
    {"pattern": "layers.0.mlp.down_proj", "weight": {"bits": 7, "format": {"kind": "asym_group", "group_size": 25}}},
    {"pattern": "layers.1.self_attn.q_proj", "weight": {"bits": 6, "format": {"kind": "sym_per_channel"}}},
    {"pattern": "layers.1.self_attn.k_proj", "weight": {"bits": 3, "format": {"kind": "sym_per_channel"}}},
    {"pattern": "layers.1.self_attn.v_proj", "weight": {"bits": 2, "format": {"kind": "sym_per_channel"}}},
    {"pattern": "layers.1.self_attn.o_proj", "weight": {"bits": 4, "format": {"kind": "asym_group", "group_size": null}}},
    {"pattern": "layers.1.mlp.up_proj", "weight": {"bits": 4, "format": {"kind": "nf4", "group_size": 20}}},
    {"pattern": "layers.1.mlp.down_proj", "weight": {"bits": 3, "format": {"kind": "nf3", "group_size": 50}}}
  ]
}"#;

/// Deterministic pseudo-random f32 in about [-0.1, 0.1] (xorshift, sum of two uniforms).
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }

    fn weight(&mut self) -> f32 {
        0.1 * (self.uniform() + self.uniform())
    }
}

/// The tensors of the synthetic model: random weights, except that row 0 of every matrix is all
/// zeros and row 1 all positive (degenerate groups: zero scales, nf3 without negatives).
pub fn weights(seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let (h, i, v, q, kv) = (40, 100, 24, 40, 20);
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut shapes: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![v, h])];
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        shapes.push((format!("{p}.input_layernorm.weight"), vec![h]));
        shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        for (m, s) in [
            ("self_attn.q_proj", [q, h]),
            ("self_attn.k_proj", [kv, h]),
            ("self_attn.v_proj", [kv, h]),
            ("self_attn.o_proj", [h, q]),
            ("mlp.gate_proj", [i, h]),
            ("mlp.up_proj", [i, h]),
            ("mlp.down_proj", [h, i]),
        ] {
            shapes.push((format!("{p}.{m}.weight"), s.to_vec()));
        }
    }
    shapes.push(("model.norm.weight".into(), vec![h]));
    shapes.push(("lm_head.weight".into(), vec![v, h]));
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let cols = *shape.last().unwrap();
            let data = (0..n)
                .map(|k| match (shape.len(), k / cols) {
                    (1, _) => 1.0 + rng.weight(),
                    (_, 0) => 0.0,
                    (_, 1) => rng.weight().abs(),
                    _ => rng.weight(),
                })
                .collect();
            (name, shape, data)
        })
        .collect()
}

/// Writes the synthetic student (config.json, model.safetensors, quant_scheme.json = `scheme`)
/// into `dir`.
pub fn write_student(dir: &Path, scheme: &str, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), CONFIG).unwrap();
    std::fs::write(dir.join("quant_scheme.json"), scheme).unwrap();
    let tensors: Vec<OwnedTensor> = weights(seed)
        .into_iter()
        .map(|(name, shape, data)| OwnedTensor {
            name,
            dtype: Dtype::F32,
            shape,
            data: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        })
        .collect();
    st::write(&dir.join("model.safetensors"), &BTreeMap::new(), tensors).unwrap();
}

/// The tensors and metadata of a safetensors file, for rewriting.
pub fn read_file(path: &Path) -> (BTreeMap<String, String>, Vec<OwnedTensor>) {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(name, v)| OwnedTensor {
            name,
            dtype: v.dtype(),
            shape: v.shape().to_vec(),
            data: v.data().to_vec(),
        })
        .collect();
    (
        meta.metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        tensors,
    )
}

/// Rewrites the packed file of `dir` after `edit` changed its metadata or tensors.
pub fn rewrite(
    dir: &Path,
    edit: impl FnOnce(&mut BTreeMap<String, String>, &mut Vec<OwnedTensor>),
) {
    let path = dir.join(qat_pack::PACKED_FILE);
    let (mut meta, mut tensors) = read_file(&path);
    edit(&mut meta, &mut tensors);
    st::write(&path, &meta, tensors).unwrap();
}

/// The tensor `name` of `tensors`.
pub fn tensor<'a>(tensors: &'a mut [OwnedTensor], name: &str) -> &'a mut OwnedTensor {
    tensors
        .iter_mut()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
}

/// A copy of the packed directory `src` at `dst`.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// An error and its sources, joined by ": " (as the binaries print them).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
