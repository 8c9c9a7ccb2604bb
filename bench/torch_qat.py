"""Reference for `qat-distill`: LLM-QAT-style fake-quant distillation in PyTorch eager (CPU f32; GPU bf16).

The student is transformers' `LlamaForCausalLM` with every decoder linear layer (q, k, v, o,
gate, up, down) replaced by `QuantLinear`, as LLM-QAT patches HF's Llama
(facebookresearch/LLM-QAT, models/utils_quant.py `QuantizeLinear` + `SymQuantizer`):
  * weights: symmetric per-output-channel MinMax, W bits, recomputed from the fp32 master weights
    every step; scale = max|w_row| / (2^(W-1)-1), rounded to f16 as qat does; q = clamp(round(w/s));
  * activations: symmetric per token (over the features of the linear layer's input), A bits, at
    the input of every one of the seven linear layers;
  * KV: symmetric per token on the k_proj / v_proj outputs over all kv heads x head_dim (the
    [b, t, kv_heads*head_dim] projection output), before RoPE, KV bits;
  * straight-through gradients: x + (q - x).detach() (formats/scheme.md, LLM-QAT);
  * embeddings, RMSNorm weights and the (tied) LM head stay full precision; all parameters train.
With --w-group G (bench/gpu's distill-bitdistiller row): BitDistiller's weights instead,
`pseudo_quantize_tensor` per group of G inputs (0: per output channel) with `round_ste`, so the
min/max gradient of qat's `asym_group` (formats/scheme.md; f16 scales straight-through, the clamp
passing gradient on [0, M] inclusive, see below); and with --cakld-gamma, BitDistiller's CAKLD over the
same buckets (gamma · reverse KL with the teacher tail floored at 1e-6 + (1 - gamma) · forward KL).
Loss (formats/distill-loss.md, `--loss fkl`): forward KL over the K+1 buckets {teacher top-K ids,
tail}, teacher top-K log-probs read from the qat-sample shards, student tail from a logsumexp with
the K ids masked to -inf; mean over trained positions (i >= prompt_len - 1). AdamW (0.9, 0.999,
1e-8, no weight decay), global grad-norm clip 1.0, linear warmup + cosine lr as qat-distill.
With --online-teacher (what the LLM-QAT reference trainer does): a full-precision teacher model
is in the loop; each step it runs a no-grad forward on the batch, and the loss is the forward KL
over the full vocabulary from its log-softmax (the shards then supply only the tokens).

GPU (`--device cuda --dtype bf16`, bench/gpu): float32 master weights and AdamW state, compute
under torch.autocast(bfloat16) (the linear layers and attention run in bf16, HF's sdpa attention);
the quantizers compute in float32 whatever their input dtype and return it (qat does the same),
the online teacher is a bf16 model. Timing synchronizes the GPU at the end of every step; the
JSON adds the peak of torch.cuda.max_memory_allocated. Rows of different lengths (an EOS) are
right-padded and masked, as qat-distill batches them.

Batches: 16 sequences x 256 tokens (the whole shard row; the student runs on all 256 tokens, as
qat-distill does, and the last position's logits are unused). The shards are decoded into
memory before timing (qat-distill streams them from Parquet inside its steps).
Timing: each step (batch assembly, forward, loss, backward, clip, AdamW) with perf_counter;
--warmup steps are not counted; tokens/s = timed steps x batch x 256 / their seconds.
--grad-accum N: N micro-batches of --batch sequences per optimizer step (each one's mean loss / N
backpropagated, gradients summed by autograd), then one clip and one AdamW step, as
`qat-distill --grad-accum N`; tokens/s counts all micro-batches.
Prints one JSON line on stdout.
"""

import argparse
import glob
import json
import math
import os
import time

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlamaForCausalLM


def ste(x, q):
    """Straight-through estimator: value of q, gradient of x (LLM-QAT's SymQuantizer backward)."""
    return x + (q - x).detach()


