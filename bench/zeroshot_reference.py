"""Reference per-choice log-likelihoods for `qat-eval --task` (tests/zeroshot_cli.rs).

Independent of the Rust code: HF transformers (LlamaForCausalLM, fp32, CPU) and the tokenizer
through AutoTokenizer, on the first N items of each task file, formatted as lm-evaluation-harness
does (lm_eval/tasks/{hellaswag,piqa,arc,super_glue/boolq,winogrande}; requests built as in
lm_eval/api/task.py ConfigurableTask.construct_requests, target_delimiter " "; tokens as in
lm_eval/models/huggingface.py HFLM._encode_pair and _loglikelihood_tokens, with BOS as the
tokenizer adds it, i.e. add_bos_token=True; acc_norm as in ConfigurableTask.process_results).

HellaSwag's file holds `activity_label: ctx` with ctx = ctx_a + " " + ctx_b; the harness uses
ctx_b.capitalize(), restored here by capitalizing the fragment after the last ". ", "? " or "! "
when it begins in lower case (see crates/eval/src/tasks/hellaswag.rs).

    python bench/zeroshot_reference.py --model ../shared/data/models/stories260K \
        --eval-dir ../shared/data/eval -n 3 > reference.json
"""

import argparse
import json
import os
import re

import numpy as np
import torch
from transformers import AutoTokenizer, LlamaForCausalLM


def hs_preprocess(text):
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hs_capitalize_ctx_b(line):
    starts = [line.rfind(sep) + len(sep) for sep in (". ", "? ", "! ") if line.rfind(sep) >= 0]
    if not starts:
        return line
    s = max(starts)
    frag = line[s:]
    if frag and frag[0].islower():
        return line[:s] + frag.capitalize()
    return line


def hellaswag(path, n):
    lines = open(path, encoding="utf-8").read().split("\n")
    for i in range(n):
        ctx, label, *endings = lines[6 * i : 6 * i + 6]
        query = hs_preprocess(hs_capitalize_ctx_b(ctx))
        choices = [hs_preprocess(e) for e in endings]
        yield [(query, " " + c) for c in choices], choices, int(label)


def jsonl(path, n):
    with open(path, encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


def labels(path, n):
    with open(path) as f:
        return [next(f).strip() for _ in range(n)]


def piqa(path, n):
    labs = labels(path.replace(".jsonl", "-labels.lst"), n)
    for d, lab in zip(jsonl(path, n), labs):
        q = f"Question: {d['goal']}\nAnswer:"
        choices = [d["sol1"], d["sol2"]]
        yield [(q, " " + c) for c in choices], choices, int(lab)


def arc(path, n):
    for d in jsonl(path, n):
        q = f"Question: {d['question']['stem']}\nAnswer:"
        choices = [c["text"] for c in d["question"]["choices"]]
        gold = [c["label"] for c in d["question"]["choices"]].index(d["answerKey"])
        yield [(q, " " + c) for c in choices], choices, gold


def boolq(path, n):
    for d in jsonl(path, n):
        q = f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:"
        choices = ["no", "yes"]
        yield [(q, " " + c) for c in choices], choices, int(d["answer"])


def winogrande(path, n):
    labs = labels(path.replace(".jsonl", "-labels.lst"), n)
    for d, lab in zip(jsonl(path, n), labs):
        idx = d["sentence"].index("_")
        target = d["sentence"][idx + 1 :].strip()
        choices = [d["sentence"][:idx] + opt for opt in (d["option1"], d["option2"])]
        yield [("" + c, " " + target) for c in choices], choices, {"1": 0, "2": 1}[lab]


TASKS = {
    "hellaswag": (hellaswag, "hellaswag/hellaswag_val.first1000.txt"),
    "piqa": (piqa, "piqa/valid.jsonl"),
    "arc-easy": (arc, "arc-easy/ARC-Easy-Test.jsonl"),
    "arc-challenge": (arc, "arc-challenge/ARC-Challenge-Test.jsonl"),
    "boolq": (boolq, "boolq/dev.jsonl"),
    "winogrande": (winogrande, "winogrande/dev.jsonl"),
}


def encode_pair(tok, context, continuation):
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok(context + continuation)["input_ids"]
    ctx = tok(context)["input_ids"]
    return ctx, whole[len(ctx) :]


@torch.no_grad()
def loglikelihood(model, ctx, cont, max_len):
    full = (ctx + cont)[-(max_len + 1) :]
    inp = torch.tensor([full[:-1]])
    logp = torch.log_softmax(model(inp).logits[0].double(), dim=-1)
    logp = logp[-len(cont) :]
    tgt = torch.tensor(cont)
    greedy = bool((logp.argmax(-1) == tgt).all())
    return float(logp.gather(1, tgt[:, None]).sum()), greedy


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--eval-dir", required=True)
    ap.add_argument("-n", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = LlamaForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32).eval()
    max_len = model.config.max_position_embeddings
    out = {}
    for name, (fn, rel) in TASKS.items():
        items = []
        for requests, choices, gold in fn(os.path.join(a.eval_dir, rel), a.n):
            lls, greedy, ntok = [], [], []
            for ctx, cont in requests:
                c, k = encode_pair(tok, ctx, cont)
                ll, g = loglikelihood(model, c, k, max_len)
                lls.append(ll)
                greedy.append(g)
                ntok.append([len(c), len(k)])
            clen = np.array([float(len(c)) for c in choices])
            items.append({
                "gold": gold,
                "lls": lls,
                "greedy": greedy,
                "tokens": ntok,
                "pred": int(np.argmax(lls)),
                "pred_norm": int(np.argmax(np.array(lls) / clen)),
                "context": requests[0][0][-120:],
                "continuations": [k for _, k in requests],
            })
        out[name] = items
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
