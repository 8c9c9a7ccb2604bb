"""`make bench-gpu`: qat's CUDA binaries against PyTorch on the same GPU, in one run, one table.

Model: a random-initialized Llama with the TinyLlama-1.1B config (bench/gpu/make_model.py; speed
does not depend on the values) and the Llama-2 tokenizer. Every stage runs the qat binary and its
PyTorch reference (bench/hf_generate.py, bench/torch_qat.py, bench/hf_forward.py, the same scripts
`make bench` uses on CPU, here with --device cuda --dtype bf16) on the same shapes:

  sample   qat-sample vs HF generate: batch 64, 512 new tokens, T=1, top-64 log-probs kept
  sample-host  the same with QAT_CUDA_FUSED_SAMPLE=0: log-softmax, top-64 and the draw on the host
           from each step's copied logits instead of in crates/sample/kernels/sample_rows.cu
  distill  qat-distill W4A8KV4 from cached top-64 shards vs torch_qat.py with an online teacher,
           seq 1024 (shards sampled by qat-sample first), AdamW; steady-state steps only
  distill-teacher  qat-distill --teacher (online teacher, full-vocab FKL), for goal 3
  eval     qat-eval vs HF forward: perplexity of the TinyStories file, stream mode, 1024 tokens
  eval-flash  the same with QAT_CUDA_FLASH_ATTENTION=1: qat's flash-attention kernel
           (crates/model/kernels/flash_attention.cu, opt-in until measured here); its NLL must
           equal the eval row's within bf16 rounding
  distill-flash  the distill row's qat side with the flash kernels (forward and backward), after
           eval-flash
  sample-flash  the sample row's qat side with QAT_CUDA_FLASH_ATTENTION=1: prefill and every
           decoding step through the flash kernel (one block per kv head's query heads) instead of
           two matmuls and the masked softmax
  distill-accum  the distill row with gradient accumulation on both sides (--grad-accum 4: four
           micro-batches of the distill row's batch per optimizer step): the per-step costs
           (AdamW, the gradient norm) spread over 4x the tokens, and qat's in-place gradient sums
  distill-bitdistiller  qat-distill with BitDistiller's quantizer and loss (W2G64: 2-bit asymmetric
           groups of 64 with the min/max gradient, CAKLD; W2CH, per channel, in the smoke test),
           its group kernels (kernels/asym_group.cu) and the composed ops (QAT_CUDA_FUSED_ASYM=0),
           vs torch_qat.py with BitDistiller's quantizer and CAKLD, both from the cached shards
  sample-alloc  the sample row's qat side with cudarc's and CUDA's allocation defaults
           (QAT_CUDA_SKIP_ALLOC_EVENTS=0 QAT_CUDA_KEEP_FREED_MEMORY=0: two CUDA events made and
           destroyed per buffer, and the memory pool handing freed memory back to the driver at
           every synchronization), what qat_model::tune_cuda_allocations gains where decoding
           waits on the host
  distill-composed  the distill row's qat side with the fused training ops off (RMSNorm, SwiGLU,
           RoPE, the masked softmax, the top-K loss and the gradient norm as composed candle ops,
           QAT_CUDA_FUSED_*=0): what they gain, and the loss they must match
  profile  where the time goes (`--profile`: each phase timed with the device synchronized
           around it): qat-distill from cached shards, with the online teacher, and without fake
           quantization (scheme FP), same batch; qat-sample and qat-eval at the shapes above;
           more tables, seconds per step or batch and shares
  kernels  GPU time by kernel (Nsight Compute, bench/gpu/ncu_kernels.py): qat-sample (16 decode
           steps at the sample row's batch), qat-eval (one batch, composed and flash attention) and
           qat-distill W4A8KV4 (2 steps at the distill row's batch); the 15 largest kernels of
           each, for the next round of tuning (GPU only)

qat's fixed costs (process start, model load, PTX JIT, cuBLAS init) are excluded the way HF's
warm-up is excluded on the PyTorch side: qat-sample and qat-eval run twice, with N and 2N
sequences, and tokens/s is the difference (extra tokens / extra seconds; tokenizing the corpus
cancels out too, so HF forward's rate is over its batches alone); qat-distill's rate comes
from its steps after the warm-up ones (train_log.jsonl). A qat-sample run of 8 tokens first
JIT-compiles candle's PTX for the GPU (cached by the driver for later processes).
Peak GPU memory: nvidia-smi's used memory, polled every 0.1 s while a process runs, minus what
was used before it started (both sides; PyTorch's torch.cuda.max_memory_allocated is in the
JSON). MFU = FLOPs per token x tokens/s / peak bf16 dense FLOP/s (989 TFLOP/s for an H100 SXM;
BENCH_PEAK_TFLOPS overrides): 6N for training (the student's forward + backward; an online
teacher's 2N is not counted), 2N for sampling and evaluation; N = all parameters.

BENCH_GPU_SMOKE=1 (or --smoke): the same pipeline on the CPU with a 2-layer random model and tiny
shapes, to test the harness without a GPU (no RESULTS.md entry).
Stages run in the order --stages lists them (bench/gpu/session.sh puts the goals' rows first).
Prints a Markdown table; writes results.json and table.md (into --results, default WORK) after
every stage, and with --record appends the table to bench/RESULTS.md. --deadline-s N starts no
stage after N seconds (default 480 on a GPU, so that a run stays within the issue's 10 minutes;
0: no limit), and the table still comes out, listing what was skipped.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import ncu_kernels  # noqa: E402 - bench/gpu/ncu_kernels.py, beside this file
BENCH = os.path.dirname(HERE)
PY = sys.executable
# qat_model::tune_cuda_allocations' switches (README.md, CUDA): `=0` restores cudarc's and CUDA's defaults.
ALLOC_SWITCHES = ("QAT_CUDA_SKIP_ALLOC_EVENTS", "QAT_CUDA_KEEP_FREED_MEMORY")

FULL = dict(config="tinyllama", device="cuda", dtype="bf16", sample_batch=64, sample_new=512, seq_len=1024,
            distill_batch=4, distill_steps=10, distill_warmup=3, distill_accum=4, shard_seqs=64, eval_windows=48,
            eval_batch=16, profile_steps=3, bitdistiller_scheme="W2G64")
SMOKE = dict(config="tiny", device="cpu", dtype="f32", sample_batch=8, sample_new=32, seq_len=128,
             distill_batch=2, distill_steps=3, distill_warmup=2, distill_accum=2, shard_seqs=16, eval_windows=8,
             eval_batch=4, profile_steps=2, bitdistiller_scheme="W2CH")


class MemPoll:
    """Peak of a process's memory while it runs: GPU memory used (nvidia-smi) or host RSS."""

    def __init__(self, gpu):
        self.gpu, self.peak, self.base, self.stop, self.pid = gpu, 0.0, self.read(None) if gpu else 0.0, False, None

    def read(self, pid):
        if self.gpu:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True).stdout
            return float(out.split()[0]) if out.strip() else 0.0
        try:  # host: resident set of the process, MiB
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except (OSError, TypeError):
            pass
        return 0.0

    def loop(self):
        while not self.stop:
            self.peak = max(self.peak, self.read(self.pid) - self.base)
            time.sleep(0.1)


