//! The corrupt-input matrix (issue 5): every damaged input a user can hand a tool — shards
//! truncated, flipped, mixed from another teacher or tokenizer, badly listed or with invalid
//! rows; model dirs with a missing, misshapen or mistyped tensor or a truncated file; packed
//! dirs whose metadata disagrees with their tensors; corpora that are not UTF-8 — must stop the
//! tool with exit 2 and a message naming the file and what is wrong, and leave no output
//! (`OUT`, `OUT.work`, `OUT.partial`) behind. Shards are read by `qat-distill` and `qat-clip`,
//! model dirs by `qat-eval`, `qat-distill` and `qat-pack`, packed dirs and corpora by `qat-eval`.

mod common;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float16Type, UInt16Type, UInt32Type};
use arrow_array::{
    Array, ArrayRef, Float16Array, ListArray, RecordBatch, UInt16Array, UInt32Array,
};
use candle_core::{DType, Device, Tensor};
use common::*;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

fn sample(model: &Path, out: &Path, extra: &[&str]) {
    let mut a = vec![
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    a.extend_from_slice(SMALL_SHARD_ARGS);
    a.extend_from_slice(extra);
    ok_json(&qat_sample(&a));
}

fn sibling(out: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}{suffix}", out.display()))
}

/// Exit 2 with `tool: ...needle...`, and neither `out` nor `out.work` / `out.partial`.
fn refused(r: &Output, tool: &str, needle: &str, out: &Path) {
    assert_error(r, tool, needle);
    for p in [
        out.to_path_buf(),
        sibling(out, ".work"),
        sibling(out, ".partial"),
    ] {
        assert!(
            !p.exists(),
            "{tool}: {} left behind after: {}",
            p.display(),
            stderr(r)
        );
    }
}

fn edit_manifest(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap() + "\n").unwrap();
}

/// Points manifest.json's entry of `name` at the file's current size and sha256, as a producer
/// that wrote bad rows (or a hand-rebuilt manifest) would: only the content is wrong.
fn relist(dir: &Path, name: &str) {
    let bytes = std::fs::metadata(dir.join(name)).unwrap().len();
    let sha = qat_shards::sha256_file(&dir.join(name)).unwrap();
    edit_manifest(&dir.join("manifest.json"), |m| {
        for e in m["files"].as_array_mut().unwrap() {
            if e["name"] == name {
                e["bytes"] = bytes.into();
                e["sha256"] = sha.clone().into();
            }
        }
    });
}

