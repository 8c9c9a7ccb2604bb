#!/usr/bin/env python3
"""Foreign reader for qat teacher shards (formats/shards.md, version 1).

Uses only pyarrow and the Python standard library, and only what formats/shards.md specifies:
it never imports or calls qat code. It validates a shard-set directory (manifests, partitions,
sha256 of every file, key-value metadata, schema, per-row invariants), reshapes the flattened
top-K arrays by K and prints a JSON summary on stdout. Any violation exits with status 1 and a
message on stderr.

Usage: read_shards.py SHARD_DIR
"""

import hashlib
import json
import math
import os
import re
import sys

import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = 1
MANIFEST_RE = re.compile(r"manifest(?:\.(\d+)-of-(\d+))?\.json")


class FormatError(Exception):
    pass


def fail(msg):
    raise FormatError(msg)


def comparable(header):
    """The header without the fields that are never compared (tool, teacher.source)."""
    h = json.loads(json.dumps(header))
    h.pop("tool", None)
    h.get("teacher", {}).pop("source", None)
    return h


def load_manifests(d):
    """Section 2 'Validity of a shard set', rules 1-5. Returns (header, sorted file entries, N)."""
    found = []
    for name in sorted(os.listdir(d)):
        m = MANIFEST_RE.fullmatch(name)
        if not m:
            continue
        if m.group(1) is None:
            part = (0, 1)
        else:
            part = (int(m.group(1)), int(m.group(2)))
            if part[1] < 2 or part[0] >= part[1]:
                fail(f"{name}: invalid manifest name")
        found.append((name, part))
    if not found:
        fail(f"{d}: no manifest")
    counts = {p[1] for _, p in found}
    if len(counts) != 1:
        fail(f"{d}: manifests of different partition counts: {[n for n, _ in found]}")
    n = counts.pop()
    present = {p[0] for _, p in found}
    for i in range(n):
        if i not in present:
            fail(f"{d}: partition {i}/{n} missing")

    manifests = []
    for name, (i, cnt) in found:
        with open(os.path.join(d, name), "rb") as f:
            m = json.loads(f.read().decode("utf-8"))
        if m["header"]["format_version"] != FORMAT_VERSION:
            fail(f"{name}: format_version {m['header']['format_version']}")
        if m["partition"] != {"index": i, "count": cnt}:
            fail(f"{name}: partition {m['partition']} does not match the file name")
        if m["complete"] is not True:
            fail(f"{name}: partition {i}/{cnt} incomplete")
        manifests.append((name, m))

    header = manifests[0][1]["header"]
    for name, m in manifests[1:]:
        if comparable(m["header"]) != comparable(header):
            fail(f"{name}: header differs from {manifests[0][0]}")

    h = header
    V, K, S = h["teacher"]["vocab_size"], h["top_k"], h["seqs_per_file"]
    if not 1 <= K <= V:
        fail(f"top_k {K} not in 1..={V}")
    if h["id_dtype"] != ("u16" if V <= 65536 else "u32"):
        fail(f"id_dtype {h['id_dtype']} wrong for vocab_size {V}")
    if h["logprob_dtype"] not in ("f16", "f32"):
        fail(f"logprob_dtype {h['logprob_dtype']}")
    if h["num_files"] != -(-h["num_sequences"] // S):
        fail("num_files != ceil(num_sequences / seqs_per_file)")

    by_index = {}
    for name, m in manifests:
        i, cnt = m["partition"]["index"], m["partition"]["count"]
        owned = [f for f in range(h["num_files"]) if f % cnt == i]
        listed = [e["file_index"] for e in m["files"]]
        if listed != owned:
            fail(f"{name}: lists files {listed}, partition owns {owned}")
        for e in m["files"]:
            f = e["file_index"]
            if f in by_index:
                fail(f"{e['name']} listed twice")
            first = f * S
            rows = min(first + S, h["num_sequences"]) - first
            if e["name"] != f"shard-{f:05d}.parquet" or e["first_seq_id"] != first or e["rows"] != rows:
                fail(f"{name}: bad entry {e}")
            by_index[f] = e
    if sorted(by_index) != list(range(h["num_files"])):
        fail("files do not cover 0..num_files exactly once")
    return header, [by_index[f] for f in sorted(by_index)], n


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def expected_schema(header):
    ids = pa.uint16() if header["id_dtype"] == "u16" else pa.uint32()
    lps = pa.float16() if header["logprob_dtype"] == "f16" else pa.float32()
    return [
        ("seq_id", pa.uint64()),
        ("prompt_len", pa.uint32()),
        ("tokens", pa.list_(pa.uint32())),
        ("topk_ids", pa.list_(ids)),
        ("topk_logprobs", pa.list_(lps)),
    ]


def same_type(a, b):
    if pa.types.is_list(a) and pa.types.is_list(b):
        return a.value_type == b.value_type
    return a == b


def check_file(d, header, entry, summary):
    path = os.path.join(d, entry["name"])
    name = entry["name"]
    # Section 8: size and sha256 of the complete file bytes.
    if os.path.getsize(path) != entry["bytes"]:
        fail(f"{name}: size {os.path.getsize(path)} != manifest bytes {entry['bytes']}")
    actual = sha256_of(path)
    if actual != entry["sha256"]:
        fail(f"{name}: sha256 {actual} != manifest {entry['sha256']}")

    pf = pq.ParquetFile(path)
    kv = {k.decode(): v.decode() for k, v in (pf.metadata.metadata or {}).items()}
    # Section 4.2: key-value metadata.
    if kv.get("qat.format_version") != "1":
        fail(f"{name}: qat.format_version {kv.get('qat.format_version')!r}")
    embedded = json.loads(kv["qat.header"])
    if embedded["teacher"]["source"] != "":
        fail(f"{name}: qat.header teacher.source must be empty")
    if comparable(embedded) != comparable(header):
        fail(f"{name}: qat.header differs from the manifest header")
    t = header["teacher"]
    scalars = {
        "qat.file_index": str(entry["file_index"]),
        "qat.top_k": str(header["top_k"]),
        "qat.vocab_size": str(t["vocab_size"]),
        "qat.logprob_dtype": header["logprob_dtype"],
        "qat.id_dtype": header["id_dtype"],
        "qat.seed": str(header["seed"]),
        "qat.teacher.weights_sha256": t["weights_sha256"],
        "qat.teacher.tokenizer_sha256": t["tokenizer_sha256"],
    }
    for k, v in scalars.items():
        if kv.get(k) != v:
            fail(f"{name}: {k} = {kv.get(k)!r}, expected {v!r}")

    # Section 4: schema, by name and type, all non-null.
    schema = pf.schema_arrow
    for col, typ in expected_schema(header):
        field = schema.field(col)
        if not same_type(field.type, typ):
            fail(f"{name}: column {col} has type {field.type}, expected {typ}")
    if pf.metadata.num_rows != entry["rows"]:
        fail(f"{name}: {pf.metadata.num_rows} rows, manifest says {entry['rows']}")

    K, V = header["top_k"], t["vocab_size"]
    next_seq = entry["first_seq_id"]
    file_tokens = 0
    for batch in pf.iter_batches(batch_size=64):
        for row in batch.to_pylist():
            seq = row["seq_id"]
            where = f"{name}: seq_id {seq}"
            if seq != next_seq:
                fail(f"{where}: expected seq_id {next_seq}")
            next_seq += 1
            tokens, plen = row["tokens"], row["prompt_len"]
            ids_flat, lps_flat = row["topk_ids"], row["topk_logprobs"]
            L = len(tokens)
            if L < 1 or not 1 <= plen <= L:
                fail(f"{where}: L {L}, prompt_len {plen}")
            if len(ids_flat) != (L - 1) * K or len(lps_flat) != (L - 1) * K:
                fail(f"{where}: list lengths {len(ids_flat)}, {len(lps_flat)} != (L-1)*K = {(L - 1) * K}")
            if any(x is None or x >= V for x in tokens) or any(x is None or x >= V for x in ids_flat):
                fail(f"{where}: id >= vocab_size {V}")
            # Section 4.1: reshape [(L-1)*K] -> [L-1][K]; position i, rank j at i*K + j.
            ids = [ids_flat[i * K:(i + 1) * K] for i in range(L - 1)]
            lps = [lps_flat[i * K:(i + 1) * K] for i in range(L - 1)]
            for i in range(L - 1):
                if len(set(ids[i])) != K:
                    fail(f"{where}: position {i}: ids not distinct")
                for j in range(K):
                    v = lps[i][j]
                    if v is None or not math.isfinite(v) or v > 0.0:
                        fail(f"{where}: position {i} rank {j}: logprob {v}")
                    if j > 0 and v > lps[i][j - 1]:
                        fail(f"{where}: position {i}: logprobs not descending at rank {j}")
                summary["sum_tail_mass"] += max(0.0, 1.0 - math.fsum(math.exp(v) for v in lps[i]))
                if i >= plen - 1:
                    summary["trained_positions"] += 1
                summary["sum_rank0_logprob"] += lps[i][0]
            summary["rows"] += 1
            summary["tokens"] += L
            summary["positions"] += L - 1
            summary["sum_token_ids"] += sum(tokens)
            summary["sum_topk_ids"] += sum(ids_flat)
            summary["_logprobs"].extend(lps_flat)
            file_tokens += L
    if next_seq != entry["first_seq_id"] + entry["rows"]:
        fail(f"{name}: ended at seq_id {next_seq}")
    if file_tokens != entry["tokens"]:
        fail(f"{name}: {file_tokens} tokens, manifest says {entry['tokens']}")


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    d = argv[1]
    try:
        header, files, n = load_manifests(d)
        summary = {
            "rows": 0,
            "tokens": 0,
            "positions": 0,
            "trained_positions": 0,
            "sum_token_ids": 0,
            "sum_topk_ids": 0,
            "sum_tail_mass": 0.0,
            "sum_rank0_logprob": 0.0,
            "_logprobs": [],
        }
        for entry in files:
            check_file(d, header, entry, summary)
    except (FormatError, KeyError, ValueError, OSError, pa.ArrowException) as e:
        print(f"read_shards.py: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    summary["sum_logprobs"] = math.fsum(summary.pop("_logprobs"))
    summary.update(
        files=len(files),
        partitions=n,
        top_k=header["top_k"],
        logprob_dtype=header["logprob_dtype"],
        id_dtype=header["id_dtype"],
        num_sequences=header["num_sequences"],
    )
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