def run(cmd, env, log, gpu):
    """Runs cmd; returns (stdout, peak memory MiB, wall s). Exits the harness on failure."""
    poll = MemPoll(gpu)
    t0 = time.time()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    poll.pid = p.pid
    th = threading.Thread(target=poll.loop, daemon=True)
    th.start()
    out, err = p.communicate()
    poll.stop = True
    th.join()
    wall = time.time() - t0
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n--- stdout\n" + out + "--- stderr\n" + err)
    if p.returncode != 0:
        # The whole stderr is searched: a backtrace after the message could push it out of the tail.
        oom = "out of memory" in err.lower() or "out_of_memory" in err.lower()
        raise RuntimeError(f"exit {p.returncode}{' (out of memory)' if oom else ''}: {' '.join(cmd)}\n{err[-2000:]}")
    return out, poll.peak, wall


def last_json(stdout):
    return json.loads([l for l in stdout.splitlines() if l.startswith("{")][-1])


def distill_steady(log_path, warmup):
    """Steady-state tokens/s of qat-distill from train_log.jsonl (steps after `warmup`)."""
    lines = [json.loads(l) for l in open(log_path)]
    prev, toks, secs = 0, 0, 0.0
    for l in lines:
        step_tokens, prev = l["tokens"] - prev, l["tokens"]
        if l["step"] > warmup:
            toks += step_tokens
            secs += step_tokens / l["tokens_per_s"]
    return toks / secs