/// Rewrites shard file `path` with the Parquet API directly (qat-shards' writer validates and
/// would refuse), keeping its key-value metadata, after `edit` on its single record batch.
fn rewrite_shard(path: &Path, edit: impl FnOnce(RecordBatch) -> RecordBatch) {
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).unwrap()).unwrap();
    let kv: Vec<_> = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .unwrap()
        .iter()
        .filter(|kv| kv.key != "ARROW:schema")
        .cloned()
        .collect();
    let batches: Vec<RecordBatch> = builder
        .with_batch_size(1 << 16)
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(batches.len(), 1);
    let batch = edit(batches.into_iter().next().unwrap());
    let props = WriterProperties::builder()
        .set_key_value_metadata(Some(kv))
        .build();
    let mut w = ArrowWriter::try_new(
        std::fs::File::create(path).unwrap(),
        batch.schema(),
        Some(props),
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// `batch` with the values of list column `col` replaced (offsets kept).
fn with_list_values(batch: &RecordBatch, col: usize, values: ArrayRef) -> RecordBatch {
    let l = batch.column(col).as_list::<i32>();
    let arrow_schema::DataType::List(field) = l.data_type() else {
        unreachable!()
    };
    let mut cols = batch.columns().to_vec();
    cols[col] = Arc::new(ListArray::new(
        field.clone(),
        l.offsets().clone(),
        values,
        None,
    ));
    RecordBatch::try_new(batch.schema(), cols).unwrap()
}

/// Every way a shard set can be damaged, each refused by `qat-distill` and `qat-clip` before
/// they write anything, with a message naming the file (or directory) and the fault.
#[test]
fn damaged_shard_sets_are_refused_by_distill_and_clip() {
    let tmp = fast_tempdir();
    let t = tmp.path();
    let model = stories_dir();
    let good = t.join("good");
    sample(&model, &good, &[]);
    // Partitions of one set from different seeds, or from a model copy whose tokenizer changed.
    let other_model = t.join("retokenized");
    copy_dir(&model, &other_model);
    let mut tok = std::fs::read_to_string(model.join("tokenizer.json")).unwrap();
    tok.push('\n');
    std::fs::write(other_model.join("tokenizer.json"), tok).unwrap();
    let (seed1, p0, p1_seed1, p1_tok) = (
        t.join("seed1"),
        t.join("p0"),
        t.join("p1-seed1"),
        t.join("p1-tok"),
    );
    sample(&model, &seed1, &["--seed", "1"]);
    sample(&model, &p0, &["--shard", "0/2"]);
    sample(&model, &p1_seed1, &["--shard", "1/2", "--seed", "1"]);
    sample(&other_model, &p1_tok, &["--shard", "1/2"]);

    let good_manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(good.join("manifest.json")).unwrap())
            .unwrap();
    let size0 = good_manifest["files"][0]["bytes"].as_u64().unwrap();
    let sha0 = good_manifest["files"][0]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let case = |name: &str, from: &[&Path], edit: &dyn Fn(&Path)| -> PathBuf {
        let d = t.join(name);
        for f in from {
            copy_dir(f, &d);
        }
        edit(&d);
        d
    };
    let s0 = "shard-00000.parquet";
    let cases: Vec<(PathBuf, String)> = vec![
        (
            case("truncated", &[&good], &|d| {
                let b = std::fs::read(d.join(s0)).unwrap();
                std::fs::write(d.join(s0), &b[..b.len() / 2]).unwrap();
            }),
            format!("truncated/{s0}: has {} bytes, manifest.json says {size0} (truncated or replaced?)", size0 / 2),
        ),
        (
            // Truncated by the producer (manifest entry made to match): the Parquet footer is gone.
            case("truncated-listed", &[&good], &|d| {
                let b = std::fs::read(d.join(s0)).unwrap();
                std::fs::write(d.join(s0), &b[..b.len() - 100]).unwrap();
                relist(d, s0);
            }),
            format!("truncated-listed/{s0}: parquet: Parquet error: Invalid Parquet file. Corrupt footer"),
        ),
        (
            // One flipped byte inside a compressed page decodes without a Parquet error: only
            // the sha256 catches it (qat-clip read such files silently before issue 5).
            case("flipped", &[&good], &|d| {
                let mut b = std::fs::read(d.join(s0)).unwrap();
                b[2000] ^= 0x40;
                std::fs::write(d.join(s0), b).unwrap();
            }),
            format!("flipped/{s0}: sha256 mismatch: manifest says {sha0}, file has "),
        ),
        (
            // A file of another sampling seed copied over one of the set.
            case("foreign-file", &[&good], &|d| {
                std::fs::copy(seed1.join(s0), d.join(s0)).unwrap();
            }),
            format!("foreign-file/{s0}: has {} bytes, manifest.json says {size0} (truncated or replaced?)", std::fs::metadata(seed1.join(s0)).unwrap().len()),
        ),
        (
            // ... and listed as if it belonged: its embedded header gives it away.
            case("foreign-file-listed", &[&good], &|d| {
                std::fs::copy(seed1.join(s0), d.join(s0)).unwrap();
                relist(d, s0);
            }),
            format!("foreign-file-listed/{s0}: embedded qat.header differs from the manifest: sampling.seed: 1 vs 0; seed: 1 vs 0 (file vs manifest)"),
        ),
        (case("mixed-seed", &[&p0, &p1_seed1], &|_| {}), "mixed-seed/manifest.1-of-2.json: header differs from manifest.0-of-2.json: sampling.seed: 0 vs 1; seed: 0 vs 1".into()),
        (case("mixed-tokenizer", &[&p0, &p1_tok], &|_| {}), "mixed-tokenizer/manifest.1-of-2.json: header differs from manifest.0-of-2.json: teacher.tokenizer_sha256: ".into()),
        (case("half-partitioned", &[&p0], &|_| {}), "half-partitioned: partition 1/2 is missing (manifest.1-of-2.json not found)".into()),
        (
            case("no-manifest", &[&good], &|d| std::fs::remove_file(d.join("manifest.json")).unwrap()),
            "no-manifest: no manifest found (expected manifest.json or manifest.I-of-N.json)".into(),
        ),
        (case("empty", &[], &|d| std::fs::create_dir_all(d).unwrap()), "empty: no manifest found".into()),
        (
            case("missing-file", &[&good], &|d| std::fs::remove_file(d.join("shard-00002.parquet")).unwrap()),
            "missing-file/shard-00002.parquet: listed in manifest.json but does not exist".into(),
        ),
        (
            case("incomplete", &[&good], &|d| {
                edit_manifest(&d.join("manifest.json"), |m| {
                    m["files"].as_array_mut().unwrap().pop();
                    m["complete"] = false.into();
                })
            }),
            "incomplete: partition 0/1 is incomplete (3 of 4 files): rerun qat-sample --shard 0/1 to resume".into(),
        ),
        (
            case("manifest-not-json", &[&good], &|d| {
                let b = std::fs::read(d.join("manifest.json")).unwrap();
                std::fs::write(d.join("manifest.json"), &b[..b.len() / 2]).unwrap();
            }),
            "manifest-not-json/manifest.json: invalid JSON: EOF while parsing".into(),
        ),
        (
            case("token-id", &[&good], &|d| {
                rewrite_shard(&d.join(s0), |b| {
                    let mut v = b.column(2).as_list::<i32>().values().as_primitive::<UInt32Type>().values().to_vec();
                    v[3] = 600;
                    with_list_values(&b, 2, Arc::new(UInt32Array::from(v)))
                });
                relist(d, s0);
            }),
            format!("token-id/{s0}: row with seq_id 0: tokens[3] = 600 is not < vocab_size 512"),
        ),
        (
            case("topk-id", &[&good], &|d| {
                rewrite_shard(&d.join(s0), |b| {
                    let mut v = b.column(3).as_list::<i32>().values().as_primitive::<UInt16Type>().values().to_vec();
                    v[2 * 16 + 5] = 512;
                    with_list_values(&b, 3, Arc::new(UInt16Array::from(v)))
                });
                relist(d, s0);
            }),
            format!("topk-id/{s0}: row with seq_id 0: topk id 512 at position 2 rank 5 is not < vocab_size 512"),
        ),
        (
            case("nan-logprob", &[&good], &|d| {
                rewrite_shard(&d.join(s0), |b| {
                    let mut v = b.column(4).as_list::<i32>().values().as_primitive::<Float16Type>().values().to_vec();
                    v[16] = half::f16::NAN;
                    with_list_values(&b, 4, Arc::new(Float16Array::from(v)))
                });
                relist(d, s0);
            }),
            format!("nan-logprob/{s0}: row with seq_id 0: topk logprob NaN at position 1 rank 0 must be finite and <= 0.001"),
        ),
    ];

    let m = model.to_str().unwrap();
    for (dir, needle) in &cases {
        let name = dir.file_name().unwrap().to_str().unwrap();
        let s = dir.to_str().unwrap();
        let out = t.join(format!("out-distill-{name}"));
        let r = qat_distill(&[
            "--model",
            m,
            "--shards",
            s,
            "--out",
            out.to_str().unwrap(),
            "--scheme",
            "W4",
            "-b",
            "4",
            "--steps",
            "2",
            "-q",
        ]);
        refused(&r, "qat-distill", needle, &out);
        let out = t.join(format!("out-clip-{name}"));
        let r = qat_clip(&[
            "--model",
            m,
            "--shards",
            s,
            "--scheme",
            "W2CH",
            "--out",
            out.to_str().unwrap(),
            "--calib-sequences",
            "8",
            "--calib-len",
            "48",
            "-q",
        ]);
        refused(&r, "qat-clip", needle, &out);
    }
    // The shards the damaged copies came from are fine.
    let out = t.join("out-good");
    ok_json(&qat_clip(&[
        "--model",
        m,
        "--shards",
        good.to_str().unwrap(),
        "--scheme",
        "W2CH",
        "--out",
        out.to_str().unwrap(),
        "--calib-sequences",
        "8",
        "--calib-len",
        "48",
        "-q",
    ]));
}