def sym_qdq(x, bits, f16_scale=False):
    """Symmetric quantize-dequantize with one scale per row of the last dim (no gradient)."""
    qmax = 2 ** (bits - 1) - 1
    dtype, x = x.dtype, x.float()  # quantizers compute in f32, as qat's do
    with torch.no_grad():
        scale = x.abs().amax(dim=-1, keepdim=True) / qmax
        if f16_scale:  # the packed model stores f16 scales; qat fake-quantizes with them too
            scale = scale.clamp(max=65504.0).half().float()
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.round(x / safe).clamp(-qmax, qmax)  # round half to even, like qat
        return (q * scale).to(dtype)


def round_ste(x):
    """torch.round with a straight-through gradient (BitDistiller's `round_ste`)."""
    return x + (torch.round(x) - x).detach()


def asym_group_qdq(w, bits, group):
    """BitDistiller's `pseudo_quantize_tensor` (asymmetric MinMax per group of `group` inputs),
    differentiable as BitDistiller trains it: round straight-through, the zero point constant
    (torch.round has no gradient), the clamp passing no gradient outside [0, M], and the scale
    carrying gradient to each group's max and min. As qat (formats/scheme.md `asym_group`), the
    scale is rounded to f16 (the packed model stores f16), straight-through; in f32."""
    group = group or w.shape[-1]  # 0: one group per output channel (qat's `W<b>CH`)
    shape, dtype, w = w.shape, w.dtype, w.float().reshape(-1, group)
    max_int = 2 ** bits - 1
    mx, mn = w.amax(dim=1, keepdim=True), w.amin(dim=1, keepdim=True)
    scale = (mx - mn).clamp(min=1e-5) / max_int
    scale = scale + (scale.clamp(max=65504.0).half().float() - scale).detach()
    zero = (-torch.round(mn / scale)).clamp(0, max_int)
    v = round_ste(w / scale) + zero
    # The clamp with gradient on [0, M] inclusive (PyTorch's documented subgradient 1 at the
    # bounds, as qat has it); this venv's torch 2.15 clamp passes none at exactly a bound.
    code = torch.where((v >= 0) & (v <= max_int), v, v.clamp(0, max_int).detach())
    q = (code - zero) * scale
    return q.reshape(shape).to(dtype)


class QuantLinear(nn.Module):
    """nn.Linear (no bias) with W/A fake quantization and, for k_proj/v_proj, KV fake quantization."""

    def __init__(self, lin, w_bits, a_bits, out_bits=None, w_group=None):
        super().__init__()
        self.weight = lin.weight  # same Parameter: the master weights
        self.w_bits, self.a_bits, self.out_bits, self.w_group = w_bits, a_bits, out_bits, w_group

    def forward(self, x):
        if self.a_bits:
            x = ste(x, sym_qdq(x, self.a_bits))  # per token
        w = self.weight
        if self.w_bits and self.w_group is not None:
            w = asym_group_qdq(w, self.w_bits, self.w_group)  # BitDistiller: per group, min/max gradient
        elif self.w_bits:
            w = ste(w, sym_qdq(w, self.w_bits, f16_scale=True))  # per output channel
        y = F.linear(x, w)
        if self.out_bits:
            y = ste(y, sym_qdq(y, self.out_bits))  # KV cache quantization, per token, before RoPE
        return y


def quantize_model(model, w_bits, a_bits, kv_bits, w_group=None):
    q = lambda lin, out_bits=None: QuantLinear(lin, w_bits, a_bits, out_bits, w_group)
    for layer in model.model.layers:
        at, mlp = layer.self_attn, layer.mlp
        at.q_proj, at.k_proj, at.v_proj = q(at.q_proj), q(at.k_proj, kv_bits), q(at.v_proj, kv_bits)
        at.o_proj = q(at.o_proj)
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = q(mlp.gate_proj), q(mlp.up_proj), q(mlp.down_proj)
    return model


