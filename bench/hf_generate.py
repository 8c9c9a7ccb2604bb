"""Reference for `qat-sample`: Hugging Face transformers `generate` on CPU, float32.

What it does (the PyTorch side of the "sample" row of `make bench`):
  * loads the model dir with `LlamaForCausalLM.from_pretrained(dtype=float32)`, eval mode;
  * builds the same data-free starts as qat-sample: sequence s is [BOS, v_s], v_s the s-th
    non-special vocabulary id (qat-sample's LLM-QAT starts);
  * `generate(do_sample=True, temperature=1, top_k=0, top_p=1, max_new_tokens=N, use_cache=True)`
    in batches of B: multinomial sampling from the full softmax, one token per step through
    transformers' default DynamicCache;
  * a logits processor gathers, at every step, the top-K log-probabilities of the full-vocabulary
    log-softmax (ids and values), the data qat-sample writes to its shards; at the end of each
    batch they are stacked into [B, N, K] tensors (ids int16, values float16, as the shards
    store them). Nothing is written to disk.
Timing: wall clock around the `generate` calls (plus the stacking), after one short warm-up
`generate` (not counted) and after model loading (not counted). Tokens = generated tokens
(up to and including an EOS; stories260K never emitted one in these runs).
GPU (`--device cuda --dtype bf16`, bench/gpu): the model in bf16, the recorded top-K moved to the
host after each batch (qat-sample writes them to disk), the GPU synchronized before the clock stops.
Prints one JSON line on stdout.
"""

import argparse
import json
import time

import torch
from transformers import AutoTokenizer, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList


class TopKLogprobs(LogitsProcessor):
    """Records the top-K log-probabilities of every step's distribution; scores pass unchanged."""

    def __init__(self, k):
        self.k = k
        self.ids, self.values = [], []

    def __call__(self, input_ids, scores):
        lp = torch.log_softmax(scores.float(), dim=-1)  # full vocabulary, temperature 1
        v, i = lp.topk(self.k, dim=-1)  # [B, K], sorted, rank 0 most probable
        self.values.append(v.to(torch.float16))
        self.ids.append(i.to(torch.int16))
        return scores

    def take(self):
        """[B, steps, K] ids and log-probs of the batch just generated; resets the lists."""
        out = torch.stack(self.ids, 1), torch.stack(self.values, 1)
        self.ids, self.values = [], []
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("-K", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    a = ap.parse_args()
    cuda = a.device.startswith("cuda")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    tok = AutoTokenizer.from_pretrained(a.model)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=dtype).to(a.device).eval()
    cfg = model.config
    special = set(tok.all_special_ids)
    starts = [i for i in range(cfg.vocab_size) if i not in special]
    prompts = torch.tensor([[cfg.bos_token_id, starts[s % len(starts)]] for s in range(a.num_seqs)], device=a.device)

    topk = TopKLogprobs(a.K)
    gen = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, use_cache=True,
               pad_token_id=cfg.eos_token_id, eos_token_id=cfg.eos_token_id,
               logits_processor=LogitsProcessorList([topk]))

    with torch.inference_mode():
        model.generate(prompts[: a.batch], attention_mask=torch.ones_like(prompts[: a.batch]), max_new_tokens=4, **gen)
        topk.take()  # warm-up, not counted
        generated, checksum = 0, 0.0
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b0 in range(0, a.num_seqs, a.batch):
            x = prompts[b0 : b0 + a.batch]
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=a.new_tokens, **gen)
            ids, lps = (x.cpu() for x in topk.take())
            new = out[:, x.shape[1] :]
            # generated tokens per row: up to and including the first EOS (HF pads after it)
            is_eos = new == cfg.eos_token_id
            first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full((new.shape[0],), new.shape[1], device=new.device))
            generated += int(first.sum())
            checksum += float(lps[:, :, 0].float().mean())
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0

    print(json.dumps({"side": "hf", "stage": "sample", "sequences": a.num_seqs, "batch": a.batch,
                      "generated_tokens": generated, "seconds": seconds, "tokens_per_s": generated / seconds,
                      "mean_top1_logprob": checksum / ((a.num_seqs + a.batch - 1) // a.batch),
                      "device": a.device, "dtype": a.dtype,
                      "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
