#!/usr/bin/env python3
"""Writes the committed seed corpora of the fuzz targets (fuzz/seeds/<target>/).

Run from the repository root after `cargo build --release --bins`:
  python3 fuzz/make_seeds.py [--data ../shared/data]

* packed_reader: a tiny random Llama (fuzz/tiny-config.json, written here with the standard
  library only) packed by qat-pack under several schemes (sym per channel, asym groups, NF3,
  NF4, a full-precision override), so every code path of the reader has a valid input to mutate.
* shard_reader: small qat-sample shard files of stories260K (f16 and f32 log-probs).
* scheme: short names and JSON schemes.
"""
import json, os, random, shutil, struct, subprocess, sys, tempfile

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
data = sys.argv[sys.argv.index("--data") + 1] if "--data" in sys.argv else os.path.join(root, "..", "shared", "data")
binp = os.path.join(root, "target", "release")
seeds = os.path.join(root, "fuzz", "seeds")
cfg = json.load(open(os.path.join(root, "fuzz", "tiny-config.json")))


def tiny_model(d):
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = [("model.embed_tokens.weight", [v, h])]
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}"
        shapes += [(f"{p}.input_layernorm.weight", [h]), (f"{p}.post_attention_layernorm.weight", [h]),
                   (f"{p}.self_attn.q_proj.weight", [q, h]), (f"{p}.self_attn.k_proj.weight", [kv, h]),
                   (f"{p}.self_attn.v_proj.weight", [kv, h]), (f"{p}.self_attn.o_proj.weight", [h, q]),
                   (f"{p}.mlp.gate_proj.weight", [i, h]), (f"{p}.mlp.up_proj.weight", [i, h]),
                   (f"{p}.mlp.down_proj.weight", [h, i])]
    shapes.append(("model.norm.weight", [h]))
    rng = random.Random(0)
    header, blobs, off = {}, [], 0
    for name, shape in shapes:
        n = 1
        for s in shape:
            n *= s
        vals = [1.0] * n if name.endswith("norm.weight") else [rng.gauss(0, 0.1) for _ in range(n)]
        b = struct.pack(f"<{n}f", *vals)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    shutil.copy(os.path.join(root, "fuzz", "tiny-config.json"), os.path.join(d, "config.json"))


SCHEMES = {
    "w4a8kv4": {"format_version": 1, "weight": {"bits": 4, "format": {"kind": "sym_per_channel"}}, "act": {"bits": 8}, "kv": {"bits": 4}},
    "w3g8": {"format_version": 1, "weight": {"bits": 3, "format": {"kind": "asym_group", "group_size": 8}}},
    "w2ch": {"format_version": 1, "weight": {"bits": 2, "format": {"kind": "asym_group", "group_size": None}}},
    "nf3g8": {"format_version": 1, "weight": {"bits": 3, "format": {"kind": "nf3", "group_size": 8}}},
    "nf4g16-fp-down": {"format_version": 1, "weight": {"bits": 4, "format": {"kind": "nf4", "group_size": 16}},
                       "overrides": [{"pattern": "layers.*.mlp.down_proj", "weight": None}]},
    "w8": {"format_version": 1, "weight": {"bits": 8, "format": {"kind": "sym_per_channel"}}},
}

with tempfile.TemporaryDirectory() as tmp:
    model = os.path.join(tmp, "model")
    tiny_model(model)
    out = os.path.join(seeds, "packed_reader")
    os.makedirs(out, exist_ok=True)
    for name, scheme in SCHEMES.items():
        json.dump(scheme, open(os.path.join(model, "quant_scheme.json"), "w"))
        packed = os.path.join(tmp, "packed-" + name)
        subprocess.run([os.path.join(binp, "qat-pack"), "--model", model, "--out", packed], check=True, stdout=subprocess.DEVNULL)
        shutil.copy(os.path.join(packed, "model.packed.safetensors"), os.path.join(out, name + ".safetensors"))

    out = os.path.join(seeds, "shard_reader")
    os.makedirs(out, exist_ok=True)
    stories = os.path.join(data, "models", "stories260K")
    for dtype in ["f16", "f32"]:
        d = os.path.join(tmp, "shards-" + dtype)
        subprocess.run([os.path.join(binp, "qat-sample"), "--model", stories, "--out", d, "-n", "3", "--max-len", "8", "-K", "4",
                        "--batch-size", "2", "--seqs-per-file", "2", "--logprob-dtype", dtype, "-q"], check=True, stdout=subprocess.DEVNULL)
        for f in ["shard-00000.parquet", "shard-00001.parquet"]:
            shutil.copy(os.path.join(d, f), os.path.join(out, f"{dtype}-{f}"))

out = os.path.join(seeds, "scheme")
os.makedirs(out, exist_ok=True)
for n in ["W4A8KV4", "w3g128", "NF3G64A8", "NF4CH", "W2CH", "FP", "none", "W16A8KV16", "W8A8"]:
    open(os.path.join(out, "name-" + n), "w").write(n)
for name, scheme in SCHEMES.items():
    open(os.path.join(out, name + ".json"), "w").write(json.dumps(scheme))
open(os.path.join(out, "overrides.json"), "w").write(json.dumps(
    {"format_version": 1, "weight": {"bits": 3, "format": {"kind": "asym_group", "group_size": 32}, "grad": "ste"}, "act": {"bits": 8},
     "overrides": [{"pattern": "layers.0.*", "weight": None, "act": None}, {"pattern": "layers.*.mlp.down_proj", "act": {"bits": 4}}]}))
print("seeds written to", seeds)