/// A copy of stories260K (config, tokenizer, weights) with `edit` applied to its tensors, or,
/// with `raw`, to the bytes of model.safetensors.
fn damaged_model(
    dir: &Path,
    edit: impl FnOnce(&mut HashMap<String, Tensor>),
    raw: impl FnOnce(&mut Vec<u8>),
) {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(stories_dir().join(f), dir.join(f)).unwrap();
    }
    let mut tensors =
        candle_core::safetensors::load(stories_dir().join("model.safetensors"), &Device::Cpu)
            .unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let mut bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    raw(&mut bytes);
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    std::fs::write(
        dir.join("quant_scheme.json"),
        r#"{"format_version": 1, "weight": {"bits": 4, "format": {"kind": "sym_per_channel"}}}"#,
    )
    .unwrap();
}

/// Model dirs with a missing tensor, a wrong shape or dtype, or a truncated weights file are
/// refused by every tool that reads them, before any output is written.
#[test]
fn damaged_model_dirs_are_refused_by_eval_distill_and_pack() {
    let tmp = fast_tempdir();
    let t = tmp.path();
    let shards = t.join("shards");
    small_shards(&shards);
    let up = "model.layers.2.mlp.up_proj.weight";
    let down = "model.layers.0.mlp.down_proj.weight";
    let keep = |_: &mut Vec<u8>| {};
    let cases: Vec<(PathBuf, String)> = vec![
        {
            let d = t.join("missing-tensor");
            damaged_model(&d, |w| drop(w.remove(up)), keep);
            (
                d,
                format!("missing-tensor: tensor {up} is missing from the checkpoint"),
            )
        },
        {
            let d = t.join("wrong-shape");
            damaged_model(
                &d,
                |w| {
                    let x = w[down].t().unwrap().contiguous().unwrap();
                    w.insert(down.into(), x);
                },
                keep,
            );
            (d, format!("wrong-shape/model.safetensors: tensor {down} has shape [172, 64], expected [64, 172] from config.json"))
        },
        {
            let d = t.join("wrong-dtype");
            damaged_model(
                &d,
                |w| {
                    let x = w["model.norm.weight"].to_dtype(DType::I64).unwrap();
                    w.insert("model.norm.weight".into(), x);
                },
                keep,
            );
            (d, "wrong-dtype/model.safetensors: tensor model.norm.weight has dtype I64, expected a float type (F32, F16 or BF16)".into())
        },
        {
            let d = t.join("truncated");
            damaged_model(&d, |_| {}, |b| b.truncate(b.len() - 1000));
            (
                d,
                "truncated/model.safetensors: invalid safetensors file: ".into(),
            )
        },
        {
            let d = t.join("header-cut");
            damaged_model(&d, |_| {}, |b| b.truncate(100));
            (
                d,
                "header-cut/model.safetensors: invalid safetensors file: ".into(),
            )
        },
    ];
    let corpus = tinystories();
    for (dir, needle) in &cases {
        let (name, m) = (
            dir.file_name().unwrap().to_str().unwrap(),
            dir.to_str().unwrap(),
        );
        let r = qat_eval(&[
            "--model",
            m,
            "--corpus",
            corpus.to_str().unwrap(),
            "--limit",
            "1",
            "-q",
        ]);
        assert_error(&r, "qat-eval", needle);
        let out = t.join(format!("out-distill-{name}"));
        let r = qat_distill(&[
            "--model",
            m,
            "--shards",
            shards.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "-b",
            "4",
            "--steps",
            "2",
            "-q",
        ]);
        refused(&r, "qat-distill", needle, &out);
        let out = t.join(format!("out-pack-{name}"));
        let r = qat_pack(&["--model", m, "--out", out.to_str().unwrap()]);
        refused(&r, "qat-pack", needle, &out);
    }
}

