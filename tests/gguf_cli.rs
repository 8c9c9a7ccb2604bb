//! CLI tests of `qat-pack --format gguf` on stories260K: students trained for 2 steps on the
//! Q4_0 / Q4_1 / Q8_0 grids are exported, then read by `tests/foreign/read_gguf.py` with
//! llama.cpp's own `gguf` Python package, whose dequantization must equal qat's fake-quantized
//! weights bit for bit (and whose reference quantizer must give the same block bytes), and which
//! run with llama.cpp's conventions (`tests/foreign/gguf_forward.py`) give qat-eval's NLL; the
//! exported files run in llama.cpp itself (`tests/foreign/llama_cpp_nll.py`, llama-cpp-python)
//! with qat's tokenization and qat-eval's NLL; bad students are refused with exit 2, naming the
//! layer.
//!
//! The interpreter is `$QAT_PYTHON`, default `<workspace>/.venv/bin/python` (`make test-deps`
//! installs gguf, safetensors, numpy and llama-cpp-python there); without it the test fails and
//! says so.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use qat_model::{LinearId, LinearKind};
use qat_quant::{fake_weight, Scheme};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> PathBuf {
    let py = std::env::var_os("QAT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv/bin/python"));
    let hint = "run `make test-deps` (creates .venv with gguf, safetensors and numpy) or set QAT_PYTHON to an interpreter with them";
    let out = Command::new(&py)
        .args(["-c", "import gguf, safetensors, numpy"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}: {hint}", py.display()));
    assert!(
        out.status.success(),
        "{} cannot import gguf: {}: {hint}",
        py.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    py
}

/// [`python`], which must also import llama_cpp (llama-cpp-python, built from source by
/// `make test-deps`).
fn python_with_llama_cpp() -> PathBuf {
    let py = python();
    let out = Command::new(&py)
        .args(["-c", "import llama_cpp"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} cannot import llama_cpp: {}: run `make test-deps` (builds llama-cpp-python, ~4 min on 2 cores)",
        py.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    py
}

/// `qat-pack --format gguf -m student -o file`, which must succeed; its JSON summary.
fn export_gguf(student: &Path, file: &Path) -> serde_json::Value {
    ok_json(&qat_pack(&[
        "--format",
        "gguf",
        "-m",
        student.to_str().unwrap(),
        "-o",
        file.to_str().unwrap(),
    ]))
}

fn scheme_file(name: &str) -> PathBuf {
    workspace().join(format!("pipelines/schemes/stories260K/{name}.json"))
}

/// The files beyond config, weights and tokenizer.json that the exported students carry: with
/// and without the SentencePiece model the GGUF vocabulary is read from.
const SP: &[&str] = &["tokenizer_config.json", "tokenizer.model"];
const JSON_ONLY: &[&str] = &["tokenizer_config.json"];

/// What qat trains with, under Hugging Face names: every linear weight through `fake_weight`
/// (the master weight as `<name>.master`), every other tensor as stored.
fn write_expected(student: &Path, path: &Path) {
    let scheme = Scheme::load(student.join("quant_scheme.json")).unwrap();
    let tensors =
        candle_core::safetensors::load(student.join("model.safetensors"), &Device::Cpu).unwrap();
    let cfg = qat_model::ModelDir::open(student).unwrap().config;
    let mut out: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in &tensors {
        out.insert(name.clone(), t.to_dtype(DType::F32).unwrap());
    }
    for layer in 0..cfg.num_layers {
        for kind in LinearKind::ALL {
            let id = LinearId { layer, kind };
            let w = out[&id.weight_key()].clone();
            if let Some(wq) = scheme.resolve(id).weight {
                out.insert(id.weight_key(), fake_weight(&w, &wq).unwrap());
            }
            out.insert(format!("{}.master", id.weight_key()), w);
        }
    }
    candle_core::safetensors::save(&out, path).unwrap();
}

fn read_gguf(file: &Path, expected: &Path) -> serde_json::Value {
    let out = Command::new(python())
        .arg(workspace().join("tests/foreign/read_gguf.py"))
        .arg(file)
        .arg(expected)
        .arg(stories_dir().join("config.json"))
        .output()
        .expect("run read_gguf.py");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "read_gguf.py failed: {err}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bad JSON: {e}; stderr {err}"))
}

/// stories260K: 5 blocks; q, k, v, o, gate, up quantized (in_features 64), down_proj (172) F32.
const QUANTIZED: u64 = 5 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 2 * 172 * 64);

