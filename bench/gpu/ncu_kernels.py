"""Per-kernel GPU time of one process, from Nsight Compute (`make bench-gpu`'s `kernels` stage).

`ncu --metrics gpu__time_duration.sum --csv --log-file FILE CMD...` times every kernel the
command launches (serialized, one replay pass for this single metric; --clock-control none and
--cache-control none keep the card's own clocks and caches). This module finds ncu, runs a
command under it, and folds the CSV into a table: kernels grouped by name (the function name
without its parameter list; templates shortened), launches, total milliseconds and share, largest
first. The CSV is ncu's "details" layout: `==PROF==` message lines, then a header with "Kernel
Name", "Metric Name", "Metric Unit" and "Metric Value" among its columns, one row per kernel and
metric; values may carry thousands separators.

`python3 bench/gpu/ncu_kernels.py --self-test` checks the parser on a sample of that layout;
`python3 bench/gpu/ncu_kernels.py FILE.csv` prints the table of a saved log.
"""

import csv
import glob
import io
import os
import shutil
import subprocess
import sys

METRIC = "gpu__time_duration.sum"
UNIT_SECONDS = {"nsecond": 1e-9, "ns": 1e-9, "usecond": 1e-6, "us": 1e-6, "msecond": 1e-3, "ms": 1e-3,
                "second": 1.0, "s": 1.0}


def find_ncu():
    """The ncu executable: on PATH, else the newest under /opt/nvidia or a CUDA toolkit; None if absent."""
    found = shutil.which("ncu")
    if found:
        return found
    for pattern in ("/opt/nvidia/nsight-compute/*/ncu", "/usr/local/cuda*/bin/ncu", "/usr/local/cuda*/nsight-compute*/ncu"):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[-1]
    return None


def short_name(name, width=90):
    """`void ns::kernel<A, B>(Params)` -> `ns::kernel<A, B>`, cut to `width` characters."""
    name = name.strip()
    if name.startswith("void "):
        name = name[5:]
    depth = 0
    for i, ch in enumerate(name):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            name = name[:i]
            break
    return name if len(name) <= width else name[: width - 3] + "..."


def parse(text):
    """{kernel name: [launches, seconds]} from ncu's CSV log (details layout)."""
    lines = [l for l in text.splitlines() if l.strip() and not l.startswith("==")]
    if not lines:
        raise ValueError("no CSV rows in the ncu log (did ncu profile any kernel?)")
    reader = csv.DictReader(io.StringIO("\n".join(lines)))
    need = {"Kernel Name", "Metric Name", "Metric Unit", "Metric Value"}
    if not need <= set(reader.fieldnames or []):
        raise ValueError(f"ncu CSV header {reader.fieldnames}, expected the columns {sorted(need)}")
    kernels = {}
    for row in reader:
        if row["Metric Name"] != METRIC:
            continue
        unit = row["Metric Unit"].strip()
        if unit not in UNIT_SECONDS:
            raise ValueError(f"unit {unit!r} of {METRIC}, expected one of {sorted(UNIT_SECONDS)}")
        seconds = float(row["Metric Value"].replace(",", "")) * UNIT_SECONDS[unit]
        entry = kernels.setdefault(short_name(row["Kernel Name"]), [0, 0.0])
        entry[0] += 1
        entry[1] += seconds
    if not kernels:
        raise ValueError(f"no {METRIC} values in the ncu log")
    return kernels


def table(kernels, title, per=1, unit="run", top=15):
    """Markdown lines: the `top` kernels by time (per `unit`: totals divided by `per`), then the rest."""
    total = sum(s for _, s in kernels.values())
    launches = sum(n for n, _ in kernels.values())
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][1])
    lines = ["", f"{title}: GPU time per {unit} by kernel (Nsight Compute, kernels serialized): "
                 f"{total / per * 1e3:,.2f} ms in {launches / per:,.0f} launches", "",
             f"| kernel | launches per {unit} | ms per {unit} | share |", "|---|---|---|---|"]
    for name, (n, s) in ranked[:top]:
        lines.append(f"| `{name}` | {n / per:,.0f} | {s / per * 1e3:,.3f} | {s / total:.1%} |")
    rest = ranked[top:]
    if rest:
        n, s = sum(v[0] for _, v in rest), sum(v[1] for _, v in rest)
        lines.append(f"| {len(rest)} other kernels | {n / per:,.0f} | {s / per * 1e3:,.3f} | {s / total:.1%} |")
    return lines