def n_params(model_dir):
    from safetensors import safe_open
    with safe_open(os.path.join(model_dir, "model.safetensors"), "np") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", required=True, help="dir with the qat-* binaries (CUDA build; CPU build for --smoke)")
    ap.add_argument("--data", required=True, help="QAT_DATA: models/llama2-tokenizer, corpora/tinystories")
    ap.add_argument("--work", default=os.path.join(BENCH, "work-gpu"))
    ap.add_argument("--smoke", action="store_true", default=os.environ.get("BENCH_GPU_SMOKE", "") not in ("", "0"))
    ap.add_argument("--stages", default="sample,sample-host,distill,distill-teacher,eval,eval-flash,distill-flash,sample-flash,distill-composed,"
                                        "distill-accum,distill-bitdistiller,sample-alloc,profile,kernels")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    ap.add_argument("--results", default=None,
                    help="dir for results.json and table.md, rewritten after every stage (default: WORK); "
                         "e.g. the device tool's $OUT, so that a run it stops still returns them")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="start no stage after this many seconds of the run (0: no limit; default 480 on a GPU, "
                         "so that the whole run ends within 10 minutes, and 0 with --smoke); skipped stages "
                         "are listed in the table, so a run under a device time limit ends with a table")
    for k, v in FULL.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=None, help=f"default {v} ({SMOKE[k]} with --smoke)")
    a = ap.parse_args()
    stages = a.stages.split(",")
    known = {"sample", "sample-host", "distill", "distill-teacher", "eval", "eval-flash", "distill-flash",
             "sample-flash", "distill-composed", "distill-accum", "distill-bitdistiller", "sample-alloc", "profile",
             "kernels"}
    if set(stages) - known:
        sys.exit(f"bench_gpu.py: unknown stages {sorted(set(stages) - known)}; known: {sorted(known)}")
    if a.deadline_s is None:
        a.deadline_s = 0 if a.smoke else 480
    c = dict(SMOKE if a.smoke else FULL)
    c.update({k: getattr(a, k) for k in FULL if getattr(a, k) is not None})
    gpu = c["device"].startswith("cuda")
    peak_flops = float(os.environ.get("BENCH_PEAK_TFLOPS", "989")) * 1e12
    work = os.path.abspath(a.work)
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    bins = {n: os.path.join(os.path.abspath(a.bin), n) for n in ("qat-sample", "qat-distill", "qat-eval")}
    # RUST_LIB_BACKTRACE=0: candle errors without a captured backtrace, whatever RUST_BACKTRACE is.
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               RUST_LIB_BACKTRACE="0")
    dev = ["--device", c["device"], "--dtype", c["dtype"]]
    threads = str(os.cpu_count() or 1)  # PyTorch's CPU threads (host-side work on a GPU run)
    say = lambda msg: print(f"bench-gpu: {msg}", file=sys.stderr, flush=True)
    started = time.time()

    # The model (kept between runs) and its size.
    model = os.path.join(work, f"model-{c['config']}")
    subprocess.run([PY, os.path.join(HERE, "make_model.py"), "--config", c["config"], "--out", model,
                    "--tokenizer", os.path.join(a.data, "models/llama2-tokenizer"),
                    "--device", "cuda" if gpu else "cpu"], env=env, check=True)
    N = n_params(model)
    corpus = os.path.abspath(os.path.join(a.data, "corpora/tinystories/TinyStories-valid.first800.txt"))
    fresh = lambda d: (shutil.rmtree(d, ignore_errors=True), shutil.rmtree(d + ".work", ignore_errors=True), d)[2]

    def qat_sample(tag, n, new, batch, keep=False, run_env=None):
        out = fresh(os.path.join(work, f"shards-{tag}"))
        stdout, mem, wall = run([bins["qat-sample"], "-m", model, "-o", out, "-n", str(n), "--max-len", str(new + 2),
                                 "-K", "64", "-b", str(batch), "-q"] + dev, run_env or env,
                                os.path.join(logs, f"sample-{tag}.log"), gpu)
        j = last_json(stdout)
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
        return j, mem, wall, out

    # Warm-up: the driver JIT-compiles candle's PTX once per machine (cached afterwards).
    say("warm-up (PTX JIT)")
    qat_sample("warmup", 2, 6, 2)
    results, rows = {}, []

    def row(stage, label, q, t, flops_per_token, notes):
        ratio = q["tps"] / t["tps"] if t and t.get("tps") else None
        mfu = lambda r: flops_per_token * r["tps"] / peak_flops if gpu and r else None
        results[stage] = dict(qat=q, torch=t, ratio=ratio, label=label, notes=notes)
        fmt = lambda x, f: "-" if x is None else f.format(x)
        rows.append(f"| {label} | {fmt(q['tps'], '{:,.0f}')} | {fmt(t and t['tps'], '{:,.0f}')} | {fmt(ratio, '**{:.2f}x**')} | "
                    f"{fmt(mfu(q), '{:.1%}')} / {fmt(mfu(t), '{:.1%}')} | {fmt(q['mem'], '{:,.0f}')} / {fmt(t and t['mem'], '{:,.0f}')} MiB | {notes} |")
        say(rows[-1])

    def torch_side(script, args, tag):
        stdout, mem, wall = run([PY, os.path.join(BENCH, script)] + args + dev, env, os.path.join(logs, f"{tag}-torch.log"), gpu)
        j = last_json(stdout)
        return dict(j, tps=j["tokens_per_s"], mem=mem, wall=wall)

    failed = {}

    head = ["| stage | qat tokens/s | PyTorch tokens/s | ratio | MFU qat / PyTorch | peak memory qat / PyTorch | notes |",
            "|---|---|---|---|---|---|---|"]
    dev_name = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout.strip() if gpu else "cpu (smoke test)"
    chosen = {"batch": c["distill_batch"]}

    results_dir = os.path.abspath(a.results or work)
    os.makedirs(results_dir, exist_ok=True)
    skipped = []
    profile_table = []

    # Fused kernels switched off for the whole run (QAT_CUDA_FUSED_*=0: by hand, or by run.sh
    # after their CUDA test failed on this GPU); the rows that turn switches off themselves
    # (sample-host, distill-composed) are on top of these.
    switches_off = sorted(k for k, v in os.environ.items()
                          if (k.startswith("QAT_CUDA_FUSED_") or k in ALLOC_SWITCHES or k == "QAT_CUDA_FLASH_ATTENTION")
                          and v == "0")
    switches_note = ([f"\nFused kernels off for the whole run: {', '.join(switches_off)}."] if switches_off else [])

    def save():
        """Writes results.json and table.md as they stand (after every stage, so that a
        run stopped by a device time limit keeps what it measured)."""
        meta = dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), device=dev_name, params=N, config=c, smoke=a.smoke,
                    seconds=time.time() - started, peak_tflops=peak_flops / 1e12, distill_batch_run=chosen["batch"],
                    failed=failed, skipped=skipped, stages_done=[r for r in stages if r in results or r in failed],
                    switches_off=switches_off)
        with open(os.path.join(results_dir, "results.json"), "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)
        with open(os.path.join(results_dir, "table.md"), "w") as f:
            f.write("\n".join(head + rows + switches_note + profile_table) + "\n")
        return meta

    def past_deadline(what):
        """Whether --deadline-s has passed (then `what` is not started, and says so); the
        reason, or None."""
        elapsed = time.time() - started
        if a.deadline_s and elapsed > a.deadline_s:
            why = f"{elapsed:.0f} s into the run, past --deadline-s {a.deadline_s:.0f}"
            say(f"{what} SKIPPED: {why}")
            return why
        return None

    def attempt(stage, fn):
        """Runs one stage; a failure is reported in the table instead of ending the run."""
        why = past_deadline(stage)
        if stage.endswith("-flash") and os.environ.get("QAT_CUDA_FLASH_ATTENTION") == "0":
            # run.sh found the flash kernels' CUDA test failing: their timings would mean nothing.
            why = "QAT_CUDA_FLASH_ATTENTION=0 (the flash kernels' CUDA test failed)"
        if why:
            skipped.append(stage)
            rows.append(f"| {stage} | skipped | | | | | not started: {why} |")
            save()
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - any failure of a stage is reported, the rest still runs
            failed[stage] = str(e)
            say(f"{stage} FAILED: {str(e)[-1500:]}")
            rows.append(f"| {stage} | failed | | | | | {str(e).splitlines()[0][:200]} (log: {logs}) |")
        save()

    B, new = c["sample_batch"], c["sample_new"]

    def qat_sample_rate(tag, run_env=None):
        """qat-sample's steady rate: B and 2B sequences, extra tokens / extra seconds."""
        j1, m1, _, _ = qat_sample(f"{tag}1", B, new, B, run_env=run_env)
        j2, m2, _, _ = qat_sample(f"{tag}2", 2 * B, new, B, run_env=run_env)
        secs = lambda j: j["generated_tokens"] / j["tokens_per_s"]
        return dict(tps=(j2["generated_tokens"] - j1["generated_tokens"]) / (secs(j2) - secs(j1)), mem=max(m1, m2),
                    single_run_tps=j2["tokens_per_s"], generated=j2["generated_tokens"] - j1["generated_tokens"])

    def hf_generate():
        if "sample" in results and results["sample"]["torch"]:
            return results["sample"]["torch"]
        return torch_side("hf_generate.py", ["--model", model, "--num-seqs", str(B), "--batch", str(B), "--new-tokens",
                                             str(new), "-K", "64", "--threads", threads], "sample")

    def stage_sample():
        say(f"sample: qat-sample {B} and {2 * B} sequences of {new} new tokens, HF generate {B}")
        q = qat_sample_rate("t")
        where = "GPU" if gpu else "host"  # the sampling kernel runs on CUDA only
        row("sample", f"sample: batch {B}, {new} new tokens, T=1, top-64 log-probs", q, hf_generate(), 2 * N,
            f"qat incl. top-64 + draw on the {where} + Parquet; its one-process rate {q['single_run_tps']:,.0f}/s")

    def stage_sample_alloc():
        say("sample-alloc: qat-sample with " + " ".join(f"{k}=0" for k in ALLOC_SWITCHES)
            + " (cudarc's per-buffer events, CUDA's pool trimmed at every synchronization)")
        q = qat_sample_rate("a", dict(env, **{k: "0" for k in ALLOC_SWITCHES}))
        base = results.get("sample", {}).get("qat")
        row("sample-alloc", "sample as above, qat with the allocation defaults (" + ", ".join(f"{k}=0" for k in ALLOC_SWITCHES)
            + ")", q, hf_generate(), 2 * N, f"the sample row's qat runs {base['tps'] / q['tps']:.2f}x this" if base else "")

    def stage_sample_host():
        say("sample-host: qat-sample with QAT_CUDA_FUSED_SAMPLE=0 (log-softmax, top-64 and the draw on the host)")
        q = qat_sample_rate("h", dict(env, QAT_CUDA_FUSED_SAMPLE="0"))
        base = results.get("sample", {}).get("qat")
        row("sample-host", "sample as above, qat's top-64 + draw on the host (QAT_CUDA_FUSED_SAMPLE=0)", q,
            hf_generate(), 2 * N, f"the sample row's qat runs {base['tps'] / q['tps']:.2f}x this" if base else "")


    L, DB = c["seq_len"], c["distill_batch"]
    steps, warm = c["distill_steps"], c["distill_warmup"]
    need = (steps + warm) * DB
    shards = os.path.join(work, f"shards-distill-{L}")

    def stage_shards():
        n = max(c["shard_seqs"], need)  # (rows are reused when the batches wrap around)
        say(f"shards: qat-sample {n} sequences of {L} tokens (top-64) for qat-distill and torch_qat.py")
        j, _, wall, _ = qat_sample(f"distill-{L}", n, L - 2, min(64, n), keep=True)  # BOS + start + L-2
        say(f"shards: {j['generated_tokens']:,} tokens in {wall:.0f} s ({j['tokens_per_s']:,.0f} tokens/s)")


    def qat_distill(tag, extra, DB, scheme="W4A8KV4", n_steps=None, run_env=None):
        out = fresh(os.path.join(work, f"student-{tag}"))
        stdout, mem, wall = run([bins["qat-distill"], "-m", model, "-s", shards, "-o", out, "--scheme", scheme,
                                 "-b", str(DB), "--steps", str(n_steps or steps + warm), "--warmup-steps", "1",
                                 "--checkpoint-every", "0", "-q"] + extra + dev, run_env or env,
                                os.path.join(logs, f"distill-{tag}.log"), gpu)
        j = last_json(stdout)
        tps = distill_steady(os.path.join(out, "train_log.jsonl"), warm) if n_steps is None else None
        shutil.rmtree(out, ignore_errors=True)
        return dict(tps=tps, mem=mem, wall=wall, final_loss=j["final_loss"], profile=j.get("profile"))

    targs = lambda DB: ["--model", model, "--shards", shards, "--batch", str(DB), "--steps", str(steps),
                        "--warmup", str(warm), "--threads", threads, "--online-teacher"]

    def stage_distill():
        # The batch halves while qat-distill runs out of GPU memory (composed attention keeps
        # [batch, heads, seq, seq] scores per layer); PyTorch then runs the same batch.
        while True:
            b = chosen["batch"]
            say(f"distill: qat-distill (cached top-64) vs torch_qat.py (online teacher), {b} x {L}, {steps} steps after {warm}")
            try:
                q = qat_distill("cached", [], b)
                break
            except RuntimeError as e:
                if b == 1 or "out of memory" not in str(e).lower():
                    raise
                chosen["batch"] = b // 2
                say(f"distill: out of GPU memory at batch {b}, trying {b // 2}")
        t = torch_side("torch_qat.py", targs(b), "distill")
        row("distill", f"distill W4A8KV4: qat cached top-64 vs PyTorch online teacher, batch {b} x {L}", q, t, 6 * N,
            f"loss qat {q['final_loss']:.3f}, torch {t['last_loss']:.3f}; torch peak allocated {t.get('peak_gpu_mib') or 0:,.0f} MiB")

    def stage_distill_accum():
        b, A = chosen["batch"], c["distill_accum"]
        say(f"distill-accum: qat-distill (cached top-64) vs torch_qat.py (online teacher), {A} x {b} x {L} per step")
        q = qat_distill("accum", ["--grad-accum", str(A)], b)
        t = torch_side("torch_qat.py", targs(b) + ["--grad-accum", str(A)], "distill-accum")
        row("distill-accum", f"distill W4A8KV4 as the distill row, {A} micro-batches of {b} x {L} per optimizer step (both sides)",
            q, t, 6 * N, f"loss qat {q['final_loss']:.3f}, torch {t['last_loss']:.3f}")

    def stage_distill_bitdistiller():
        b, scheme = chosen["batch"], c["bitdistiller_scheme"]
        say(f"distill-bitdistiller: qat-distill {scheme} --loss cakld, group kernels and composed ops, {b} x {L}")
        extra = ["--loss", "cakld", "--cakld-gamma", "0.5"]
        q = qat_distill("bitdistiller", extra, b, scheme=scheme)
        c_ = qat_distill("bitdistiller-composed", extra, b, scheme=scheme,
                         run_env=dict(env, QAT_CUDA_FUSED_ASYM="0"))
        # torch_qat.py with the same quantizer (BitDistiller's pseudo_quantize_tensor, round_ste)
        # and loss (bucketed CAKLD) from the same cached shards: W<b>G<n> or W<b>CH.
        bits, group = scheme[1:].replace("CH", "G0").split("G")
        t = torch_side("torch_qat.py", ["--model", model, "--shards", shards, "--batch", str(b), "--steps", str(steps),
                                        "--warmup", str(warm), "--threads", threads, "--w-bits", bits, "--w-group", group,
                                        "--a-bits", "0", "--kv-bits", "0", "--cakld-gamma", "0.5"], "distill-bitdistiller")
        row("distill-bitdistiller", f"distill {scheme} (BitDistiller: asym groups, min/max gradient, CAKLD 0.5), both from "
            f"cached top-64, batch {b} x {L}", q, t, 6 * N,
            f"loss qat {q['final_loss']:.3f}, torch {t['last_loss']:.3f}; qat with the composed group quantizer "
            f"{c_['tps']:,.0f} tokens/s (the kernels run {q['tps'] / c_['tps']:.2f}x that), loss {c_['final_loss']:.3f}")

    def stage_distill_teacher():
        b = chosen["batch"]
        say(f"distill-teacher: qat-distill --teacher vs torch_qat.py (online teacher), {b} x {L}")
        q = qat_distill("teacher", ["--teacher", model], b)
        t = results["distill"]["torch"] if "distill" in results else torch_side("torch_qat.py", targs(b), "distill-teacher")
        row("distill-teacher", f"distill W4A8KV4, both with an online teacher, batch {b} x {L}", q, t, 6 * N, "teacher forward not counted in MFU")

    flash_env = dict(env, QAT_CUDA_FLASH_ATTENTION="1")

    def stage_distill_flash():
        b = chosen["batch"]
        say(f"distill-flash: qat-distill (cached top-64) with QAT_CUDA_FLASH_ATTENTION=1, {b} x {L}")
        q = qat_distill("flash", [], b, run_env=flash_env)
        t = results["distill"]["torch"] if "distill" in results else torch_side("torch_qat.py", targs(b), "distill-flash")
        base = results.get("distill", {}).get("qat")
        row("distill-flash", f"distill W4A8KV4 as above, qat with the flash-attention kernels, batch {b} x {L}", q, t, 6 * N,
            f"loss qat {q['final_loss']:.3f}" + (f" (composed attention: {base['final_loss']:.3f})" if base else ""))

    composed_env = dict(env, QAT_CUDA_FUSED_NORM="0", QAT_CUDA_FUSED_SWIGLU="0", QAT_CUDA_FUSED_ROPE="0",
                        QAT_CUDA_FUSED_LOSS="0", QAT_CUDA_FUSED_GRAD_NORM="0", QAT_CUDA_FUSED_SOFTMAX="0",
                        QAT_CUDA_FUSED_ADD_NORM="0")

    def stage_distill_composed():
        b = chosen["batch"]
        say(f"distill-composed: qat-distill (cached top-64) with the fused training ops off, {b} x {L}")
        q = qat_distill("composed", [], b, run_env=composed_env)
        t = results["distill"]["torch"] if "distill" in results else torch_side("torch_qat.py", targs(b), "distill-composed")
        base = results.get("distill", {}).get("qat")
        row("distill-composed", f"distill W4A8KV4 as above, qat with composed norm/SwiGLU/RoPE/softmax/loss, batch {b} x {L}", q, t,
            6 * N, f"loss qat {q['final_loss']:.3f}" + (f" (fused ops: {base['final_loss']:.3f})" if base else ""))

    def additional_student_rows():
        """Goal 3's two readings, from the distill and distill-teacher rows."""
        if "distill" in results and "distill-teacher" in results:
            r = results["distill-teacher"]["qat"]["tps"] / results["distill"]["qat"]["tps"]
            results["additional_student_gpu_seconds_ratio"] = r
            rows.append(f"| GPU-seconds per additional student: cached shards / online teacher (qat) | | | **{r:.2f}x** | | | goal <= 0.7x |")
        if "distill" in results and results["distill"]["torch"]:
            # What a user saves against the research code, which runs its teacher online in every
            # student run: qat from cached shards against torch_qat.py with its online teacher.
            d = results["distill"]
            r = d["torch"]["tps"] / d["qat"]["tps"]
            results["additional_student_gpu_seconds_ratio_vs_torch_online"] = r
            rows.append(f"| GPU-seconds per additional student: qat from cached shards / PyTorch with its online teacher | | | **{r:.2f}x** | | | goal <= 0.7x |")

    PS = c["profile_steps"]

    def profile_rows(title, unit, order, runs, names):
        """A Markdown table of `--profile` summaries: seconds per step (share of the phases' sum)."""
        lines = ["", f"{title}: seconds per {unit} (share of the phases' sum)", "",
                 "| phase | " + " | ".join(names[t] for t in runs) + " |", "|---" * (len(runs) + 1) + "|"]
        seen = list(next(iter(runs.values()))["phases"]) if runs else []
        phases = [p for p in order if p in seen] + [p for p in seen if p not in order]
        for ph in phases + ["wall"]:
            cells = []
            for r in runs.values():
                v = r["wall_s"] if ph == "wall" else r["phases"][ph]
                share = "" if ph == "wall" else f" ({v / max(sum(r['phases'].values()), 1e-12):.0%})"
                cells.append(f"{v / max(r['steps'], 1):.4f}{share}")
            lines.append(f"| {ph} | " + " | ".join(cells) + " |")
        return lines

    def stage_profile():
        # Phase orders: crates/train/src/distill/step.rs, crates/sample/src/generate.rs,
        # crates/eval/src/perplexity.rs (PHASES / PROFILE_PHASES).
        b = chosen["batch"]
        runs = {}
        for tag, extra, scheme in (("cached", [], "W4A8KV4"), ("teacher", ["--teacher", model], "W4A8KV4"),
                                   ("fp", [], "FP")):
            if runs and past_deadline(f"profile distill {tag}"):
                break
            say(f"profile: qat-distill --profile {tag} ({scheme}), batch {b} x {L}, {PS} steps after the first")
            runs[tag] = qat_distill(f"profile-{tag}", extra + ["--profile"], b, scheme, PS + 1)["profile"]
        results["profile"] = dict(batch=b, seq_len=L, runs=runs)
        names = {"cached": "W4A8KV4, cached shards", "teacher": "W4A8KV4, online teacher", "fp": "FP (no fake quant), cached"}
        profile_table[:] = profile_rows(f"qat-distill --profile, batch {b} x {L}", "step",
                                        ["data", "batch_to_device", "teacher_forward", "student_forward", "loss", "backward",
                                         "accumulate", "clip_grad", "optimizer", "log_checkpoint"], runs, names)
        save()
        if not past_deadline("profile sample"):
            say(f"profile: qat-sample --profile, {2 * B} sequences of {new} new tokens, batch {B} (the second batch counted)")
            out = fresh(os.path.join(work, "shards-profile"))
            stdout, _, _ = run([bins["qat-sample"], "-m", model, "-o", out, "-n", str(2 * B), "--max-len", str(new + 2),
                                "-K", "64", "-b", str(B), "--profile", "-q"] + dev, env, os.path.join(logs, "profile-sample.log"), gpu)
            shutil.rmtree(out, ignore_errors=True)
            p = last_json(stdout)["profile"]
            results["profile"]["sample"] = p
            profile_table.extend(profile_rows(f"qat-sample --profile, batch {B}, {new} new tokens", "batch",
                                              ["prefill", "decode_forward", "logits_to_host", "log_softmax_topk_sample",
                                               "kv_cache_select", "write"], {"sample": p}, {"sample": "qat-sample"}))
            save()
        evals = {}
        for tag, run_env in (("eval", env), ("eval-flash", flash_env)):
            if past_deadline(f"profile {tag}"):
                break
            say(f"profile: qat-eval --profile ({tag}), {2 * W} windows of {L}, batch {EB}")
            stdout, _, _ = run([bins["qat-eval"], "-m", model, "-c", corpus, "--mode", "stream", "--seq-len", str(L),
                                "--limit", str(2 * W), "-b", str(EB), "--profile", "-q"] + dev, run_env,
                               os.path.join(logs, f"profile-{tag}.log"), gpu)
            evals[tag] = results["profile"][tag] = last_json(stdout)["profile"]
        if evals:
            profile_table.extend(profile_rows(f"qat-eval --profile, stream windows of {L}, batch {EB}", "batch",
                                              ["batch_to_device", "forward", "logits_nll", "checkpoint"], evals,
                                              {"eval": "qat-eval", "eval-flash": "qat-eval, flash attention"}))
        for line in profile_table:
            say(line)

    W, EB = c["eval_windows"], c["eval_batch"]

    def qat_eval_rate(tag, run_env):
        """qat-eval over W and 2W windows: the rate of the extra windows, peak memory, the NLL."""
        runs = []
        for k, w in ((f"{tag}1", W), (f"{tag}2", 2 * W)):
            stdout, mem, _ = run([bins["qat-eval"], "-m", model, "-c", corpus, "--mode", "stream", "--seq-len", str(L),
                                  "--limit", str(w), "-b", str(EB), "-q"] + dev, run_env, os.path.join(logs, f"eval-{k}.log"), gpu)
            runs.append((last_json(stdout), mem))
        (j1, m1), (j2, m2) = runs
        return dict(tps=(j2["tokens"] - j1["tokens"]) / (j2["seconds"] - j1["seconds"]), mem=max(m1, m2), nll=j2["nll"],
                    single_run_tps=j2["tokens_per_s"])

    def hf_eval(tag):
        """HF forward over 2W windows; its rate over the batches alone: qat's rate of extra windows
        excludes tokenizing the corpus (the same in both of its runs), so HF's must too."""
        t = torch_side("hf_forward.py", ["--model", model, "--corpus", corpus, "--mode", "stream", "--seq-len", str(L),
                                         "--limit", str(2 * W), "--batch", str(EB), "--threads", threads], tag)
        return dict(t, tps=t["forward_tokens_per_s"])

    def stage_eval():
        say(f"eval: qat-eval {W} and {2 * W} windows of {L} tokens vs HF forward {2 * W}")
        q = qat_eval_rate("e", env)
        t = hf_eval("eval")
        row("eval", f"eval: perplexity, stream windows of {L}, batch {EB}", q, t, 2 * N,
            f"NLL qat {q['nll']:.5f}, HF {t['nll']:.5f}; one-process rates (fixed costs included) qat "
            f"{q['single_run_tps']:,.0f}/s, HF with tokenization {t['tokens_per_s']:,.0f}/s")

    def stage_eval_flash():
        say(f"eval-flash: qat-eval with QAT_CUDA_FLASH_ATTENTION=1, {W} and {2 * W} windows of {L} tokens")
        q = qat_eval_rate("flash", flash_env)
        t = results["eval"]["torch"] if "eval" in results else hf_eval("eval-flash")
        base = results.get("eval", {}).get("qat")
        row("eval-flash", "eval as above, qat with the flash-attention kernels", q, t, 2 * N,
            f"NLL qat {q['nll']:.5f}" + (f" (composed attention: {base['nll']:.5f})" if base else "") + f", HF {t['nll']:.5f}")

    def stage_sample_flash():
        say("sample-flash: qat-sample with QAT_CUDA_FLASH_ATTENTION=1 (prefill and decoding through the flash kernel)")
        q = qat_sample_rate("f", flash_env)
        base = results.get("sample", {}).get("qat")
        row("sample-flash", "sample as above, qat with the flash-attention kernel in prefill and decoding", q,
            hf_generate(), 2 * N, f"{q['tps'] / base['tps']:.2f}x the sample row's qat" if base else "")


    def stage_kernels():
        ncu = ncu_kernels.find_ncu()
        if ncu is None:
            raise RuntimeError("ncu (Nsight Compute) not found on PATH, under /opt/nvidia or in /usr/local/cuda*")
        b = chosen["batch"]
        runs = []  # cheapest first: ncu serializes every kernel and adds its own time to each
        # qat-sample: 16 decode steps of the sample row's batch. Kernel time per step against the
        # sample row's wall time per step says whether decoding waits on kernel launches.
        runs.append(("sample", f"qat-sample, batch {B}, 16 new tokens (model load and prefill included)", 16,
                     "decode step", env, 60,
                     [bins["qat-sample"], "-m", model, "-o", fresh(os.path.join(work, "shards-ncu")), "-n", str(B),
                      "--max-len", "18", "-K", "64", "-b", str(B), "-q"] + dev))
        for tag, run_env, what in (("eval", env, "composed attention"), ("eval-flash", flash_env, "flash attention")):
            runs.append((tag, f"qat-eval, stream windows of {L}, batch {EB}, {what}", 1, "batch", run_env, 60,
                         [bins["qat-eval"], "-m", model, "-c", corpus, "--mode", "stream", "--seq-len", str(L),
                          "--limit", str(EB), "-b", str(EB), "-q"] + dev))
        runs.append(("distill", f"qat-distill W4A8KV4, cached top-64, batch {b} x {L} (2 steps, model load included)",
                     2, "step", env, 90,
                     [bins["qat-distill"], "-m", model, "-s", shards, "-o", fresh(os.path.join(work, "student-ncu")),
                      "--scheme", "W4A8KV4", "-b", str(b), "--steps", "2", "--warmup-steps", "1",
                      "--checkpoint-every", "0", "-q"] + dev))
        results["kernels"] = {}
        for tag, title, per, unit, run_env, timeout, cmd in runs:
            if past_deadline(f"kernels {tag}"):
                break
            say(f"kernels: {title} under ncu (at most {timeout} s)")
            k = ncu_kernels.profile(ncu, cmd, os.path.join(logs, f"ncu-{tag}.csv"), run_env, timeout=timeout)
            results["kernels"][tag] = dict(per=per, unit=unit, kernels=k)
            profile_table.extend(ncu_kernels.table(k, title, per=per, unit=unit))
            save()
        shutil.rmtree(os.path.join(work, "student-ncu"), ignore_errors=True)
        shutil.rmtree(os.path.join(work, "shards-ncu"), ignore_errors=True)

    # The stages in the order --stages gives (session.sh puts what the goals need first,
    # so that a deadline skips the least useful); the shards before the first stage that trains.
    registry = {"sample": stage_sample, "sample-host": stage_sample_host, "distill": stage_distill,
                "distill-teacher": stage_distill_teacher, "eval": stage_eval, "eval-flash": stage_eval_flash,
                "distill-flash": stage_distill_flash, "sample-flash": stage_sample_flash,
                "distill-composed": stage_distill_composed, "distill-accum": stage_distill_accum,
                "distill-bitdistiller": stage_distill_bitdistiller, "sample-alloc": stage_sample_alloc,
                "profile": stage_profile, "kernels": stage_kernels}
    tried = set()
    with_shards = {"distill", "distill-teacher", "distill-flash", "distill-composed", "distill-accum",
                   "distill-bitdistiller", "profile", "kernels"}
    for stage in stages:
        if stage in with_shards:
            if "shards" not in tried:
                tried.add("shards")
                attempt("shards", stage_shards)
            if ("shards" in failed or "shards" in skipped) and stage != "distill":
                continue  # (distill reports the failure itself)
        if stage == "kernels" and not gpu:
            say("kernels: skipped (Nsight Compute needs a GPU)")
            continue
        attempt(stage, registry[stage])
    additional_student_rows()

    table = "\n".join(head + rows + switches_note + profile_table)
    meta = save()
    print(f"\nbench-gpu {meta['date']} on {dev_name}: {c['config']} ({N:,} parameters), {c['dtype']}, "
          f"{meta['seconds']:.0f} s in all\n")
    print(table)
    if a.record and not a.smoke:
        with open(os.path.join(BENCH, "RESULTS.md"), "a") as f:
            f.write(f"\n## `make bench-gpu`, {meta['date']}, {dev_name}\n\n{c['config']} config, random weights "
                    f"({N:,} parameters), {c['dtype']}; settings {json.dumps(c)}.\n\n{table}\n")
        print(f"\n(appended to {os.path.join(BENCH, 'RESULTS.md')})")


if __name__ == "__main__":
    main()