/// Replaces every occurrence (or only the first, with `first`) of `from` after `anchor` in a
/// safetensors header by `to` of the same length, so the file stays valid safetensors.
fn patch_header(bytes: &mut [u8], anchor: &str, from: &str, to: &str, first: bool) {
    assert_eq!(from.len(), to.len());
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = &mut bytes[8..8 + n];
    let find = |h: &[u8], what: &str, at: usize| {
        h[at..]
            .windows(what.len())
            .position(|w| w == what.as_bytes())
            .map(|p| p + at)
    };
    let mut at = find(header, anchor, 0).unwrap_or_else(|| panic!("{anchor} not in the header"));
    let mut hits = 0;
    while let Some(p) = find(header, from, at) {
        header[p..p + from.len()].copy_from_slice(to.as_bytes());
        (at, hits) = (p + from.len(), hits + 1);
        if first {
            break;
        }
    }
    assert!(hits > 0, "{from} not in the header after {anchor}");
}

/// Packed dirs whose metadata disagrees with their tensors (or with quant_scheme.json), and
/// packed dirs read with a corpus that is not UTF-8: `qat-eval` refuses them with exit 2.
#[test]
fn packed_dirs_whose_metadata_disagrees_with_their_tensors_are_refused() {
    let tmp = fast_tempdir();
    let t = tmp.path();
    let student = t.join("student");
    damaged_model(&student, |_| {}, |_| {});
    let packed = t.join("packed");
    ok_json(&qat_pack(&[
        "--model",
        student.to_str().unwrap(),
        "--out",
        packed.to_str().unwrap(),
    ]));
    let file = "model.packed.safetensors";
    let damaged = |name: &str, edit: &dyn Fn(&mut Vec<u8>), scheme: Option<&str>| {
        let d = t.join(name);
        copy_dir(&packed, &d);
        let mut b = std::fs::read(d.join(file)).unwrap();
        edit(&mut b);
        std::fs::write(d.join(file), b).unwrap();
        if let Some(s) = scheme {
            std::fs::write(d.join("quant_scheme.json"), s).unwrap();
        }
        d
    };
    let w3 =
        r#"{"format_version": 1, "weight": {"bits": 3, "format": {"kind": "sym_per_channel"}}}"#;
    let cases: Vec<(PathBuf, String)> = vec![
        (
            damaged("layer-bits", &|b| patch_header(b, "\"qat.layers\"", "\\\"bits\\\":4", "\\\"bits\\\":3", true), None),
            format!("layer-bits/{file}: metadata qat.layers: disagrees with qat.scheme and config.json at entry 0: found {{\"name\":\"model.layers.0.self_attn.q_proj\",\"out_features\":64,\"in_features\":64,\"bits\":3,"),
        ),
        (
            // Scheme, layer table and quant_scheme.json all say 3 bits; the tensors hold 4-bit codes.
            damaged("metadata-3-bit-tensors-4-bit", &|b| patch_header(b, "__metadata__", "\\\"bits\\\":4", "\\\"bits\\\":3", false), Some(w3)),
            format!("metadata-3-bit-tensors-4-bit/{file}: tensor model.layers.0.self_attn.q_proj.qweight: shape [64, 32], expected [64, 24]"),
        ),
        (
            damaged("scheme-file", &|_| {}, Some(w3)),
            "scheme-file/quant_scheme.json: differs from the packed file's qat.scheme: found W3, the file has W4".into(),
        ),
        (
            damaged("missing-tensor", &|b| patch_header(b, "\"model.norm.weight\"", "\"model.norm.weight\"", "\"model.norX.weight\"", true), None),
            format!("missing-tensor/{file}: tensor model.norm.weight is missing"),
        ),
        (
            damaged("scales-dtype", &|b| patch_header(b, "\"model.layers.3.mlp.gate_proj.scales\"", "\"F16\"", "\"U16\"", true), None),
            format!("scales-dtype/{file}: tensor model.layers.3.mlp.gate_proj.scales: dtype U16, expected F16"),
        ),
        (
            damaged("offsets", &|b| patch_header(b, "\"model.layers.0.self_attn.q_proj.qweight\"", "\"data_offsets\":[", "\"data_offsetz\":[", true), None),
            format!("offsets/{file}: not a valid safetensors file: "),
        ),
    ];
    let corpus = tinystories();
    for (dir, needle) in &cases {
        let r = qat_eval(&[
            "--model",
            dir.to_str().unwrap(),
            "--corpus",
            corpus.to_str().unwrap(),
            "--limit",
            "1",
            "-q",
        ]);
        assert_error(&r, "qat-eval", needle);
    }
    // A corpus that is not UTF-8 (UTF-16 with its byte-order mark) is refused for a packed model too.
    let utf16 = t.join("utf16.txt");
    let mut bytes = vec![0xff, 0xfe];
    bytes.extend(
        "Once upon a time"
            .encode_utf16()
            .flat_map(|u| u.to_le_bytes()),
    );
    std::fs::write(&utf16, bytes).unwrap();
    let r = qat_eval(&[
        "--model",
        packed.to_str().unwrap(),
        "--corpus",
        utf16.to_str().unwrap(),
        "-q",
    ]);
    assert_error(
        &r,
        "qat-eval",
        "utf16.txt: not UTF-8: invalid byte at offset 0",
    );
}

