#!/usr/bin/env python3
"""Runs a qat GGUF file the way llama.cpp does, independently of qat: weights from llama.cpp's own
`gguf` package (GGUFReader + gguf.quants.dequantize), architecture from the file's metadata, and
llama.cpp's conventions for `llama`: RMSNorm, RoPE rotating adjacent pairs (LLAMA_ROPE_TYPE_NORM,
on the q/k rows as the file stores them, i.e. after convert_hf_to_gguf's permutation), grouped
query attention (query head h reads kv head h // (heads / kv_heads)), SwiGLU, output =
token_embd when output.weight is absent. In float64 with numpy; no activation quantization.

IDS is a JSON list of token-id sequences (each starting with BOS); every token after the first
is predicted. Prints {"tokens": N, "nll": mean negative log-likelihood}.

Usage: gguf_forward.py FILE IDS_JSON
"""

import json
import math
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def main():
    r = GGUFReader(sys.argv[1])
    seqs = json.load(open(sys.argv[2]))
    f = lambda k: r.get_field(k).contents()  # noqa: E731
    w = {t.name: dequantize(t.data, t.tensor_type)
         .reshape(tuple(int(d) for d in reversed(t.shape.tolist()))).astype(np.float64)
         for t in r.tensors}
    layers, heads, kv_heads = f("llama.block_count"), f("llama.attention.head_count"), f("llama.attention.head_count_kv")
    eps, base, hd = f("llama.attention.layer_norm_rms_epsilon"), f("llama.rope.freq_base"), f("llama.rope.dimension_count")
    emb = w["token_embd.weight"]
    out_w = w.get("output.weight", emb)

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    def rope(x):  # x: [T, heads, hd]; pairs (2i, 2i+1) rotate by pos * base^(-2i/hd)
        t = x.shape[0]
        theta = np.arange(t)[:, None] * base ** (-2.0 * np.arange(hd // 2) / hd)[None, :]
        c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
        y = np.empty_like(x)
        y[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
        y[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
        return y

    def forward(ids):
        t = len(ids)
        x = emb[ids]
        mask = np.triu(np.full((t, t), -np.inf), 1)
        for l in range(layers):
            p = f"blk.{l}."
            h = rms(x, w[p + "attn_norm.weight"])
            q = rope((h @ w[p + "attn_q.weight"].T).reshape(t, heads, hd))
            k = rope((h @ w[p + "attn_k.weight"].T).reshape(t, kv_heads, hd))
            v = (h @ w[p + "attn_v.weight"].T).reshape(t, kv_heads, hd)
            o = np.empty((t, heads, hd))
            for hh in range(heads):
                kv = hh // (heads // kv_heads)
                a = q[:, hh] @ k[:, kv].T / math.sqrt(hd) + mask
                a = np.exp(a - a.max(-1, keepdims=True))
                o[:, hh] = (a / a.sum(-1, keepdims=True)) @ v[:, kv]
            x = x + o.reshape(t, heads * hd) @ w[p + "attn_output.weight"].T
            h = rms(x, w[p + "ffn_norm.weight"])
            g = h @ w[p + "ffn_gate.weight"].T
            x = x + ((g / (1 + np.exp(-g))) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
        return rms(x, w["output_norm.weight"]) @ out_w.T

    nll, n = 0.0, 0
    for ids in seqs:
        z = forward(np.array(ids))
        lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
        nll -= float((z[np.arange(len(ids) - 1), ids[1:]] - lse[:-1]).sum())
        n += len(ids) - 1
    print(json.dumps({"tokens": n, "nll": nll / n}))


if __name__ == "__main__":
    main()
