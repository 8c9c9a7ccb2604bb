//! CLI tests of `qat-pack` (and `qat-eval` on packed dirs) on stories260K: the packed model is
//! the fake-quantized student exactly (weights bit for bit, same perplexity), its size is the
//! theory's, and damaged packed dirs are clear errors with exit 2.

mod common;

use candle_core::{DType, Device};
use common::*;
use qat_model::ModelDir;
use qat_quant::{fake_weight, Scheme};
use std::path::Path;
use std::process::Command;

/// A "student" made from the teacher: its files plus `scheme` as quant_scheme.json.
fn pack_ok(student: &Path, out: &Path) -> serde_json::Value {
    let summary = ok_json(&qat_pack(&[
        "--model",
        student.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert_documented("qat-pack", &summary);
    summary
}

fn eval(model: &Path) -> serde_json::Value {
    let corpus = tinystories();
    let summary = ok_json(&qat_eval(&[
        "--model",
        model.to_str().unwrap(),
        "--corpus",
        corpus.to_str().unwrap(),
        "--limit",
        "24",
        "--seq-len",
        "256",
        "-q",
    ]));
    assert_documented("qat-eval", &summary);
    summary
}

/// Bits per weight in theory for stories260K (5 blocks; in_features 64 for every layer but
/// down_proj, 172) when a layer with `in` inputs costs `bits(in)` bits per weight.
fn stories_theory(bits: impl Fn(usize) -> f64) -> f64 {
    let (h, i) = (64.0, 172.0);
    let in64 = 64.0 * 64.0 + 2.0 * 32.0 * 64.0 + 64.0 * 64.0 + 2.0 * 172.0 * 64.0; // q, k, v, o, gate, up
    let in172 = 64.0 * 172.0;
    (in64 * bits(h as usize) + in172 * bits(i as usize)) / (in64 + in172)
}

/// Weights of stories260K's 35 linear layers.
const ALL: u64 = 226_560;

const W4A8KV4: &str = r#"{"format_version": 1, "weight": {"bits": 4, "format": {"kind": "sym_per_channel"}}, "act": {"bits": 8}, "kv": {"bits": 4}}"#;
const W3G32: &str = r#"{"format_version": 1, "weight": {"bits": 3, "format": {"kind": "asym_group", "group_size": 32}},
  "overrides": [{"pattern": "layers.*.mlp.down_proj", "weight": {"bits": 3, "format": {"kind": "asym_group", "group_size": 43}}}]}"#;
const NF3G32: &str = r#"{"format_version": 1, "weight": {"bits": 3, "format": {"kind": "nf3", "group_size": 32}},
  "overrides": [{"pattern": "layers.*.mlp.down_proj", "weight": {"bits": 3, "format": {"kind": "nf3", "group_size": 43}}}]}"#;
const NF4G32: &str = r#"{"format_version": 1, "weight": {"bits": 4, "format": {"kind": "nf4", "group_size": 32}}, "kv": {"bits": 8},
  "overrides": [{"pattern": "layers.*.mlp.down_proj", "weight": {"bits": 4, "format": {"kind": "nf4", "group_size": null}}}]}"#;