/// A bad `--scheme` (a JSON file with an unknown field, or a short name that does not parse)
/// is refused by every tool that takes one, naming the flag once and the file or value once:
/// `tool: --scheme: FILE: invalid scheme JSON: ...` (it used to repeat the value,
/// `--scheme FILE: FILE: ...`).
#[test]
fn bad_scheme_names_the_flag_and_the_file_once() {
    let t = fast_tempdir();
    let bad = t.path().join("bad-scheme.json");
    std::fs::write(&bad, "{\"bogus\": 1}\n").unwrap();
    let bad = bad.to_str().unwrap();
    let model = stories_dir();
    let m = model.to_str().unwrap();
    let corpus = tinystories();
    let out = t.path().join("out");
    let o = out.to_str().unwrap();
    let shards = t.path().join("no-shards");
    let s = shards.to_str().unwrap();
    for (arg, needle) in [
        (
            bad,
            format!("--scheme: {bad}: invalid scheme JSON: unknown field `bogus`"),
        ),
        (
            "W4X",
            "--scheme: invalid scheme \"W4X\": unexpected \"X\" at position 2".to_string(),
        ),
    ] {
        let runs = [
            (
                "qat-eval",
                qat_eval(&[
                    "--model",
                    m,
                    "--corpus",
                    corpus.to_str().unwrap(),
                    "--scheme",
                    arg,
                ]),
            ),
            (
                "qat-distill",
                qat_distill(&[
                    "--model", m, "--shards", s, "--out", o, "--scheme", arg, "-q",
                ]),
            ),
            (
                "qat-clip",
                qat_clip(&[
                    "--model", m, "--shards", s, "--out", o, "--scheme", arg, "-q",
                ]),
            ),
        ];
        for (tool, r) in runs {
            refused(&r, tool, &needle, &out);
            assert_eq!(
                stderr(&r).matches(arg).count(),
                1,
                "{tool}: the value is repeated: {}",
                stderr(&r)
            );
        }
    }
}
