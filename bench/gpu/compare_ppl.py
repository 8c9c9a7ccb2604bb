"""Compares the stories260K perplexities of a `make pipeline-gpu` run with the CPU ones.

    compare_ppl.py GPU_EVAL_DIR [CPU_EVAL_DIR]

FP and RTN evaluate the same weights, so GPU and CPU must agree to float rounding (|rel| < 1e-4);
their CPU values come from CPU_EVAL_DIR (fp.json, rtn-*.json: bench/gpu/run.sh evaluates them
with the same binary on the CPU), else from README.md. QAT students train on shards the GPU
sampled itself (other rounding, so other samples); they must agree with README.md's CPU students
of `make pipeline` as it is now (TinyStories-valid.first800, docs mode, seq-len 512; clipping
init with --include-qk, --balance-kv 64, 1 epoch, lr 2e-4) within run-to-run noise (|rel| < 3%;
two CPUs differ by ~1%). The values below are the first row of each scheme in README's LLM-QAT
table (tests/gpu_reference.rs keeps them equal). Prints a Markdown table; exit 1 if a check fails.
"""

import glob
import json
import os
import sys

CPU = {"fp": 4.4685, "rtn-W4": 5.2983, "rtn-W4A8KV8": 5.3265, "rtn-W4A8KV4": 22.1578,
       "qat-W4": 4.6600, "qat-W4A8KV8": 4.6545, "qat-W4A8KV4": 6.4332}


def main():
    d = sys.argv[1]
    if len(sys.argv) > 2:  # this run's CPU evaluations replace README's FP and RTN values
        for key in list(CPU):
            path = os.path.join(sys.argv[2], key + ".json")
            if not key.startswith("qat-") and os.path.isfile(path):
                CPU[key] = json.load(open(path))["ppl"]
    found = {}
    for path in sorted(glob.glob(os.path.join(d, "*.json"))):
        name = os.path.basename(path)[: -len(".json")]
        key = "qat-" + name.rsplit("-", 1)[-1] if name.startswith("qat-") else name
        if key in CPU:
            found[key] = (json.load(open(path)), name)
    ok = True
    print("| model | GPU ppl | CPU ppl | rel. diff | check |\n|---|---|---|---|---|")
    for key, cpu in CPU.items():
        if key not in found:
            print(f"| {key} | missing | {cpu} | | **FAIL** |")
            ok = False
            continue
        (j, name) = found[key]
        rel = j["ppl"] / cpu - 1
        tol = 1e-4 if not key.startswith("qat-") else 0.03
        good = abs(rel) < tol
        ok &= good
        print(f"| {name} ({j.get('device', 'cpu')}, {j.get('dtype', 'f32')}) | {j['ppl']:.4f} | {cpu:.4f} | {rel:+.2e} | "
              f"{'ok' if good else '**FAIL**'} (tol {tol:g}) |")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