/// Packs the teacher under `scheme`, then checks: (a) the dequantized packed weights equal
/// `fake_weight` of the teacher's weights bit for bit, (b) `qat-eval` gives the same NLL on the
/// packed dir as on the fake-quantized student, (c) bits per weight within 1% of `theory`.
fn check_scheme(label: &str, scheme: &str, theory: f64, quantized_weights: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let (student, packed) = (tmp.path().join("student"), tmp.path().join("packed"));
    teacher_student(&student, scheme, &[]);
    let s = pack_ok(&student, &packed);
    let (bpw, th) = (
        s["bits_per_weight"].as_f64().unwrap(),
        s["bits_per_weight_theory"].as_f64().unwrap(),
    );
    eprintln!(
        "{label}: {bpw:.4} bits/weight (theory {th:.4}), packed file {} bytes, dir {} bytes",
        s["bytes"], s["dir_bytes"]
    );
    assert!(
        (th - theory).abs() < 1e-12,
        "{label}: theory {th}, expected {theory}"
    );
    assert!(
        (bpw / theory - 1.0).abs() < 0.01,
        "{label}: {bpw} bits/weight vs theory {theory}"
    );
    assert_eq!(s["quantized_weights"], quantized_weights);
    assert_eq!(
        s["bytes"].as_u64().unwrap(),
        std::fs::metadata(packed.join("model.packed.safetensors"))
            .unwrap()
            .len()
    );

    // (a) weights
    let (model, loaded) = qat_pack::load_packed(&packed, &Device::Cpu).unwrap();
    let scheme = Scheme::load(student.join("quant_scheme.json")).unwrap();
    assert_eq!(loaded, scheme);
    let teacher = ModelDir::open(&student)
        .unwrap()
        .load(&Device::Cpu, DType::F32)
        .unwrap();
    for (p, t) in model.linears().into_iter().zip(teacher.linears()) {
        let want = match scheme.resolve(t.id()).weight {
            Some(wq) => fake_weight(t.weight(), &wq).unwrap(),
            None => t.weight().clone(),
        };
        let bits = |x: &candle_core::Tensor| qat_model::custom_op::f32_bits(x).unwrap();
        assert_eq!(bits(p.weight()), bits(&want), "{label}: {}", p.id());
    }

    // (b) perplexity
    let fake = eval(&student);
    let real = eval(&packed);
    assert_eq!(fake["quantization"], "fake_quant");
    assert_eq!(real["quantization"], "packed");
    assert_eq!(real["tokens"], fake["tokens"]);
    assert_eq!(real["scheme_json"], fake["scheme_json"]);
    assert_eq!(
        real["nll"], fake["nll"],
        "{label}: packed {} vs fake-quant {}",
        real["nll"], fake["nll"]
    );
    assert_eq!(real["weights_sha256"], s["packed_sha256"]);
    let fp = eval(&stories_dir());
    assert_eq!(fp["quantization"], "none");
    assert_ne!(real["nll"], fp["nll"]);
}

#[test]
fn w4a8kv4_sym_per_channel_packs_exactly() {
    check_scheme(
        "W4A8KV4",
        W4A8KV4,
        stories_theory(|inp| 4.0 + 16.0 / inp as f64),
        ALL,
    );
}

#[test]
fn w3g32_asym_packs_exactly() {
    check_scheme(
        "W3G32",
        W3G32,
        stories_theory(|inp| 3.0 + 24.0 / if inp == 64 { 32.0 } else { 43.0 }),
        ALL,
    );
}

#[test]
fn nf3g32_packs_exactly() {
    check_scheme(
        "NF3G32",
        NF3G32,
        stories_theory(|inp| 3.0 + 32.0 / if inp == 64 { 32.0 } else { 43.0 }),
        ALL,
    );
}

#[test]
fn nf4g32_packs_exactly() {
    check_scheme(
        "NF4G32",
        NF4G32,
        stories_theory(|inp| 4.0 + 16.0 / if inp == 64 { 32.0 } else { 172.0 }),
        ALL,
    );
}

#[test]
fn full_precision_block_and_8_bits() {
    let scheme = r#"{"format_version": 1, "weight": {"bits": 8, "format": {"kind": "sym_per_channel"}}, "act": {"bits": 8},
      "overrides": [{"pattern": "layers.0.*", "weight": null, "act": null}]}"#;
    check_scheme(
        "W8A8 (block 0 FP)",
        scheme,
        stories_theory(|inp| 8.0 + 16.0 / inp as f64),
        ALL / 5 * 4,
    );
}

/// A real (2-step) QAT student packs, and its provenance travels along.
#[test]
fn distilled_student_packs_and_evaluates_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    small_shards(&shards);
    let (student, packed) = (tmp.path().join("student"), tmp.path().join("packed"));
    let (m, sh, st) = (
        stories_dir(),
        shards.to_str().unwrap().to_string(),
        student.to_str().unwrap().to_string(),
    );
    ok_json(&qat_distill(&[
        "--model",
        m.to_str().unwrap(),
        "--shards",
        &sh,
        "--out",
        &st,
        "--scheme",
        "W4A8KV4",
        "-b",
        "4",
        "--steps",
        "2",
        "-q",
    ]));
    let s = pack_ok(&student, &packed);
    assert_eq!(s["scheme"], "W4A8KV4");
    let prov: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(packed.join("provenance.json")).unwrap())
            .unwrap();
    assert_eq!(prov["source_provenance"]["steps"], 2);
    assert_eq!(prov["source_weights_sha256"], s["source_weights_sha256"]);
    assert_eq!(eval(&packed)["nll"], eval(&student)["nll"]);
}

