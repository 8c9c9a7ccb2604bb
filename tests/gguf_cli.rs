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

/// Runs `qat-pack --format gguf -m student -o file` with `extra` flags.
fn pack_gguf(student: &Path, file: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "--format",
        "gguf",
        "-m",
        student.to_str().unwrap(),
        "-o",
        file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    qat_pack(&args)
}

/// [`pack_gguf`] without extra flags, which must succeed; its JSON summary.
fn export_gguf(student: &Path, file: &Path) -> serde_json::Value {
    ok_json(&pack_gguf(student, file, &[]))
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

/// Runs `tests/foreign/<script>` with `py` and `args`; it must succeed and print one JSON object.
fn foreign(py: &Path, script: &str, args: &[&std::ffi::OsStr]) -> serde_json::Value {
    let out = Command::new(py)
        .arg(workspace().join("tests/foreign").join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} failed: {err}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{script}: bad JSON: {e}; stderr {err}"))
}

fn read_gguf(file: &Path, expected: &Path) -> serde_json::Value {
    let config = stories_dir().join("config.json");
    foreign(
        &python(),
        "read_gguf.py",
        &[file.as_os_str(), expected.as_os_str(), config.as_os_str()],
    )
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
        forward_matches_qat_eval(&student, &file, tmp.path(), "fake_quant");
    }
}

