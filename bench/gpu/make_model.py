"""Writes a randomly initialized Llama model dir for speed benchmarks (`make bench-gpu`).

Speed does not depend on the weights' values, so the GPU benchmark uses the TinyLlama-1.1B
configuration (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads, vocab 32000)
with HF transformers' own initialization (normal, std 0.02), seeded, and the Llama-2 tokenizer
that TinyLlama uses. `--config tiny` is a 2-layer model with the same tokenizer, for the CPU smoke
test of the harness. Writes config.json (same keys as shared/data/models/stories260K), one
model.safetensors (names as HF saves them, in --dtype) and the tokenizer files, atomically
(a *.tmp dir renamed into place); an existing OUT is kept.
"""

import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

CONFIGS = {
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
}
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32, "f16": torch.float16}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="tinyllama")
    ap.add_argument("--tokenizer", required=True, help="dir with tokenizer.json + tokenizer_config.json (llama2-tokenizer)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the stored weights")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to initialize")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if os.path.isfile(os.path.join(a.out, "model.safetensors")):
        print(f"make_model: {a.out} exists, kept")
        return
    c = CONFIGS[a.config]
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", **c,
               head_dim=c["hidden_size"] // c["num_attention_heads"], rms_norm_eps=1e-5, rope_theta=10000.0,
               hidden_act="silu", tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=None, initializer_range=0.02,
               torch_dtype={"bf16": "bfloat16", "f32": "float32", "f16": "float16"}[a.dtype], use_cache=True)
    torch.manual_seed(a.seed)
    with torch.device(a.device):
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    state = {k: v.detach().to(DTYPES[a.dtype]).contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = a.out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(a.tokenizer, name), os.path.join(tmp, name))
    os.rename(tmp, a.out)
    n = sum(v.numel() for v in state.values())
    print(f"make_model: {a.out}: {a.config}, {n:,} parameters, {a.dtype}")


if __name__ == "__main__":
    main()
