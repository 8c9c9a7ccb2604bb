#!/usr/bin/env python3
"""Foreign reader for qat packed models (formats/packed.md, version 1).

Uses only the `safetensors` package (numpy API), numpy and the Python standard library, and only
what formats/packed.md specifies: it never imports or calls qat code. It validates a packed model
directory (file size against the header, metadata, layer table against config.json, tensor
names, dtypes and shapes, padding bits, code / zero-point / scale ranges), unpacks and
dequantizes every quantized layer, and prints a JSON summary on stdout. Any violation exits with
status 1 and a message on stderr.

If EXPECTED is given (a safetensors file of f32 tensors named `<prefix>.weight`), every
dequantized layer found there must equal it bit for bit.

Usage: read_packed.py PACKED_DIR [EXPECTED]
"""

import json
import math
import os
import struct
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

FILE = "model.packed.safetensors"
FORMAT = "qat-packed"
VERSION = "1"
# Section 5: the f32 bit patterns of the NF levels (authoritative).
L3 = np.array([0xBF800000, 0xBF08F740, 0xBE7CDB96, 0x00000000, 0x3E3BBCD5, 0x3EC394B6, 0x3F1F7BFD,
               0x3F800000], dtype=np.uint32).view(np.float32)
L4 = np.array([0xBF800000, 0xBF3239B1, 0xBF066B30, 0xBECA32A0, 0xBE91A24D, 0xBE3D353F, 0xBDBA7871,
               0x00000000, 0x3DA2FAFF, 0x3E24CAE3, 0x3E7C04DD, 0x3EAD033A, 0x3EE1A4B8, 0x3F1007AB,
               0x3F3913B3, 0x3F800000], dtype=np.uint32).view(np.float32)
CODEBOOKS = {"nf3": "bitdistiller-n2f3", "nf4": "qlora-nf4"}
ENTRY_FIELDS = {"name", "out_features", "in_features", "bits", "format", "group_size", "codebook"}
MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


class FormatError(Exception):
    pass


def fail(msg):
    raise FormatError(msg)


def check_size(path):
    """Section 2: the file is exactly 8 + N + data length bytes."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            fail(f"{path}: truncated: {size} bytes, expected at least 8")
        (n,) = struct.unpack("<Q", raw)
        head = f.read(n)
    if len(head) < n:
        fail(f"{path}: truncated: {size} bytes, the header alone needs {8 + n}")
    header = json.loads(head.decode("utf-8"))
    end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"] or [0])
    if size != 8 + n + end:
        fail(f"{path}: truncated or damaged: {size} bytes, expected {8 + n + end}")
    return header


def linear_shapes(cfg):
    """(out, in) of every linear layer prefix, from config.json."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or h // heads
    q, kv = heads * hd, kv_heads * hd
    shape = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
             "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    return {f"model.layers.{l}.{MODULES[m]}.{m}": shape[m]
            for l in range(cfg["num_hidden_layers"]) for m in MODULES}


def plain_shapes(cfg, quantized):
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for l in range(cfg["num_hidden_layers"]):
        out[f"model.layers.{l}.input_layernorm.weight"] = (h,)
        out[f"model.layers.{l}.post_attention_layernorm.weight"] = (h,)
    if not cfg.get("tie_word_embeddings", False):
        out["lm_head.weight"] = (v, h)
    for prefix, shape in linear_shapes(cfg).items():
        if prefix not in quantized:
            out[prefix + ".weight"] = shape
    return out