#[test]
fn distilled_students_export_to_gguf_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    small_shards(&shards);
    let model = stories_dir();
    for (name, bits, ty) in [
        ("Q4_0", 4.5, "Q4_0"),
        ("Q4_1", 5.0, "Q4_1"),
        ("Q8_0", 8.5, "Q8_0"),
    ] {
        let student = tmp.path().join(name);
        let scheme = scheme_file(name);
        ok_json(&qat_distill(&[
            "--model",
            model.to_str().unwrap(),
            "--shards",
            shards.to_str().unwrap(),
            "--out",
            student.to_str().unwrap(),
            "--scheme",
            scheme.to_str().unwrap(),
            "-b",
            "4",
            "--steps",
            "2",
            "--lr",
            "1e-3",
            "-q",
        ]));
        let file = tmp.path().join(format!("{name}.gguf"));
        let s = export_gguf(&student, &file);
        assert_documented("qat-pack --format gguf", &s);
        let size = std::fs::metadata(&file).unwrap().len();
        eprintln!(
            "{name}: {size} bytes, {} bits per quantized weight, {} quantized weights",
            s["bits_per_weight"], s["quantized_weights"]
        );
        assert_eq!(s["bytes"], size);
        assert_eq!(s["bits_per_weight"], bits, "{name}");
        assert_eq!(s["quantized_weights"], QUANTIZED);
        assert_eq!(
            (s["quantized_layers"].as_u64(), s["f32_layers"].as_u64()),
            (Some(30), Some(5))
        );
        assert_eq!(s["types"][ty], 30);
        assert_eq!(
            s["vocab_source"], "tokenizer.model",
            "qat-distill copies tokenizer.model"
        );
        assert!(!tmp.path().join(format!("{name}.gguf.tmp")).exists());

        let expected = tmp.path().join(format!("{name}.expected.safetensors"));
        write_expected(&student, &expected);
        let r = read_gguf(&file, &expected);
        eprintln!("{name}: {r}");
        assert_eq!(r["tensors"], 47); // embeddings, final norm, 5 × (7 linear + 2 norms)
        assert_eq!(r["bit_equal"], 47);
        assert_eq!(r["requantized_equal"], 30);
        assert_eq!(r["quantized_weights"], QUANTIZED);
        assert_eq!(r["types"][ty], 30);
        assert_eq!(r["types"]["F32"], 17);
        assert_eq!(r["vocab"], 512);
        assert_eq!(r["tool"], format!("qat-pack {}", env!("CARGO_PKG_VERSION")));
        forward_matches_qat_eval(&student, &file, tmp.path());
    }
}

