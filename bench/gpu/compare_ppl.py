"""Compares the stories260K perplexities of a `make pipeline-gpu` run with the CPU ones.

The CPU values are README.md's (`make pipeline` on the 2-core CPU machine, 2026-11-23: dev corpus
TinyStories-valid.first800, docs mode, seq-len 512; students 1 epoch, lr 1e-3, --balance-kv 64).
FP and RTN evaluate the same weights, so they must agree to float rounding (|rel| < 1e-4); QAT
students train on shards the GPU sampled itself (other rounding, so other samples) and must agree
within run-to-run noise (here: |rel| < 3%). Prints a Markdown table; exit 1 if a check fails.
"""

import glob
import json
import os
import sys

CPU = {"fp": 4.4685, "rtn-W4": 5.2983, "rtn-W4A8KV8": 5.3273, "rtn-W4A8KV4": 22.1429,
       "qat-W4": 4.7881, "qat-W4A8KV8": 4.7881, "qat-W4A8KV4": 5.9159}


def main():
    d = sys.argv[1]
    found = {}
    for path in sorted(glob.glob(os.path.join(d, "*.json"))):
        name = os.path.basename(path)[: -len(".json")]
        key = "qat-" + name.rsplit("-", 1)[-1] if name.startswith("qat-") else name
        if key in CPU:
            found[key] = (json.load(open(path)), name)
    ok = True
    print("| model | GPU ppl | CPU ppl (README) | rel. diff | check |\n|---|---|---|---|---|")
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
        print(f"| {name} ({j.get('device', 'cpu')}, {j.get('dtype', 'f32')}) | {j['ppl']:.4f} | {cpu} | {rel:+.2e} | "
              f"{'ok' if good else '**FAIL**'} (tol {tol:g}) |")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
