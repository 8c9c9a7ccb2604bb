"""Reference for `qat-eval`: Hugging Face transformers forward + log-softmax on CPU, float32, no grad.

What it does (the PyTorch side of the "eval" row of `make bench`), mirroring `qat-eval --mode docs`:
  * documents = the corpus split at `<|endoftext|>`, trimmed, empty ones dropped, the first
    --limit of them; each is tokenized by the model's tokenizer.json (which prepends BOS, as
    qat-eval does) and truncated to --seq-len tokens;
  * the same batching as qat-eval: longest first, --batch sequences per forward pass, inputs are
    all tokens but the last, padded to the longest of the batch (here right-padded with an
    attention mask; qat-eval left-pads with per-row pads, same amount of padding);
  * `LlamaForCausalLM(...).logits` under `torch.inference_mode()` (sdpa attention), then
    log-softmax over the vocabulary at the real (non-padding) positions and the NLL of each next
    token.
Timing: wall clock over tokenization + all forward passes (model loading and imports excluded;
qat-eval's own "seconds", which the harness reports, also includes its model load); also
`forward_tokens_per_s`, over the batches alone (tokenization excluded), the rate bench/gpu
compares with qat-eval's rate of extra windows, from which tokenization cancels out.
`--mode stream` mirrors `qat-eval --mode stream`: the whole file tokenized once (BOS first), cut
into non-overlapping --seq-len windows, every token of a window but its first predicted.
GPU (`--device cuda --dtype bf16`, bench/gpu): the model in bf16, log-softmax in f32, the GPU
synchronized before the clock stops.
Prints one JSON line on stdout with the NLL, so the two sides can be checked to agree.
"""

import argparse
import json
import time

import torch
from transformers import AutoTokenizer, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--limit", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", choices=["docs", "stream"], default="docs")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cuda = a.device.startswith("cuda")

    tok = AutoTokenizer.from_pretrained(a.model)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=dtype).to(a.device).eval()
    text = open(a.corpus, encoding="utf-8").read()

    with torch.inference_mode():
        x = torch.tensor([[1, 2, 3]], device=a.device)
        model(input_ids=x)  # warm-up, not counted
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if a.mode == "docs":
            docs = [d.strip() for d in text.split("<|endoftext|>") if d.strip()][: a.limit]
            seqs = [ids[: a.seq_len] for ids in tok(docs)["input_ids"]]
        else:
            ids = tok(text)["input_ids"]  # BOS first, as qat-eval
            seqs = [ids[i : i + a.seq_len] for i in range(0, len(ids), a.seq_len)][: a.limit]
        seqs = sorted((s for s in seqs if len(s) >= 2), key=len, reverse=True)
        t_forward = time.perf_counter()  # tokenized: the forward passes' own clock starts
        nll, count = 0.0, 0
        for b0 in range(0, len(seqs), a.batch):
            batch = seqs[b0 : b0 + a.batch]
            width = max(len(s) - 1 for s in batch)
            inp = torch.zeros(len(batch), width, dtype=torch.long)
            tgt = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for r, s in enumerate(batch):
                n = len(s) - 1
                inp[r, :n] = torch.tensor(s[:-1])
                tgt[r, :n] = torch.tensor(s[1:])
                mask[r, :n] = 1
            inp, tgt, mask = inp.to(a.device), tgt.to(a.device), mask.to(a.device)
            logits = model(input_ids=inp, attention_mask=mask).logits  # [b, width, V]
            real = mask.bool()
            logp = torch.log_softmax(logits[real].float(), dim=-1)  # [tokens, V]
            nll -= float(logp.gather(1, tgt[real][:, None]).sum(dtype=torch.float64))
            count += int(real.sum())
        if cuda:
            torch.cuda.synchronize()
        end = time.perf_counter()
        seconds, forward_seconds = end - t0, end - t_forward

    print(json.dumps({"side": "hf", "stage": "eval", "sequences": len(seqs), "tokens": count, "nll": nll / count,
                      "seconds": seconds, "tokens_per_s": count / seconds,
                      "forward_seconds": forward_seconds, "forward_tokens_per_s": count / forward_seconds,
                      "device": a.device, "dtype": a.dtype,
                      "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