#[test]
fn help_has_examples() {
    let out = Command::new(env!("CARGO_BIN_EXE_qat-pack"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && help.contains("Examples:")
            && help.contains("--model")
            && help.contains("--out"),
        "{help}"
    );
}

#[test]
fn bad_students_are_refused_with_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = out.to_str().unwrap();
    assert_error(
        &qat_pack(&["--model", "/nonexistent", "--out", o]),
        "qat-pack",
        "not a model directory",
    );
    let teacher = stories_dir();
    assert_error(
        &qat_pack(&["--model", teacher.to_str().unwrap(), "--out", o]),
        "qat-pack",
        "quant_scheme.json: missing",
    );
    let student = tmp.path().join("s");
    // 32 does not divide down_proj's 172 inputs.
    teacher_student(
        &student,
        r#"{"format_version": 1, "weight": {"bits": 3, "format": {"kind": "asym_group", "group_size": 32}}}"#,
        &[],
    );
    let s = student.to_str().unwrap();
    assert_error(
        &qat_pack(&["--model", s, "--out", o]),
        "qat-pack",
        "group size 32 does not divide in_features 172",
    );
    std::fs::write(
        student.join("quant_scheme.json"),
        r#"{"format_version": 1, "act": {"bits": 8}}"#,
    )
    .unwrap();
    assert_error(
        &qat_pack(&["--model", s, "--out", o]),
        "qat-pack",
        "nothing to pack",
    );
    std::fs::write(
        student.join("quant_scheme.json"),
        r#"{"format_version": 2}"#,
    )
    .unwrap();
    assert_error(
        &qat_pack(&["--model", s, "--out", o]),
        "qat-pack",
        "unsupported scheme format_version 2",
    );
    assert!(!out.exists() && !tmp.path().join("out.partial").exists());
    std::fs::write(student.join("quant_scheme.json"), W4A8KV4).unwrap();
    pack_ok(&student, &out);
    assert_error(
        &qat_pack(&["--model", s, "--out", o]),
        "qat-pack",
        "output already exists",
    );
}

/// The absolute byte range of tensor `name` in a safetensors file.
fn tensor_range(bytes: &[u8], name: &str) -> std::ops::Range<usize> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let off = &header[name]["data_offsets"];
    8 + n + off[0].as_u64().unwrap() as usize..8 + n + off[1].as_u64().unwrap() as usize
}

/// Replaces the first occurrence of `from` after `anchor` in the file's header by `to` (same
/// length, so the file stays valid safetensors).
fn patch_header(bytes: &mut [u8], anchor: &str, from: &str, to: &str) {
    assert_eq!(from.len(), to.len());
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = &mut bytes[8..8 + n];
    let find = |h: &[u8], what: &str, from: usize| {
        h[from..]
            .windows(what.len())
            .position(|w| w == what.as_bytes())
            .map(|p| p + from)
    };
    let start = if anchor.is_empty() {
        0
    } else {
        find(header, anchor, 0).unwrap_or_else(|| panic!("{anchor} not in header"))
    };
    let at =
        find(header, from, start).unwrap_or_else(|| panic!("{from} not in header after {anchor}"));
    header[at..at + from.len()].copy_from_slice(to.as_bytes());
}