def fkl_topk(logits, ids, lp):
    """Forward KL over {top-K, tail} buckets, mean over rows. logits [N,V]; ids [N,K]; lp [N,K]."""
    logz = torch.logsumexp(logits, -1)
    lq = logits.gather(1, ids) - logz[:, None]
    lr_q = torch.logsumexp(logits.scatter(1, ids, float("-inf")), -1) - logz
    p = lp.exp()
    r_p = (1.0 - p.double().sum(-1)).clamp(min=0.0).float()
    tail = torch.where(r_p > 0, r_p * (torch.log(r_p.clamp(min=1e-30)) - lr_q), torch.zeros_like(r_p))
    return ((p * (lp - lq)).sum(-1) + tail).mean()


def cakld_topk(logits, ids, lp, gamma):
    """BitDistiller's confidence-aware KL over {top-K, tail} buckets (formats/distill-loss.md):
    gamma * RKL + (1 - gamma) * FKL, RKL with the teacher tail floored at 1e-6; mean over rows."""
    logz = torch.logsumexp(logits, -1)
    lq = logits.gather(1, ids) - logz[:, None]
    lr_q = torch.logsumexp(logits.scatter(1, ids, float("-inf")), -1) - logz
    p = lp.exp()
    r_p = (1.0 - p.double().sum(-1)).clamp(min=0.0).float()
    fkl = (p * (lp - lq)).sum(-1) + torch.where(r_p > 0, r_p * (torch.log(r_p.clamp(min=1e-30)) - lr_q),
                                                 torch.zeros_like(r_p))
    rkl = (lq.exp() * (lq - lp)).sum(-1) + lr_q.exp() * (lr_q - torch.log(r_p.clamp(min=1e-6)))
    return (gamma * rkl + (1.0 - gamma) * fkl).mean()


def fkl_full(logits, teacher_logprobs):
    """Forward KL over the full vocabulary (online teacher), mean over rows."""
    return (teacher_logprobs.exp() * (teacher_logprobs - torch.log_softmax(logits, -1))).sum(-1).mean()


def load_shards(d):
    """tokens [S,L] int64 (right-padded with 0), prompt_len [S], length [S], top-K ids [S,L-1,K]
    int64, log-probs [S,L-1,K] f32 (L = the longest row)."""
    man = json.load(open(os.path.join(d, "manifest.json")))
    K = man["header"]["top_k"]
    rows = []
    for f in sorted(glob.glob(os.path.join(d, "shard-*.parquet"))):
        t = pq.read_table(f)
        lens = pc.list_value_length(t["tokens"]).to_numpy()
        tok = pc.list_flatten(t["tokens"]).to_numpy()
        ids = pc.list_flatten(t["topk_ids"]).to_numpy()
        lp = pc.cast(pc.list_flatten(t["topk_logprobs"]), "float32").to_numpy()
        ot = oi = 0
        for n, pl in zip(lens, t["prompt_len"].to_numpy()):
            m = (n - 1) * K  # one top-K per position but the last
            rows.append((tok[ot : ot + n], pl, ids[oi : oi + m], lp[oi : oi + m]))
            ot, oi = ot + n, oi + m
    S, L = len(rows), max(len(r[0]) for r in rows)
    toks, ids, lps = np.zeros((S, L), np.int64), np.zeros((S, L - 1, K), np.int64), np.zeros((S, L - 1, K), np.float32)
    plen, length = np.zeros(S, np.int64), np.zeros(S, np.int64)
    for s, (tok, pl, i, l) in enumerate(rows):
        n = len(tok)
        toks[s, :n], plen[s], length[s] = tok, pl, n
        ids[s, : n - 1] = np.asarray(i, np.int64).reshape(n - 1, K)
        lps[s, : n - 1] = np.asarray(l, np.float32).reshape(n - 1, K)
    return tuple(torch.from_numpy(x) for x in (toks, plen, length, ids, lps))


