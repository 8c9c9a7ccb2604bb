//! Cross-implementation test: packed files written by this crate are read by
//! `tests/foreign/read_packed.py` (the `safetensors` Python package and numpy only, following
//! `formats/packed.md`), which must dequantize every layer to exactly the weights `load_packed`
//! gives, and reject damaged files.
//!
//! The interpreter is `$QAT_PYTHON`, default `<workspace>/.venv/bin/python`; if it is missing or
//! lacks safetensors / numpy the test fails and says to run `make test-deps`.

mod common;

use candle_core::Device;
use common::*;
use qat_pack::st::{self, OwnedTensor};
use qat_pack::{load_packed, pack, PACKED_FILE};
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn python() -> PathBuf {
    let py = std::env::var_os("QAT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv/bin/python"));
    let hint = "run `make test-deps` (creates .venv with safetensors and numpy) or set QAT_PYTHON to an interpreter with them";
    assert!(
        py.exists(),
        "python interpreter {} does not exist: {hint}",
        py.display()
    );
    let out = Command::new(&py)
        .args([
            "-c",
            "import safetensors, numpy; print(safetensors.__version__)",
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}: {hint}", py.display()));
    assert!(
        out.status.success(),
        "{} cannot import safetensors and numpy ({}): {hint}",
        py.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    py
}

/// Runs the foreign reader; `Ok(summary)` on success, `Err(stderr)` on a non-zero exit.
fn run_reader(dir: &Path, expected: Option<&Path>) -> Result<serde_json::Value, String> {
    let mut cmd = Command::new(python());
    cmd.arg(workspace().join("tests/foreign/read_packed.py"))
        .arg(dir);
    if let Some(e) = expected {
        cmd.arg(e);
    }
    let out = cmd.output().expect("run read_packed.py");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(stderr);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("bad JSON {stdout:?}: {e}; stderr: {stderr}")))
}

/// Writes the dequantized weights `load_packed` gives (`<prefix>.weight`, f32) to `path` and
/// returns their sum.
fn dump_expected(packed: &Path, path: &Path) -> f64 {
    let (model, scheme) = load_packed(packed, &Device::Cpu).unwrap();
    let mut tensors = Vec::new();
    let mut sum = 0f64;
    for l in model.linears() {
        if scheme.resolve(l.id()).weight.is_none() {
            continue;
        }
        let (o, i) = l.weight().dims2().unwrap();
        let v: Vec<f32> = l.weight().flatten_all().unwrap().to_vec1().unwrap();
        sum += v.iter().map(|&x| f64::from(x)).sum::<f64>();
        tensors.push(OwnedTensor {
            name: l.id().weight_key(),
            dtype: Dtype::F32,
            shape: vec![o, i],
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        });
    }
    st::write(path, &BTreeMap::new(), tensors).unwrap();
    sum
}

#[test]
fn python_dequantizes_every_layer_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let (student, out) = (tmp.path().join("student"), tmp.path().join("packed"));
    write_student(&student, SCHEME, 11);
    let s = pack(&student, &out).unwrap();
    let expected = tmp.path().join("expected.safetensors");
    let sum = dump_expected(&out, &expected);
    let got =
        run_reader(&out, Some(&expected)).unwrap_or_else(|e| panic!("read_packed.py failed: {e}"));
    assert_eq!(got["layers"], 13);
    assert_eq!(got["compared"], 13);
    assert_eq!(got["quantized_weights"], s.size.quantized_weights);
    assert_eq!(got["code_bytes"], s.size.code_bytes);
    assert_eq!(got["scale_bytes"], s.size.scale_bytes);
    assert_eq!(got["zero_bytes"], s.size.zero_bytes);
    for (key, want) in [
        ("bits_per_weight", s.size.bits_per_weight),
        ("bits_per_weight_theory", s.size.bits_per_weight_theory),
        ("sum", sum),
    ] {
        let g = got[key].as_f64().unwrap();
        assert!(
            (g - want).abs() <= 1e-9 * want.abs().max(1.0),
            "{key}: python {g} vs rust {want}"
        );
    }
    let formats: Vec<&str> = got["formats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        formats,
        [
            "asym_group:2",
            "asym_group:3",
            "asym_group:4",
            "asym_group:7",
            "nf3:3",
            "nf4:4",
            "sym_per_channel:2",
            "sym_per_channel:3",
            "sym_per_channel:5",
            "sym_per_channel:6",
            "sym_per_channel:8"
        ]
    );
}

#[test]
fn python_reader_rejects_damaged_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (student, out) = (tmp.path().join("student"), tmp.path().join("packed"));
    write_student(&student, SCHEME, 12);
    pack(&student, &out).unwrap();
    run_reader(&out, None).unwrap();

    let bad = tmp.path().join("bad");
    copy_dir(&out, &bad);
    rewrite(&bad, |m, _| {
        m.insert("qat.format_version".into(), "2".into());
    });
    let e = run_reader(&bad, None).unwrap_err();
    assert!(e.contains("qat.format_version '2', expected '1'"), "{e}");

    copy_dir(&out, &bad);
    rewrite(&bad, |_, t| {
        tensor(t, "model.layers.1.mlp.down_proj.qweight").data[37] |= 0x10
    });
    let e = run_reader(&bad, None).unwrap_err();
    assert!(
        e.contains("model.layers.1.mlp.down_proj.qweight: padding bits set in row 0"),
        "{e}"
    );

    copy_dir(&out, &bad);
    rewrite(&bad, |_, t| {
        tensor(t, "model.layers.1.self_attn.k_proj.qweight").data[0] = 0xff
    });
    let e = run_reader(&bad, None).unwrap_err();
    assert!(
        e.contains("k_proj.qweight: code 7 out of range 0..=6"),
        "{e}"
    );

    copy_dir(&out, &bad);
    let path = bad.join(PACKED_FILE);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
    let e = run_reader(&bad, None).unwrap_err();
    assert!(e.contains("truncated"), "{e}");
}