/// The GGUF file run with llama.cpp's conventions (tests/foreign/gguf_forward.py: interleaved
/// RoPE on the permuted q/k rows, GQA, tied output; float64) predicts the first TinyStories
/// documents with the NLL `qat-eval` measures on the fake-quantized student (float32), to 1e-5.
fn forward_matches_qat_eval(student: &Path, file: &Path, tmp: &Path, quantization: &str) {
    let (e, ids_path) = qat_eval_nll(student, 3, 64, tmp);
    assert_eq!(e["quantization"], quantization);
    let g = foreign(
        &python(),
        "gguf_forward.py",
        &[file.as_os_str(), ids_path.as_os_str()],
    );
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
/// and CPU kernels) runs the exported files: the teacher as F32, round-to-nearest Q4_0, Q4_1 and
/// Q8_0 students, and per-channel W4 / W8 students (row-scaled Q4_0 / Q8_0 blocks), with the
/// vocabulary from tokenizer.model and from tokenizer.json. On the first 20 TinyStories
/// documents (seq-len 512, 6,496 tokens) its tokenization of every document must equal qat's
/// ids, and, with an f32 KV cache, its NLL qat-eval's: to 1e-6 (relative) for F32 weights and to
/// 5e-4 for the block formats. Measured with llama-cpp-python 0.3.36 on an AMD EPYC: F32 +1.1e-8,
/// Q4_0 +1.45e-4, Q4_1 +1.61e-4, Q8_0 +2.29e-4, W4 +1.74e-4, W8 +5.1e-5. The files' values are
/// exact (the other tests here), and an f64 forward pass over them gives qat-eval's NLL to 1e-7
/// (gguf_forward.py; W8: 1.25022292 vs 1.25022288), so the rest is llama.cpp's arithmetic: its
/// dot products round the activations to 8 bits per block of 32. (Its default f16 KV cache adds
/// -4.8e-4 to +7.1e-4 on these files: F32 +4.6e-6, Q4_0 -3.7e-5, Q4_1 +8.3e-5, Q8_0 +2.6e-5,
/// W4 -3.1e-4, W8 +7.6e-4.) An export error is far larger: k_proj rows permuted with the query
/// head count give +2.4 (NLL 4.31).
#[test]
fn llama_cpp_runs_the_exported_files_with_qat_evals_nll() {
    let tmp = tempfile::tempdir().unwrap();
    let fp = r#"{"format_version": 1, "weight": null}"#.to_string();
    let grid = |name: &str| std::fs::read_to_string(scheme_file(name)).unwrap();
    for (name, scheme, vocab, tolerance) in [
        ("FP", fp, SP, 1e-6),
        ("W4", sym_per_channel(4), SP, 5e-4),
        ("W8", sym_per_channel(8), SP, 5e-4),
        ("Q4_0", grid("Q4_0"), SP, 5e-4),
        ("Q4_1", grid("Q4_1"), SP, 5e-4),
        ("Q8_0", grid("Q8_0"), SP, 5e-4),
        ("Q8_0-json-vocab", grid("Q8_0"), JSON_ONLY, 5e-4),
    ] {
        let student = tmp.path().join(name);
        teacher_student(&student, &scheme, vocab);
        let file = tmp.path().join(format!("{name}.gguf"));
        export_gguf(&student, &file);
        assert_llama_cpp_nll(name, &file, &student, tmp.path(), tolerance);
    }
}

/// llama.cpp (llama_cpp_nll.py, an f32 KV cache) on `file` tokenizes the first 20 TinyStories
/// documents (seq-len 512) as qat does and gives qat-eval's NLL of `student` to `tolerance`
/// (relative).
fn assert_llama_cpp_nll(name: &str, file: &Path, student: &Path, tmp: &Path, tolerance: f64) {
    let (limit, seq_len) = (20, 512);
    let (qat, ids_path) = qat_eval_nll(student, limit, seq_len, tmp);
    let (limit_s, seq_len_s) = (limit.to_string(), seq_len.to_string());
    let corpus = tinystories();
    let args: Vec<&std::ffi::OsStr> = vec![
        file.as_os_str(),
        corpus.as_os_str(),
        "--limit".as_ref(),
        limit_s.as_ref(),
        "--seq-len".as_ref(),
        seq_len_s.as_ref(),
        "--ids".as_ref(),
        ids_path.as_os_str(),
        // An f32 KV cache, so that only the weights and llama.cpp's 8-bit activation blocks
        // differ (its default f16 cache moves the NLL by up to ±7e-4 on its own).
        "--kv-cache".as_ref(),
        "f32".as_ref(),
    ];
    let l = foreign(&python_with_llama_cpp(), "llama_cpp_nll.py", &args);
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

/// A copy of `student` in `dir` whose tensors named in `names` are rounded to `dtype` (and
/// stored f32 again): the model an F16 / BF16 export holds, for qat-eval to score.
fn rounded_student(student: &Path, dir: &Path, names: &[String], dtype: DType) {
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(student).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let file = student.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    for name in names {
        let t = &tensors[name];
        let rounded = t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
        let moved = qat_model::custom_op::max_abs_diff(t, &rounded).unwrap();
        assert!(moved > 0.0, "{name}: nothing to round");
        tensors.insert(name.clone(), rounded);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
}

/// `--gguf-float f16` / `bf16` store the embeddings and the unquantized linear layers rounded to
/// nearest even, norms and per-channel layers written as values F32: llama.cpp's own reference
/// conversion (gguf.quants.quantize, read_gguf.py) gives the same values, an f64 forward pass over
/// the file gives qat-eval's NLL of the student with those tensors rounded (gguf_forward.py, to
/// 1e-5), and llama.cpp itself gives it too (to 5e-4, as for the block formats: llama.cpp also
/// rounds the activations of an F16 / BF16 matmul to that type). The file is smaller.
#[test]
fn float_types_store_the_unquantized_tensors_rounded() {
    let tmp = tempfile::tempdir().unwrap();
    let fp = r#"{"format_version": 1, "weight": null}"#.to_string();
    let linear: Vec<String> = (0..5)
        .flat_map(|layer| LinearKind::ALL.map(|kind| LinearId { layer, kind }.weight_key()))
        .collect();
    let embeddings = "model.embed_tokens.weight".to_string();
    // W4: 30 layers in Q4_0 blocks, the 5 down_proj (172 inputs) F32 values of the fake
    // quantization; only the embeddings are a float tensor.
    for (name, scheme, flag, ty, dtype, float_layers, f32_layers) in [
        ("FP-f16", fp.clone(), "f16", "F16", DType::F16, 35u64, 0),
        ("FP-bf16", fp, "bf16", "BF16", DType::BF16, 35, 0),
        ("W4-f16", sym_per_channel(4), "f16", "F16", DType::F16, 0, 5),
    ] {
        let student = tmp.path().join(name);
        teacher_student(&student, &scheme, SP);
        let f32_file = tmp.path().join(format!("{name}.f32.gguf"));
        let f32_bytes = export_gguf(&student, &f32_file)["bytes"].as_u64().unwrap();
        let file = tmp.path().join(format!("{name}.gguf"));
        let s = ok_json(&pack_gguf(&student, &file, &["--gguf-float", flag]));
        assert_documented("qat-pack --format gguf", &s);
        eprintln!("{name}: {s}");
        assert_eq!(s["float_type"], ty);
        assert_eq!(s["float_layers"], float_layers, "{name}");
        assert_eq!(
            s["float_tensors"],
            float_layers + 1,
            "{name}: and the embeddings"
        );
        assert_eq!(s["f32_layers"], f32_layers, "{name}");
        let rounded = s["rounded"].as_array().unwrap();
        assert_eq!(
            rounded.len() as u64,
            float_layers + 1,
            "{name}: f32 weights all round"
        );
        let line = rounded[0].as_str().unwrap();
        assert!(
            line.starts_with("token_embd.weight: ")
                && line.contains(&format!("values rounded to {ty}")),
            "{line}"
        );
        // Each float tensor shrinks from 4 to 2 bytes per value (alignment padding aside).
        let per_layer = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 172 * 64; // q, o; k, v; gate, up, down
        let values = 512 * 64 + float_layers / 7 * per_layer;
        let saved = f32_bytes - s["bytes"].as_u64().unwrap();
        assert!(
            saved.abs_diff(2 * values) <= 32 * 36,
            "{name}: saved {saved}, expected ~{}",
            2 * values
        );

        let expected = tmp.path().join(format!("{name}.safetensors"));
        write_expected(&student, &expected);
        let r = read_gguf(&file, &expected);
        eprintln!("{name}: {r}");
        assert_eq!(r["bit_equal"], 47, "{name}");
        assert_eq!(r["float_rounded"], float_layers + 1, "{name}");
        assert_eq!(r["types"][ty], float_layers + 1, "{name}");

        let mut names = vec![embeddings.clone()];
        if float_layers > 0 {
            names.extend(linear.iter().cloned());
        }
        let rounded_dir = tmp.path().join(format!("{name}-rounded"));
        rounded_student(&student, &rounded_dir, &names, dtype);
        let quantization = if float_layers > 0 {
            "none"
        } else {
            "fake_quant"
        };
        forward_matches_qat_eval(&rounded_dir, &file, tmp.path(), quantization);
        assert_llama_cpp_nll(name, &file, &rounded_dir, tmp.path(), 5e-4);
    }
    // F16 cannot hold 70000: refused, naming the tensor and the place, nothing written.
    let big = tmp.path().join("big");
    teacher_student(&big, r#"{"format_version": 1, "weight": null}"#, SP);
    let path = big.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let w = &tensors["model.layers.1.mlp.up_proj.weight"];
    let mut v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[3 * 64 + 5] = 70000.0;
    let w = Tensor::from_vec(v, w.dims(), &Device::Cpu).unwrap();
    tensors.insert("model.layers.1.mlp.up_proj.weight".into(), w);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let file = tmp.path().join("big.gguf");
    let o = pack_gguf(&big, &file, &["--gguf-float", "f16"]);
    assert_error(
        &o,
        "qat-pack",
        "blk.1.ffn_up.weight (model.layers.1.mlp.up_proj.weight): value for F16 at row 3, column 5: found 70000",
    );
    assert!(!file.exists() && !tmp.path().join("big.gguf.tmp").exists());
    ok_json(&pack_gguf(&big, &file, &["--gguf-float", "bf16"]));
    // Packed output has no float type to choose.
    let o = qat_pack(&[
        "-m",
        big.to_str().unwrap(),
        "-o",
        tmp.path().join("p").to_str().unwrap(),
        "--gguf-float",
        "f16",
    ]);
    assert_error(&o, "qat-pack", "--gguf-float applies to --format gguf only");
}

/// LLM-QAT's weights (symmetric, per output channel, `bits`) on every linear layer.
fn sym_per_channel(bits: u8) -> String {
    format!(
        r#"{{"format_version": 1, "weight": {{"bits": {bits}, "format": {{"kind": "sym_per_channel"}}}}}}"#
    )
}

/// Per-channel students (LLM-QAT's W2..W8) export losslessly: up to 4 bits as Q4_0 blocks, above
/// as Q8_0, every block of a row carrying the row's f16 scale (read_gguf.py checks the scales
/// against the master weight and every value bit for bit); `down_proj` (172 inputs, no block fits)
/// is stored as F32 of its fake-quantized values, with a warning naming it.
#[test]
fn per_channel_students_export_as_row_scaled_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let w3_attn_only = r#"{"format_version": 1, "weight": {"bits": 3, "format": {"kind": "sym_per_channel"}},
        "overrides": [{"pattern": "layers.*.mlp.down_proj", "weight": null}]}"#;
    for (name, scheme, ty, dequantized) in [
        ("W4", sym_per_channel(4), "Q4_0", 5),
        ("W8", sym_per_channel(8), "Q8_0", 5),
        ("W2", sym_per_channel(2), "Q4_0", 5),
        ("W3-down-fp", w3_attn_only.to_string(), "Q4_0", 0),
    ] {
        let student = tmp.path().join(name);
        teacher_student(&student, &scheme, SP);
        let file = tmp.path().join(format!("{name}.gguf"));
        let o = pack_gguf(&student, &file, &[]);
        let s = ok_json(&o);
        assert_documented("qat-pack --format gguf", &s);
        assert_eq!(s["types"][ty], 30, "{name}: {s}");
        assert_eq!(s["quantized_layers"], 30, "{name}");
        assert_eq!(s["f32_layers"], 5, "{name}");
        assert!(
            stderr(&o).contains("qat-pack: warning: the tokenizer collapses runs of spaces"),
            "{}",
            stderr(&o)
        );
        let notes = s["dequantized"].as_array().unwrap();
        assert_eq!(notes.len(), dequantized, "{name}: {s}");
        if dequantized > 0 {
            let note = "layers.0.mlp.down_proj: 172 inputs are not a multiple of 32: F32 of its";
            assert!(notes[0].as_str().unwrap().starts_with(note), "{}", notes[0]);
            assert!(
                stderr(&o).contains(&format!("qat-pack: warning: {note}")),
                "{}",
                stderr(&o)
            );
        }
        let expected = tmp.path().join(format!("{name}.safetensors"));
        write_expected(&student, &expected);
        let r = read_gguf(&file, &expected);
        eprintln!("{name}: {r}");
        assert_eq!(r["bit_equal"], 47, "{name}");
        assert_eq!(r["row_scale_equal"], 30, "{name}");
        assert_eq!(r["requantized_equal"], 0, "{name}");
    }
}

/// `qat-eval`'s docs-mode result on the first `limit` TinyStories documents, and the ids it
/// scored (`--ids-out`: JSON lists, each starting with BOS) in `tmp/ids-<limit>-<seq_len>.json`.
fn qat_eval_nll(
    student: &Path,
    limit: usize,
    seq_len: usize,
    tmp: &Path,
) -> (serde_json::Value, PathBuf) {
    let ids_path = tmp.join(format!("ids-{limit}-{seq_len}.json"));
    let e = ok_json(&eval_tinystories(
        student,
        limit,
        &[
            "--seq-len",
            &seq_len.to_string(),
            "--ids-out",
            ids_path.to_str().unwrap(),
        ],
    ));
    let ids: Vec<Vec<u32>> =
        serde_json::from_str(&std::fs::read_to_string(&ids_path).unwrap()).unwrap();
    let scored: usize = ids.iter().map(|s| s.len() - 1).sum();
    assert_eq!(e["tokens"], scored, "--ids-out holds the scored tokens");
    assert!(ids.iter().all(|s| s[0] == 1 && s.len() <= seq_len));
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
    // stories260K's tokenizer collapses runs of spaces, read from either source.
    for s in &summaries {
        assert_eq!(s["remove_extra_whitespaces"], true, "{s}");
    }
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
        let o = pack_gguf(&student, &out, extra);
        if !o.status.success() {
            assert!(
                !out.exists() && !tmp.path().join("out.gguf.tmp").exists(),
                "no output on error"
            );
        }
        o
    };
    let asym = r#"{"format_version": 1, "weight": {"bits": 4, "format": {"kind": "asym_group", "group_size": null}}}"#;
    assert_error(&run(asym, &[]), "qat-pack", "layers.0.self_attn.q_proj: weight format asym_group (group_size null) (4 bits) is not a GGUF block format (expected q4_0, q4_1, q8_0 or sym_per_channel, or null for F32)");
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
    assert_error(&pack_gguf(&s2, &out, &[]), "qat-pack", "already exists");
    assert_eq!(std::fs::read(&out).unwrap(), b"x");
    let packed = tmp.path().join("packed");
    assert_error(&qat_pack(&["-m", s2.to_str().unwrap(), "-o", packed.to_str().unwrap()]), "qat-pack", "layers.0.self_attn.q_proj: weight format q4_0 is a GGUF block format, which the packed format does not store; export it with qat-pack --format gguf");
    assert!(!packed.exists());
}
