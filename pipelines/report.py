#!/usr/bin/env python3
"""Markdown table of FP / RTN / QAT perplexity from qat-eval JSON files (used by llm-qat.mk and
bitdistiller.mk; the latter adds packed sizes and the clip-only baseline)."""
import argparse
import json
import glob
import os


def load(path):
    with open(path) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp", required=True)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--student", nargs=4, action="append", metavar=("SCHEME", "RTN", "QAT", "DIR"), default=[])
    ap.add_argument("--packed", nargs=2, action="append", metavar=("SCHEME", "PACK_JSON"), default=[])
    ap.add_argument("--curriculum", nargs=5, metavar=("SCHEME", "RTN", "QAT", "STAGE_DIRS", "STAGES"),
                    help="a student trained in stages: their directories and scheme:epochs:lr, each space-separated")
    ap.add_argument("--curriculum-from", default="W4A8KV8",
                    help="the student the curriculum started from, or `teacher`")
    ap.add_argument("--clip-only", nargs=2, action="append", metavar=("SCHEME", "EVAL_JSON"), default=[])
    a = ap.parse_args()
    packed = {k: load(v) for k, v in a.packed}
    clip_only = {k: load(v) for k, v in a.clip_only}
    fp = load(a.fp)
    shard_bytes = sum(os.path.getsize(os.path.join(a.shards, f)) for f in os.listdir(a.shards))
    # Totals from the manifests (a resumed qat-sample run's summary counts only what it generated).
    files = [f for m in glob.glob(os.path.join(a.shards, "manifest*.json")) for f in load(m)["files"]]
    sequences, tokens = sum(f["rows"] for f in files), sum(f["tokens"] for f in files)
    print(f"Corpus `{os.path.basename(fp['corpus'])}` ({fp['tokens']} predicted tokens, docs mode, seq-len {fp['seq_len']}); "
          f"shards: {sequences} sequences, {tokens} tokens, {shard_bytes / 1e6:.1f} MB.\n")
    cols = ["scheme", "FP ppl", "RTN ppl (x FP)"]
    if clip_only:
        cols.append("clip-only ppl (x FP)")
    cols += ["QAT ppl (x FP)", "steps", "train tokens", "train wall s"]
    if packed:
        cols += ["packed bits/weight (theory)", "packed MB"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    ratio = lambda e: f"{e['ppl']:.4f} ({e['ppl'] / fp['ppl']:.3f}x)"

    def row(label, scheme, rtn, qat, sdirs):
        """One table row; steps, tokens and wall time summed over the training runs in `sdirs`."""
        provs = [load(os.path.join(d, "provenance.json")) for d in sdirs]
        secs = [load(d.rstrip("/") + ".distill.json")["seconds"] for d in sdirs]
        cells = [label, f"{fp['ppl']:.4f}", ratio(rtn)]
        if clip_only:
            cells.append(ratio(clip_only[scheme]) if scheme in clip_only else "")
        cells += [ratio(qat), str(sum(p["steps"] for p in provs)), str(sum(p["tokens"] for p in provs)), f"{sum(secs):.0f}"]
        if packed:
            p = packed.get(scheme)
            cells += [f"{p['bits_per_weight']:.3f} ({p['bits_per_weight_theory']:.3f})", f"{p['bytes'] / 1e6:.3f}"] if p else ["", ""]
        print("| " + " | ".join(cells) + " |")

    for scheme, rtn_p, qat_p, sdir in a.student:
        row(scheme, scheme, load(rtn_p), load(qat_p), [sdir])
    if a.curriculum:
        scheme, rtn_p, qat_p, sdirs, stages = a.curriculum
        stages = stages.split()
        # Not `scheme`'s clip-only or packed figures: those belong to its one-run student.
        start = "the teacher" if a.curriculum_from == "teacher" else a.curriculum_from
        row(f"{scheme} (curriculum from {start}: {' → '.join(stages)})", None, load(rtn_p), load(qat_p), sdirs.split())
        print(f"\nThe curriculum row sums steps, tokens and wall time over its {len(stages)} stages "
              "(stages are scheme:epochs:lr, each initialized from the previous student).")


if __name__ == "__main__":
    main()