/// The GGUF file run with llama.cpp's conventions (tests/foreign/gguf_forward.py: interleaved
/// RoPE on the permuted q/k rows, GQA, tied output; float64) predicts the first TinyStories
/// documents with the NLL `qat-eval` measures on the fake-quantized student (float32), to 1e-5.
fn forward_matches_qat_eval(student: &Path, file: &Path, tmp: &Path) {
    let (e, ids_path) = qat_eval_nll(student, 3, 64, tmp);
    assert_eq!(e["quantization"], "fake_quant");
    let out = Command::new(python())
        .arg(workspace().join("tests/foreign/gguf_forward.py"))
        .arg(file)
        .arg(&ids_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gguf_forward.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let g: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (py, qat) = (g["nll"].as_f64().unwrap(), e["nll"].as_f64().unwrap());
    eprintln!(
        "{}: llama.cpp-convention NLL {py:.9} vs qat-eval {qat:.9} ({} tokens)",
        file.display(),
        g["tokens"]
    );
    assert_eq!(g["tokens"], e["tokens"]);
    assert!(
        (py - qat).abs() < 1e-5 * qat,
        "GGUF forward {py} vs qat-eval {qat}"
    );
}

/// llama.cpp itself (llama-cpp-python, pinned in the Makefile's test deps; its loader, tokenizer
/// and CPU kernels) runs the exported files: the teacher as F32 and round-to-nearest Q4_0, Q4_1
/// and Q8_0 students, with the vocabulary from tokenizer.model and from tokenizer.json. On the
/// first 20 TinyStories documents (seq-len 512, 6,496 tokens) its tokenization of every document
/// must equal qat's ids, and its NLL qat-eval's: to 2e-5 (relative) for F32 weights, and to 2e-4
/// for the block formats, whose CPU dot products also round the activations to 8 bits per block
/// of 32. Measured with llama-cpp-python 0.3.36 on an AMD EPYC: F32 +4.6e-6, Q4_0 -3.7e-5, Q4_1
/// +8.3e-5, Q8_0 +2.6e-5; the files' own NLLs differ by more (Q8_0 vs F32 +2.9e-4, Q4_0 vs Q4_1
/// +2.6e-3, Q4_0 vs F32 +5.4e-2).
#[test]
fn llama_cpp_runs_the_exported_files_with_qat_evals_nll() {
    let tmp = tempfile::tempdir().unwrap();
    let fp = r#"{"format_version": 1, "weight": null}"#.to_string();
    let grid = |name: &str| std::fs::read_to_string(scheme_file(name)).unwrap();
    for (name, scheme, vocab, tolerance) in [
        ("FP", fp, SP, 2e-5),
        ("Q4_0", grid("Q4_0"), SP, 2e-4),
        ("Q4_1", grid("Q4_1"), SP, 2e-4),
        ("Q8_0", grid("Q8_0"), SP, 2e-4),
        ("Q8_0-json-vocab", grid("Q8_0"), JSON_ONLY, 2e-4),
    ] {
        let student = tmp.path().join(name);
        teacher_student(&student, &scheme, vocab);
        let file = tmp.path().join(format!("{name}.gguf"));
        export_gguf(&student, &file);
        let (limit, seq_len) = (20, 512);
        let (qat, ids_path) = qat_eval_nll(&student, limit, seq_len, tmp.path());
        let out = Command::new(python_with_llama_cpp())
            .arg(workspace().join("tests/foreign/llama_cpp_nll.py"))
            .arg(&file)
            .arg(tinystories())
            .args([
                "--limit",
                &limit.to_string(),
                "--seq-len",
                &seq_len.to_string(),
            ])
            .arg("--ids")
            .arg(&ids_path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "llama_cpp_nll.py on {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let l: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let llama = l["nll"].as_f64().unwrap();
        let relative = (llama - qat["nll"].as_f64().unwrap()) / qat["nll"].as_f64().unwrap();
        eprintln!(
            "{name}: llama.cpp {} NLL {llama:.8} vs qat-eval {} ({relative:+.2e}), {} tokens",
            l["llama_cpp"], qat["nll"], l["tokens"]
        );
        assert_eq!(l["tokenization_equal"], true, "{name}");
        assert_eq!(l["tokens"], qat["tokens"], "{name}");
        assert!(
            relative.abs() < tolerance,
            "{name}: llama.cpp NLL {llama} vs qat-eval {} (relative {relative:e}, allowed {tolerance:e})",
            qat["nll"]
        );
    }
}

/// `qat-eval`'s docs-mode result on the first `limit` TinyStories documents, and the ids it
/// scored (as JSON lists, each starting with BOS) written to `tmp/ids-<limit>-<seq_len>.json`.
fn qat_eval_nll(
    student: &Path,
    limit: usize,
    seq_len: usize,
    tmp: &Path,
) -> (serde_json::Value, PathBuf) {
    let e = ok_json(&qat_eval(&[
        "--model",
        student.to_str().unwrap(),
        "--corpus",
        tinystories().to_str().unwrap(),
        "--limit",
        &limit.to_string(),
        "--seq-len",
        &seq_len.to_string(),
        "-q",
    ]));
    let dir = qat_model::ModelDir::open(student).unwrap();
    let corpus = qat_eval::Corpus::read(&tinystories()).unwrap();
    let ids = qat_eval::tokenize(
        &corpus,
        &dir.tokenizer().unwrap(),
        dir.config.bos_token_id,
        qat_eval::PplMode::Docs,
        seq_len,
        "<|endoftext|>",
        Some(limit),
    )
    .unwrap();
    let ids_path = tmp.join(format!("ids-{limit}-{seq_len}.json"));
    std::fs::write(&ids_path, serde_json::to_string(&ids).unwrap()).unwrap();
    (e, ids_path)
}

#[test]
fn the_vocabulary_falls_back_to_tokenizer_json() {
    let tmp = tempfile::tempdir().unwrap();
    let mut summaries = Vec::new();
    for sp in [true, false] {
        let student = tmp.path().join(format!("{sp}/student")); // same name: same general.name
        teacher_student(
            &student,
            &std::fs::read_to_string(scheme_file("Q8_0")).unwrap(),
            if sp { SP } else { JSON_ONLY },
        );
        let file = tmp.path().join(format!("{sp}.gguf"));
        summaries.push(export_gguf(&student, &file));
        let expected = tmp.path().join(format!("{sp}.safetensors"));
        write_expected(&student, &expected);
        assert_eq!(read_gguf(&file, &expected)["bit_equal"], 47);
    }
    assert_eq!(summaries[0]["vocab_source"], "tokenizer.model");
    assert_eq!(summaries[1]["vocab_source"], "tokenizer.json");
    // Same tensors (the teacher's weights), and for stories260K the same vocabulary bytes.
    assert_eq!(summaries[0]["bytes"], summaries[1]["bytes"]);
}

#[test]
fn bad_students_are_refused_with_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |scheme: &str, extra: &[&str]| {
        let student = tmp.path().join("student");
        let _ = std::fs::remove_dir_all(&student);
        teacher_student(&student, scheme, SP);
        let out = tmp.path().join("out.gguf");
        let _ = std::fs::remove_file(&out);
        let mut args = vec![
            "--format",
            "gguf",
            "-m",
            student.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = qat_pack(&args);
        if !o.status.success() {
            assert!(
                !out.exists() && !tmp.path().join("out.gguf.tmp").exists(),
                "no output on error"
            );
        }
        o
    };
    let w4 =
        r#"{"format_version": 1, "weight": {"bits": 4, "format": {"kind": "sym_per_channel"}}}"#;
    assert_error(&run(w4, &[]), "qat-pack", "layers.0.self_attn.q_proj: weight format sym_per_channel (4 bits) is not a GGUF block format");
    let mixed = r#"{"format_version": 1, "weight": {"bits": 4, "format": {"kind": "q4_0"}},
        "overrides": [{"pattern": "layers.*.mlp.down_proj", "weight": null},
                      {"pattern": "layers.3.mlp.up_proj", "weight": {"bits": 3, "format": {"kind": "asym_group", "group_size": 32}}}]}"#;
    assert_error(&run(mixed, &[]), "qat-pack", "layers.3.mlp.up_proj: weight format asym_group (group_size 32) (3 bits) is not a GGUF block format");
    let all = r#"{"format_version": 1, "weight": {"bits": 4, "format": {"kind": "q4_0"}}}"#;
    assert_error(&run(all, &[]), "qat-pack", "layers.0.mlp.down_proj: weight format q4_0 does not fit the layer ([64, 172]): Q4_0 block size 32 does not divide in_features 172");
    let act = r#"{"format_version": 1, "weight": {"bits": 4, "format": {"kind": "q4_0"}}, "act": {"bits": 8},
        "overrides": [{"pattern": "layers.*.mlp.down_proj", "weight": null}]}"#;
    assert_error(&run(act, &[]), "qat-pack", "layers.0.self_attn.q_proj: activations quantized to 8 bits, which llama.cpp does not reproduce");
    let kv = r#"{"format_version": 1, "weight": {"bits": 8, "format": {"kind": "q8_0"}}, "kv": {"bits": 4},
        "overrides": [{"pattern": "layers.*.mlp.down_proj", "weight": null}]}"#;
    assert_error(&run(kv, &[]), "qat-pack", "KV cache quantized to 4 bits");
    // --drop-act-kv exports anyway, warns, and lists what llama.cpp will not run.
    let o = run(act, &["--drop-act-kv"]);
    let s = ok_json(&o);
    assert!(
        stderr(&o).contains(
            "qat-pack: warning: llama.cpp will not quantize layers.0.self_attn.q_proj: act 8 bits"
        ),
        "{}",
        stderr(&o)
    );
    assert_eq!(s["dropped"].as_array().unwrap().len(), 35); // act of all 35 layers, down_proj too
                                                            // An existing output is refused; the packed format refuses GGUF grids.
    let q4 = std::fs::read_to_string(scheme_file("Q4_0")).unwrap();
    teacher_student(&tmp.path().join("s2"), &q4, SP);
    let out = tmp.path().join("exists.gguf");
    std::fs::write(&out, b"x").unwrap();
    let s2 = tmp.path().join("s2");
    assert_error(
        &qat_pack(&[
            "--format",
            "gguf",
            "-m",
            s2.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]),
        "qat-pack",
        "already exists",
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"x");
    let packed = tmp.path().join("packed");
    assert_error(&qat_pack(&["-m", s2.to_str().unwrap(), "-o", packed.to_str().unwrap()]), "qat-pack", "layers.0.self_attn.q_proj: weight format q4_0 is a GGUF block format, which the packed format does not store; export it with qat-pack --format gguf");
    assert!(!packed.exists());
}
