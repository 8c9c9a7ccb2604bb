#!/usr/bin/env python3
"""Markdown table of FP / RTN / QAT perplexity from qat-eval JSON files (used by llm-qat.mk)."""
import argparse
import json
import os


def load(path):
    with open(path) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp", required=True)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--student", nargs=4, action="append", metavar=("SCHEME", "RTN", "QAT", "DIR"), default=[])
    a = ap.parse_args()
    fp = load(a.fp)
    shard_bytes = sum(os.path.getsize(os.path.join(a.shards, f)) for f in os.listdir(a.shards))
    summary = load(a.shards + ".summary.json")
    print(f"Corpus `{os.path.basename(fp['corpus'])}` ({fp['tokens']} predicted tokens, docs mode, seq-len {fp['seq_len']}); "
          f"shards: {summary['sequences']} sequences, {summary['tokens']} tokens, {shard_bytes / 1e6:.1f} MB.\n")
    print("| scheme | FP ppl | RTN ppl (x FP) | QAT ppl (x FP) | steps | train tokens | train wall s |")
    print("|---|---|---|---|---|---|---|")
    for scheme, rtn_p, qat_p, sdir in a.student:
        rtn, qat = load(rtn_p), load(qat_p)
        prov = load(os.path.join(sdir, "provenance.json"))
        dist = load(sdir.rstrip("/") + ".distill.json")
        print(f"| {scheme} | {fp['ppl']:.4f} | {rtn['ppl']:.4f} ({rtn['ppl'] / fp['ppl']:.3f}x) | "
              f"{qat['ppl']:.4f} ({qat['ppl'] / fp['ppl']:.3f}x) | {prov['steps']} | {prov['tokens']} | {dist['seconds']:.0f} |")


if __name__ == "__main__":
    main()