def profile(ncu, cmd, log_path, env, timeout):
    """Runs `cmd` under ncu (CSV into log_path); returns the parsed kernels. Raises on failure."""
    full = [ncu, "--metrics", METRIC, "--clock-control", "none", "--cache-control", "none", "--csv",
            "--log-file", log_path] + cmd
    p = subprocess.run(full, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"exit {p.returncode}: {' '.join(full)}\n{p.stderr[-1500:]}")
    with open(log_path) as f:
        return parse(f.read())


SAMPLE = '''==PROF== Connected to process 4242 (/bench/bin/qat-eval)
==PROF== Profiling "affine_f32" - 0: 0%....50%....100% - 1 pass
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","4242","qat-eval","127.0.0.1","affine_f32","1","7","(1024, 1, 1)","(128, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","usecond","2.50"
"1","4242","qat-eval","127.0.0.1","void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6_tn_align8>(T1::Params)","1","7","(128, 1, 1)","(64, 8, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","msecond","1.25"
"2","4242","qat-eval","127.0.0.1","affine_f32","1","7","(1024, 1, 1)","(128, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","1,500"
"3","4242","qat-eval","127.0.0.1","token_nll_bf16","1","7","(256, 1, 1)","(1023, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","usecond","250.00"
==PROF== Disconnected from process 4242
'''


def self_test():
    k = parse(SAMPLE)
    assert set(k) == {"affine_f32", "cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6_tn_align8>",
                      "token_nll_bf16"}, k
    assert k["affine_f32"][0] == 2 and abs(k["affine_f32"][1] - 4.0e-6) < 1e-15, k["affine_f32"]
    assert abs(k["token_nll_bf16"][1] - 250e-6) < 1e-15
    lines = table(k, "sample", per=2, unit="batch", top=2)
    assert lines[1].endswith("0.75 ms in 2 launches"), lines[1]
    assert lines[5].startswith("| `cutlass::Kernel2<") and "| 0.625 |" in lines[5] and lines[5].endswith("| 83.1% |"), lines[5]
    assert lines[-1] == "| 1 other kernels | 1 | 0.002 | 0.3% |", lines[-1]
    for bad in ("", '"ID","Kernel Name"\n"0","k"\n'):
        try:
            parse(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad!r}")
    # profile(): the command line it gives ncu, through a stand-in that writes SAMPLE to the
    # --log-file and runs the command after ncu's own flags.
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        fake = os.path.join(d, "ncu")
        with open(os.path.join(d, "sample.csv"), "w") as f:
            f.write(SAMPLE)
        with open(fake, "w") as f:
            f.write("#!/usr/bin/env python3\nimport shutil, subprocess, sys\na = sys.argv[1:]\n"
                    "assert a[:9] == ['--metrics', 'gpu__time_duration.sum', '--clock-control', 'none', "
                    "'--cache-control', 'none', '--csv', '--log-file', a[8]], a\n"
                    f"shutil.copy({os.path.join(d, 'sample.csv')!r}, a[8])\n"
                    "sys.exit(subprocess.run(a[9:]).returncode)\n")
        os.chmod(fake, 0o755)
        k2 = profile(fake, ["true"], os.path.join(d, "log.csv"), dict(os.environ), timeout=30)
        assert k2 == k, k2
        try:
            profile(fake, ["false"], os.path.join(d, "log2.csv"), dict(os.environ), timeout=30)
            raise AssertionError("a failing command passed")
        except RuntimeError as e:
            assert "exit 1" in str(e), e
    print("ncu_kernels: self-test passed")


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        self_test()
    elif len(sys.argv) == 2 and os.path.isfile(sys.argv[1]):
        print("\n".join(table(parse(open(sys.argv[1]).read()), sys.argv[1])))
    else:
        sys.exit("usage: ncu_kernels.py --self-test | ncu_kernels.py NCU_LOG.csv")
