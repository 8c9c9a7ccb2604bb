#!/usr/bin/env python3
"""Foreign reader for the GGUF files `qat-pack --format gguf` writes (formats/gguf.md).

Uses only llama.cpp's own `gguf` Python package (its GGUFReader and its `gguf.quants`
dequantize / quantize), numpy, safetensors and the standard library; never qat code. It reads
FILE, checks the metadata against the model's config.json, dequantizes every tensor with gguf's
own code, undoes llama.cpp's q/k row permutation, and compares with EXPECTED (a safetensors file
written by the test from qat's fake quantization, Hugging Face names and row order):

  <hf name>          the value qat trains with (fake-quantized linear weights; others as stored)
  <hf name>.master   (linear layers) the student's f32 master weight

Checks: every tensor bit for bit equal to <hf name> (F16 / BF16 tensors: to <hf name> rounded by
gguf.quants.quantize, llama.cpp's reference conversion; the embeddings in the type that
qat.provenance's float_type names, the norms F32); every quantized tensor's bytes equal to
gguf.quants.quantize of the permuted master weight (gguf-py's port of llama.cpp's reference
quantizer), except for layers whose scheme (qat.provenance) is sym_per_channel: there every block
of a row must carry the row's scale f16(max|row| / qmax) of the master weight as `d`. Prints a JSON
summary; any mismatch exits 1 with a message on stderr.

Usage: read_gguf.py FILE EXPECTED CONFIG_JSON
"""

import json
import re
import sys

import numpy as np
from gguf import GGUFReader, GGMLQuantizationType as T
from gguf.quants import dequantize, quantize
from safetensors.numpy import load_file

LINEAR = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def fail(msg):
    print(f"read_gguf.py: {msg}", file=sys.stderr)
    sys.exit(1)


def layer_weight(scheme, layer_name):
    """The weight quantizer of a linear layer (e.g. layers.0.mlp.down_proj) under qat's scheme:
    the default, then every override whose glob (`*` = any run) matches, in order."""
    weight = scheme.get("weight")
    for o in scheme.get("overrides") or []:
        if re.fullmatch(".*".join(map(re.escape, o["pattern"].split("*"))), layer_name) and "weight" in o:
            weight = o["weight"]
    return weight


def check_row_scales(name, data, master, bits, qtype):
    """Every block of row r has d = f16(max|master row r| / qmax), qmax = 2^(bits-1) - 1."""
    qmax = np.float32(2 ** (bits - 1) - 1)
    amax = np.abs(master.astype(np.float32)).max(axis=1)
    want = np.minimum(amax / qmax, np.float32(65504)).astype(np.float16)
    block_bytes = {T.Q4_0: 18, T.Q8_0: 34}[qtype]
    raw = np.asarray(data, dtype=np.uint8).reshape(master.shape[0], -1, block_bytes)
    d = raw[:, :, :2].copy().view(np.float16)[:, :, 0]
    if not (d == want[:, None]).all():
        r = int(np.argwhere(d != want[:, None])[0][0])
        fail(f"{name}: row {r} has block scales {d[r].tolist()[:4]}..., expected its scale {float(want[r])}")


def field(r, key):
    f = r.get_field(key)
    if f is None:
        fail(f"metadata {key} missing")
    return f.contents()


def hf_name(name):
    """GGUF tensor name -> (Hugging Face name, is linear)."""
    if name == "token_embd.weight":
        return "model.embed_tokens.weight", False
    if name == "output_norm.weight":
        return "model.norm.weight", False
    if name == "output.weight":
        return "lm_head.weight", False
    blk, layer, part, _ = name.split(".")
    assert blk == "blk", name
    if part in LINEAR:
        return f"model.layers.{layer}.{LINEAR[part]}.weight", True
    return f"model.layers.{layer}.{NORMS[part]}.weight", False


def permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute: rotate-half rows -> interleaved rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main():
    path, expected_path, config_path = sys.argv[1:4]
    cfg = json.load(open(config_path))
    expected = load_file(expected_path)
    r = GGUFReader(path)
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    want_meta = {
        "general.architecture": "llama",
        "llama.context_length": cfg["max_position_embeddings"],
        "llama.embedding_length": cfg["hidden_size"],
        "llama.block_count": cfg["num_hidden_layers"],
        "llama.feed_forward_length": cfg["intermediate_size"],
        "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": kv_heads,
        "llama.rope.dimension_count": head_dim,
        "llama.vocab_size": cfg["vocab_size"],
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.bos_token_id": cfg["bos_token_id"],
        "tokenizer.ggml.eos_token_id": cfg["eos_token_id"],
    }
    for key, want in want_meta.items():
        got = field(r, key)
        if got != want:
            fail(f"metadata {key}: found {got!r}, expected {want!r}")
    for key, want in [("llama.rope.freq_base", cfg["rope_theta"]),
                      ("llama.attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])]:
        if field(r, key) != np.float32(want):
            fail(f"metadata {key}: found {field(r, key)}, expected f32({want})")
    tokens = field(r, "tokenizer.ggml.tokens")
    scores = field(r, "tokenizer.ggml.scores")
    types = field(r, "tokenizer.ggml.token_type")
    if not (len(tokens) == len(scores) == len(types) == cfg["vocab_size"]):
        fail(f"vocabulary: {len(tokens)} tokens, {len(scores)} scores, {len(types)} types, expected {cfg['vocab_size']}")
    if types[cfg["bos_token_id"]] != 3:  # CONTROL
        fail(f"bos token {tokens[cfg['bos_token_id']]!r} has type {types[cfg['bos_token_id']]}, expected 3 (control)")
    provenance = json.loads(field(r, "qat.provenance"))

    names = [t.name for t in r.tensors]
    n_layers = cfg["num_hidden_layers"]
    want_names = ["token_embd.weight", "output_norm.weight"]
    want_names += [f"blk.{l}.{p}.weight" for l in range(n_layers) for p in [*LINEAR, *NORMS]]
    if not cfg.get("tie_word_embeddings", False):
        want_names.append("output.weight")
    if sorted(names) != sorted(want_names):
        fail(f"tensor names {sorted(set(names) ^ set(want_names))} differ from llama.cpp's")

    summary = {"tensors": len(names), "compared": 0, "weights_compared": 0, "bit_equal": 0,
               "requantized_equal": 0, "row_scale_equal": 0, "float_rounded": 0, "types": {}, "quantized_weights": 0, "quantized_bytes": 0,
               "tool": provenance["tool"], "vocab": len(tokens), "alignment": int(r.alignment)}
    for t in r.tensors:
        hf, linear = hf_name(t.name)
        qtype = T(t.tensor_type)
        summary["types"][qtype.name] = summary["types"].get(qtype.name, 0) + 1
        if qtype not in (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q8_0):
            fail(f"{t.name}: type {qtype.name}")
        if t.name == "token_embd.weight" and qtype.name != provenance.get("float_type", "F32"):
            fail(f"{t.name}: type {qtype.name}, but qat.provenance says float_type {provenance.get('float_type')}")
        if "norm" in t.name and qtype != T.F32:
            fail(f"{t.name}: type {qtype.name}, expected F32 for a norm")
        if t.data_offset % r.alignment:
            fail(f"{t.name}: data offset {t.data_offset} not aligned to {r.alignment}")
        value = dequantize(t.data, qtype)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ne0 last, as numpy rows
        value = value.reshape(shape)
        n_head = {"self_attn.q_proj": heads, "self_attn.k_proj": kv_heads}.get(hf.split(".", 3)[-1][:-7])
        if n_head is not None:
            value = unpermute(value, n_head)
        want = expected[hf]
        if want.shape != value.shape:
            fail(f"{t.name}: shape {value.shape}, expected {want.shape} ({hf})")
        if qtype in (T.F16, T.BF16):
            want = dequantize(quantize(want.astype(np.float32), qtype), qtype).reshape(want.shape)
            summary["float_rounded"] += 1
        eq = value.astype(np.float32).view(np.uint32) == want.astype(np.float32).view(np.uint32)
        summary["compared"] += 1
        summary["weights_compared"] += int(eq.size)
        if not eq.all():
            i = np.argwhere(~eq)[0]
            fail(f"{t.name} ({hf}): {int((~eq).sum())} of {eq.size} values differ, first at {tuple(i)}: "
                 f"gguf {value[tuple(i)]!r} vs qat {want[tuple(i)]!r}")
        summary["bit_equal"] += 1
        if qtype not in (T.F32, T.F16, T.BF16):
            master = expected[hf + ".master"]
            if n_head is not None:
                master = permute(master, n_head)
            wq = layer_weight(provenance["scheme"], hf[len("model."):-len(".weight")])
            if wq and wq["format"]["kind"] == "sym_per_channel":
                check_row_scales(t.name, t.data, master, wq["bits"], qtype)
                summary["row_scale_equal"] += 1
            else:
                again = quantize(master, qtype)
                if again.tobytes() != np.asarray(t.data).tobytes():
                    fail(f"{t.name}: bytes differ from gguf.quants.quantize of the master weight")
                summary["requantized_equal"] += 1
            summary["quantized_weights"] += int(value.size)
            summary["quantized_bytes"] += int(t.n_bytes)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