def expect(tensors, name, dtype, shape):
    if name not in tensors:
        fail(f"tensor {name} is missing")
    t = tensors[name]
    if t.dtype != dtype:
        fail(f"tensor {name}: dtype {t.dtype}, expected {dtype}")
    if tuple(t.shape) != tuple(shape):
        fail(f"tensor {name}: shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def dequantize(tensors, e):
    """Sections 4-5: unpack the codes of layer entry `e`, check them, return W as f32."""
    out, inp, b, g, fmt = e["out_features"], e["in_features"], e["bits"], e["group_size"], e["format"]
    p = e["name"]
    if inp % g:
        fail(f"{p}: group_size {g} does not divide in_features {inp}")
    n_groups, bpr = inp // g, (inp * b + 7) // 8
    q = expect(tensors, p + ".qweight", np.uint8, (out, bpr))
    bits = np.unpackbits(q, axis=1, bitorder="little")
    if bits[:, inp * b:].any():
        row = int(np.nonzero(bits[:, inp * b:].any(axis=1))[0][0])
        fail(f"{p}.qweight: padding bits set in row {row}")
    codes = bits[:, :inp * b].reshape(out, inp, b).astype(np.uint16) @ (1 << np.arange(b, dtype=np.uint16))
    max_code = (1 << b) - 2 if fmt == "sym_per_channel" else (1 << b) - 1
    if codes.max(initial=0) > max_code:
        fail(f"{p}.qweight: code {int(codes.max())} out of range 0..={max_code}")
    sshape = (out, n_groups, 2) if fmt == "nf3" else (out, n_groups)
    s = expect(tensors, p + ".scales", np.float16, sshape).astype(np.float32)
    if not np.isfinite(s).all() or np.signbit(s).any():
        fail(f"{p}.scales: a scale is negative, NaN or infinite")
    rep = lambda a: np.repeat(a, g, axis=1)  # [out, n_groups] -> [out, in]
    c = codes.astype(np.float32)
    if fmt == "sym_per_channel":
        qmax = np.float32((1 << (b - 1)) - 1)
        w = (c - qmax) * rep(s)
    elif fmt == "asym_group":
        z = expect(tensors, p + ".zeros", np.uint8, (out, n_groups))
        if z.max(initial=0) > (1 << b) - 1:
            fail(f"{p}.zeros: zero point {int(z.max())} out of range 0..={(1 << b) - 1}")
        w = (c - rep(z.astype(np.float32))) * rep(s)
    elif fmt == "nf3":
        if b != 3:
            fail(f"{p}: nf3 with bits {b}")
        w = L3[codes] * np.where(codes >= 3, rep(s[:, :, 0]), rep(s[:, :, 1]))
    elif fmt == "nf4":
        if b != 4:
            fail(f"{p}: nf4 with bits {b}")
        w = L4[codes] * rep(s)
    else:
        fail(f"{p}: unknown format {fmt!r}")
    if fmt != "asym_group" and p + ".zeros" in tensors:
        fail(f"unexpected tensor {p}.zeros")
    return w.astype(np.float32), q.nbytes, tensors[p + ".scales"].nbytes, (out * n_groups if fmt == "asym_group" else 0)


def main(argv):
    if len(argv) not in (2, 3):
        fail("usage: read_packed.py PACKED_DIR [EXPECTED]")
    d = argv[1]
    path = os.path.join(d, FILE)
    header = check_size(path)
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata() or {}
    for key in ("qat.format", "qat.format_version", "qat.scheme", "qat.layers", "qat.provenance"):
        if key not in meta:
            fail(f"{path}: metadata {key} missing")
    if meta["qat.format"] != FORMAT:
        fail(f"{path}: qat.format {meta['qat.format']!r}, expected {FORMAT!r}")
    if meta["qat.format_version"] != VERSION:
        fail(f"{path}: qat.format_version {meta['qat.format_version']!r}, expected {VERSION!r}")
    scheme = json.loads(meta["qat.scheme"])
    if scheme.get("format_version") != 1:
        fail(f"{path}: qat.scheme format_version {scheme.get('format_version')}")
    with open(os.path.join(d, "quant_scheme.json")) as f:
        if json.load(f) != scheme:
            fail(f"{d}/quant_scheme.json differs from qat.scheme")
    layers = json.loads(meta["qat.layers"])
    prov = json.loads(meta["qat.provenance"])
    if not prov.get("tool") or len(prov.get("source_weights_sha256", "")) != 64:
        fail(f"{path}: qat.provenance {prov}")

    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    shapes = linear_shapes(cfg)
    order = list(shapes)
    if [e["name"] for e in layers] != sorted((e["name"] for e in layers), key=order.index):
        fail(f"{path}: qat.layers not in model order")
    for e in layers:
        if set(e) != ENTRY_FIELDS:
            fail(f"{path}: qat.layers entry fields {sorted(e)}, expected {sorted(ENTRY_FIELDS)}")
        if (e["out_features"], e["in_features"]) != shapes.get(e["name"]):
            fail(f"{path}: qat.layers {e['name']}: shape {(e['out_features'], e['in_features'])}, config.json says {shapes.get(e['name'])}")
        if e["codebook"] != CODEBOOKS.get(e["format"]):
            fail(f"{path}: qat.layers {e['name']}: codebook {e['codebook']!r}")

    tensors = load_file(path)
    quantized = {e["name"] for e in layers}
    expected_names = set(plain_shapes(cfg, quantized))
    for name, shape in plain_shapes(cfg, quantized).items():
        if name not in tensors:
            fail(f"tensor {name} is missing")
        if tensors[name].dtype not in (np.float32, np.float16):  # numpy has no BF16
            fail(f"tensor {name}: dtype {tensors[name].dtype}, expected F32 or F16")
        if tuple(tensors[name].shape) != shape:
            fail(f"tensor {name}: shape {tuple(tensors[name].shape)}, expected {shape}")
    reference = load_file(argv[2]) if len(argv) == 3 else None
    code_bytes = scale_bytes = zero_bytes = weights = 0
    theory = 0.0
    total = 0.0  # sum of all dequantized weights
    compared = 0
    for e in layers:
        w, cb, sb, zb = dequantize(tensors, e)
        n = w.size
        code_bytes, scale_bytes, zero_bytes, weights = code_bytes + cb, scale_bytes + sb, zero_bytes + zb, weights + n
        g = e["group_size"]
        theory += n * (e["bits"] + (32 if e["format"] == "nf3" else 16) / g + (8 / g if e["format"] == "asym_group" else 0))
        total += math.fsum(w.astype(np.float64).ravel().tolist())
        expected_names |= {e["name"] + ".qweight", e["name"] + ".scales"}
        if e["format"] == "asym_group":
            expected_names.add(e["name"] + ".zeros")
        if reference is not None:
            ref = reference.get(e["name"] + ".weight")
            if ref is None:
                fail(f"EXPECTED lacks {e['name']}.weight")
            if ref.shape != w.shape or not np.array_equal(ref.view(np.uint32), w.view(np.uint32)):
                bad = np.argwhere(ref.view(np.uint32) != w.view(np.uint32))[0]
                fail(f"{e['name']}: dequantized weight differs at {tuple(bad)}: {w[tuple(bad)]!r} vs expected {ref[tuple(bad)]!r}")
            compared += 1
    extra = sorted(set(tensors) - expected_names)
    if extra:
        fail(f"{path}: unexpected tensor {extra[0]}")
    print(json.dumps({
        "layers": len(layers), "quantized_weights": weights, "code_bytes": code_bytes,
        "scale_bytes": scale_bytes, "zero_bytes": zero_bytes,
        "bits_per_weight": 8 * (code_bytes + scale_bytes + zero_bytes) / weights,
        "bits_per_weight_theory": theory / weights, "compared": compared, "sum": total,
        "formats": sorted({f"{e['format']}:{e['bits']}" for e in layers}),
    }))


if __name__ == "__main__":
    try:
        main(sys.argv)
    except FormatError as e:
        print(f"read_packed.py: {e}", file=sys.stderr)
        sys.exit(1)