def lr_at(step, lr, warmup, total):
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min((step - warmup) / max(total - warmup, 1), 1.0)
    return lr * 0.5 * (1 + math.cos(math.pi * t))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=8)
    ap.add_argument("--kv-bits", type=int, default=4)
    ap.add_argument("--w-group", type=int, default=None,
                    help="BitDistiller's asymmetric weights per group of this many inputs (0: per output "
                         "channel), min/max gradient, instead of LLM-QAT's symmetric per channel")
    ap.add_argument("--cakld-gamma", type=float, default=None,
                    help="BitDistiller's CAKLD with this gamma over the top-K buckets instead of the forward KL")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--online-teacher", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32",
                    help="compute dtype (bf16: autocast over f32 master weights; teacher in bf16)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    compute = torch.bfloat16 if a.dtype == "bf16" else torch.float32

    tokens, prompt_len, length, top_ids, top_lps = load_shards(a.shards)
    S, L = tokens.shape
    student = quantize_model(LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32), a.w_bits, a.a_bits,
                             a.kv_bits, a.w_group)
    student = student.to(dev).train()
    teacher = LlamaForCausalLM.from_pretrained(a.model, dtype=compute).to(dev).eval() if a.online_teacher else None
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    order = torch.randperm(S)
    pos = torch.arange(L - 1)
    total = a.warmup + a.steps
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16")

    times, losses, tokens_timed = [], [], 0
    for step in range(total):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        step_loss, step_tokens = 0.0, 0  # (the loss stays on the device until after opt.step)
        for micro in range(a.grad_accum):
            idx = order[(torch.arange(a.batch) + (step * a.grad_accum + micro) * a.batch) % S]
            T = int(length[idx].max())  # right-padded to the longest row of the batch, as qat-distill
            x = tokens[idx, :T].to(dev, non_blocking=True)  # [B, T]
            trained = (pos[None, : T - 1] >= (prompt_len[idx][:, None] - 1)) & (pos[None, : T - 1] < length[idx][:, None] - 1)
            trained = trained.to(dev, non_blocking=True)  # [B, T-1]
            with autocast:
                logits = student(input_ids=x).logits[:, : T - 1][trained].float()  # [N, V]
                if teacher is None:
                    ids = top_ids[idx, : T - 1].to(dev, non_blocking=True)[trained]
                    lps = top_lps[idx, : T - 1].to(dev, non_blocking=True)[trained]
                    loss = fkl_topk(logits, ids, lps) if a.cakld_gamma is None else cakld_topk(logits, ids, lps, a.cakld_gamma)
                else:
                    with torch.no_grad():
                        tl = torch.log_softmax(teacher(input_ids=x).logits[:, : T - 1][trained].float(), -1)
                    loss = fkl_full(logits, tl)
            (loss / a.grad_accum).backward()
            step_loss = step_loss + loss.detach() / a.grad_accum
            step_tokens += int(length[idx].sum())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.lr, 10, total)
        opt.step()
        losses.append(float(step_loss))
        if cuda:
            torch.cuda.synchronize()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
            tokens_timed += step_tokens

    print(json.dumps({"side": "torch", "stage": "distill", "online_teacher": a.online_teacher,
                      "scheme": f"W{a.w_bits}" + ("" if a.w_group is None else f"G{a.w_group}" if a.w_group else "CH")
                                + f"A{a.a_bits}KV{a.kv_bits}",
                      "loss": "fkl" if a.cakld_gamma is None else f"cakld {a.cakld_gamma}", "batch": a.batch, "grad_accum": a.grad_accum, "seq_len": L,
                      "timed_steps": a.steps, "warmup_steps": a.warmup, "seconds": sum(times),
                      "tokens_per_s": tokens_timed / sum(times), "median_step_s": float(np.median(times)),
                      "first_loss": losses[0], "last_loss": losses[-1],
                      "device": a.device, "dtype": a.dtype,
                      "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