#[test]
fn damaged_packed_dirs_are_clear_errors_with_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let (w4, w3) = (tmp.path().join("w4"), tmp.path().join("w3"));
    teacher_student(&w4, W4A8KV4, &[]);
    teacher_student(&w3, W3G32, &[]);
    let (p4, p3) = (tmp.path().join("p4"), tmp.path().join("p3"));
    pack_ok(&w4, &p4);
    pack_ok(&w3, &p3);
    let corpus = tinystories();
    let run = |dir: &Path| {
        qat_eval(&[
            "--model",
            dir.to_str().unwrap(),
            "--corpus",
            corpus.to_str().unwrap(),
            "--limit",
            "2",
            "-q",
        ])
    };
    let damage = |dir: &Path, edit: &dyn Fn(&mut Vec<u8>)| {
        let file = dir.join("model.packed.safetensors");
        let mut bytes = std::fs::read(&file).unwrap();
        edit(&mut bytes);
        let bad = tmp.path().join("bad");
        let _ = std::fs::remove_dir_all(&bad);
        std::fs::create_dir(&bad).unwrap();
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), bad.join(e.file_name())).unwrap();
        }
        std::fs::write(bad.join("model.packed.safetensors"), bytes).unwrap();
        bad
    };
    let file_named = |needle: &str| format!("bad/model.packed.safetensors: {needle}");

    let bad = damage(&p4, &|b| b.truncate(b.len() - 100));
    let len = std::fs::metadata(p4.join("model.packed.safetensors"))
        .unwrap()
        .len();
    assert_error(&run(&bad), "qat-eval", &file_named(&format!("truncated or damaged: its size disagrees with the header (8 + header + tensor data): the file has {} bytes, expected {len}", len - 100)));

    let bad = damage(&p4, &|b| {
        patch_header(
            b,
            "",
            "\"qat.format_version\":\"1\"",
            "\"qat.format_version\":\"7\"",
        )
    });
    assert_error(
        &run(&bad),
        "qat-eval",
        &file_named("metadata qat.format_version: found \"7\", expected \"1\""),
    );

    let bad = damage(&p4, &|b| {
        patch_header(b, "", "\"qat.scheme\":", "\"qat.schema\":")
    });
    assert_error(
        &run(&bad),
        "qat-eval",
        &file_named("metadata qat.scheme: missing"),
    );

    // sym_per_channel 4 bits: codes 0..=14, so 0xff (codes 15, 15) is out of range.
    let bad = damage(&p4, &|b| {
        let r = tensor_range(b, "model.layers.2.mlp.up_proj.qweight"); // [172, 32]
        b[r.start + 5 * 32 + 3] = 0xff;
    });
    assert_error(&run(&bad), "qat-eval", &file_named("tensor model.layers.2.mlp.up_proj.qweight: code at row 5, column 6: found 15, expected 0..=14 (sym_per_channel with 4 bits)"));

    // asym 3 bits: zero points 0..=7.
    let bad = damage(&p3, &|b| {
        let r = tensor_range(b, "model.layers.0.self_attn.k_proj.zeros"); // [32, 2]
        b[r.start + 3] = 8;
    });
    assert_error(&run(&bad), "qat-eval", &file_named("tensor model.layers.0.self_attn.k_proj.zeros: zero point at row 1, group 1: found 8, expected 0..=7 (3 bits)"));

    // 3 bits x 172 inputs = 516 bits in 65 bytes: the top 4 bits of each row's last byte are padding.
    let bad = damage(&p3, &|b| {
        let r = tensor_range(b, "model.layers.4.mlp.down_proj.qweight"); // [64, 65]
        b[r.start + 65 * 10 + 64] |= 0x20;
    });
    assert_error(
        &run(&bad),
        "qat-eval",
        &file_named("tensor model.layers.4.mlp.down_proj.qweight: padding bits at row 10, byte 64"),
    );

    // A shape that holds the same bytes but not the layout the spec gives.
    let bad = damage(&p4, &|b| {
        patch_header(
            b,
            "\"model.layers.0.self_attn.q_proj.qweight\"",
            "\"shape\":[64,32]",
            "\"shape\":[32,64]",
        )
    });
    assert_error(
        &run(&bad),
        "qat-eval",
        &file_named(
            "tensor model.layers.0.self_attn.q_proj.qweight: shape [32, 64], expected [64, 32]",
        ),
    );

    // A packed model runs under its own scheme.
    let out = qat_eval(&[
        "--model",
        p4.to_str().unwrap(),
        "--corpus",
        corpus.to_str().unwrap(),
        "--scheme",
        "W8",
        "-q",
    ]);
    assert_error(
        &out,
        "qat-eval",
        "--scheme W8 cannot be applied to a packed model",
    );
}
