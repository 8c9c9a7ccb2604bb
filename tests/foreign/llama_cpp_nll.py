#!/usr/bin/env python3
"""Perplexity of a qat GGUF file computed by llama.cpp itself (llama-cpp-python: llama.cpp's own
loader, tokenizer and CPU kernels), in qat-eval's `docs` convention, independently of qat.

The corpus is split at the delimiter, each document trimmed and empty ones dropped; each is
tokenized by llama.cpp from the file's vocabulary, BOS prepended, truncated to --seq-len tokens;
every token after BOS is predicted. llama.cpp evaluates each document in one batch from an empty
KV cache (positions 0..len-1) and returns the logits of every position; the NLL is computed from
them in float64. With --ids IDS_JSON (token-id lists as qat-eval tokenizes them), the script
also checks that llama.cpp's tokenization of the documents gives exactly those ids, and exits 1
naming the first document that differs; with --score-ids as well it instead scores the given ids
(the model's arithmetic on qat's tokens) and lists the documents llama.cpp tokenizes differently.
(llama.cpp's SentencePiece tokenizer does not collapse runs of spaces, which tokenizers with
`remove_extra_whitespaces`, such as stories260K's, do.)

--kv-cache: the KV cache's type, f16 (llama.cpp's default, what its users get) or f32. Its f16
rounding moves the NLL by a few 1e-4 either way (stories260K, 20 documents: from -4.8e-4 to
+7.1e-4 relative, depending on the file); with f32 only the weights and llama.cpp's 8-bit
activation blocks differ from qat-eval (F32 files within 1e-7, block files up to +2.3e-4), which
is what the CI test compares.

Prints {"tokens": N, "nll": mean NLL, "ppl": exp(nll), "docs": D, "llama_cpp": version,
"tokenization_equal": true|false|null, "tokenized_differently": [document indices]}.

Usage: llama_cpp_nll.py FILE CORPUS [--limit N] [--seq-len L] [--delimiter S] [--ids IDS_JSON
                        [--score-ids]] [--threads T] [--kv-cache f16|f32]
"""

import argparse
import json
import math
import sys

import llama_cpp
import numpy as np


def documents(path, delimiter, limit):
    text = open(path, encoding="utf-8").read()
    docs = [d.strip() for d in text.split(delimiter)]
    docs = [d for d in docs if d]
    return docs[:limit] if limit is not None else docs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("file")
    p.add_argument("corpus")
    p.add_argument("--limit", type=int)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--delimiter", default="<|endoftext|>")
    p.add_argument("--ids")
    p.add_argument("--score-ids", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-cache", choices=["f16", "f32"], default="f16")
    a = p.parse_args()

    kv = llama_cpp.GGML_TYPE_F32 if a.kv_cache == "f32" else llama_cpp.GGML_TYPE_F16
    llm = llama_cpp.Llama(model_path=a.file, n_ctx=a.seq_len, n_batch=a.seq_len, n_ubatch=a.seq_len,
                          logits_all=True, n_threads=a.threads, n_threads_batch=a.threads,
                          type_k=kv, type_v=kv, verbose=False)
    bos = llm.token_bos()
    seqs = []
    for d in documents(a.corpus, a.delimiter, a.limit):
        ids = [bos] + llm.tokenize(d.encode("utf-8"), add_bos=False, special=False)
        seqs.append(ids[: a.seq_len])
    seqs = [s for s in seqs if len(s) >= 2]

    equal, differ = None, []
    if a.ids:
        expected = json.load(open(a.ids))
        if len(expected) != len(seqs):
            sys.exit(f"llama_cpp_nll.py: {a.ids} holds {len(expected)} sequences, llama.cpp made {len(seqs)}")
        for i, (x, y) in enumerate(zip(expected, seqs)):
            if x != y:
                if not a.score_ids:
                    sys.exit(f"llama_cpp_nll.py: llama.cpp tokenizes document {i} differently from qat: "
                             f"{y[:16]}... vs {x[:16]}... ({len(y)} vs {len(x)} ids)")
                differ.append(i)
        equal = not differ
        if a.score_ids:
            seqs = expected

    total, count = 0.0, 0
    for ids in seqs:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)  # [len, vocab]
        m = logits.max(axis=1, keepdims=True)
        logz = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))[:-1]
        target = logits[np.arange(len(ids) - 1), ids[1:]]
        total += float((logz - target).sum())
        count += len(ids) - 1
    nll = total / count
    print(json.dumps({"tokens": count, "nll": nll, "ppl": math.exp(nll), "docs": len(seqs),
                      "llama_cpp": llama_cpp.__version__, "kv_cache": a.kv_cache, "tokenization_equal": equal,
                      "tokenized_differently": differ}))


if __name__ == "__main__":
    main()
