//! `load_packed` on damaged packed directories: each problem of `formats/packed.md` section 6
//! is a typed error naming the file, the tensor or key, and the values found and expected.

mod common;

use candle_core::Device;
use common::*;
use half::f16;
use qat_pack::{load_packed, pack, PackError, PACKED_FILE};
use safetensors::Dtype;
use std::path::{Path, PathBuf};

/// A freshly packed synthetic student; returns (tempdir guard, packed dir).
fn packed() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let student = tmp.path().join("student");
    write_student(&student, SCHEME, 7);
    let out = tmp.path().join("packed");
    pack(&student, &out).unwrap();
    (tmp, out)
}

fn load_err(dir: &Path) -> (PackError, String) {
    let e = load_packed(dir, &Device::Cpu)
        .map(|_| ())
        .expect_err("loading should fail");
    let msg = chain(&e);
    assert!(
        msg.contains(&dir.display().to_string()),
        "message does not name the file: {msg}"
    );
    (e, msg)
}

fn assert_contains(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "{p:?} not in: {msg}");
    }
}

#[test]
fn truncated_files_are_reported_with_their_sizes() {
    let (_t, dir) = packed();
    let path = dir.join(PACKED_FILE);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let (e, msg) = load_err(&dir);
    assert!(matches!(e, PackError::Truncated { .. }), "{msg}");
    assert_contains(
        &msg,
        &[&format!(
            "the file has {} bytes, expected {}",
            bytes.len() - 10,
            bytes.len()
        )],
    );
    std::fs::write(&path, &bytes[..100]).unwrap();
    let (_, msg) = load_err(&dir);
    assert_contains(&msg, &["the header is cut off", "the file has 100 bytes"]);
    std::fs::write(&path, &bytes[..5]).unwrap();
    let (_, msg) = load_err(&dir);
    assert_contains(&msg, &["shorter than the 8-byte header length"]);
    // Trailing garbage is damage too.
    let mut longer = bytes.clone();
    longer.extend([0u8; 3]);
    std::fs::write(&path, &longer).unwrap();
    let (_, msg) = load_err(&dir);
    assert_contains(
        &msg,
        &[&format!(
            "the file has {} bytes, expected {}",
            bytes.len() + 3,
            bytes.len()
        )],
    );
}

#[test]
fn metadata_problems_name_the_key() {
    let (_t, dir) = packed();
    let saved = std::fs::read(dir.join(PACKED_FILE)).unwrap();
    let restore = || std::fs::write(dir.join(PACKED_FILE), &saved).unwrap();

    rewrite(&dir, |m, _| {
        m.insert("qat.format_version".into(), "2".into());
    });
    let (_, msg) = load_err(&dir);
    assert_contains(
        &msg,
        &["metadata qat.format_version", "found \"2\", expected \"1\""],
    );
    restore();

    rewrite(&dir, |m, _| {
        m.remove("qat.scheme");
    });
    let (_, msg) = load_err(&dir);
    assert_contains(&msg, &["metadata qat.scheme: missing"]);
    restore();

    rewrite(&dir, |m, _| {
        m.insert("qat.format".into(), "pt".into());
    });
    let (_, msg) = load_err(&dir);
    assert_contains(
        &msg,
        &[
            "metadata qat.format",
            "found \"pt\", expected \"qat-packed\"",
        ],
    );
    restore();

    rewrite(&dir, |m, _| {
        let s = m["qat.scheme"].replace("\"bits\":3", "\"bits\":9");
        m.insert("qat.scheme".into(), s);
    });
    let (_, msg) = load_err(&dir);
    assert_contains(
        &msg,
        &[
            "metadata qat.scheme: not a valid scheme",
            "bits 9 out of range 2..=8",
        ],
    );
    restore();

    // A layer table that disagrees with the scheme.
    rewrite(&dir, |m, _| {
        let l = m["qat.layers"].replacen("\"bits\":3", "\"bits\":4", 1);
        m.insert("qat.layers".into(), l);
    });
    let (_, msg) = load_err(&dir);
    assert_contains(
        &msg,
        &[
            "metadata qat.layers: disagrees with qat.scheme and config.json at entry 0",
            "\"bits\":4",
            "\"bits\":3",
        ],
    );
    restore();

    // quant_scheme.json must be the file's scheme.
    std::fs::write(
        dir.join("quant_scheme.json"),
        r#"{"format_version": 1, "weight": {"bits": 4, "format": {"kind": "sym_per_channel"}}}"#,
    )
    .unwrap();
    let (_, msg) = load_err(&dir);
    assert_contains(
        &msg,
        &[
            "quant_scheme.json: differs from the packed file's qat.scheme",
            "found W4",
        ],
    );
}

#[test]
fn out_of_range_codes_zeros_padding_and_scales_are_refused() {
    let (_t, dir) = packed();
    let saved = std::fs::read(dir.join(PACKED_FILE)).unwrap();
    let restore = || std::fs::write(dir.join(PACKED_FILE), &saved).unwrap();

    // sym_per_channel 3 bits: codes 0..=6; byte 0 of row 2 = 0xff makes code 0 of row 2 = 7.
    rewrite(&dir, |_, t| {
        tensor(t, "model.layers.1.self_attn.k_proj.qweight").data[2 * 15] = 0xff
    });
    let (_, msg) = load_err(&dir);
    assert_contains(&msg, &["tensor model.layers.1.self_attn.k_proj.qweight: code at row 2, column 0: found 7, expected 0..=6"]);
    restore();

    // nf3, 100 codes of 3 bits in 38 bytes: the top 4 bits of each row's last byte are padding.
    rewrite(&dir, |_, t| {
        tensor(t, "model.layers.1.mlp.down_proj.qweight").data[38 + 37] |= 0x80
    });
    let (_, msg) = load_err(&dir);
    assert_contains(
        &msg,
        &[
            "model.layers.1.mlp.down_proj.qweight: padding bits at row 1, byte 37",
            "top 4 padding bit(s) 0",
        ],
    );
    restore();

    // asym_group 2 bits: zero points 0..=3.
    rewrite(&dir, |_, t| {
        tensor(t, "model.layers.0.mlp.gate_proj.zeros").data[5 * 3 + 1] = 4
    });
    let (_, msg) = load_err(&dir);
    assert_contains(&msg, &["model.layers.0.mlp.gate_proj.zeros: zero point at row 3, group 1: found 4, expected 0..=3"]);
    restore();

    // nf3 scales are (s_pos, s_neg) pairs: row 2, group 1, s_neg.
    rewrite(&dir, |_, t| {
        let k = 2 * (4 * 2) + 2 + 1;
        tensor(t, "model.layers.0.self_attn.q_proj.scales").data[2 * k..2 * k + 2]
            .copy_from_slice(&f16::NAN.to_le_bytes());
    });
    let (_, msg) = load_err(&dir);
    assert_contains(&msg, &["model.layers.0.self_attn.q_proj.scales: scale s_neg at row 2, group 1: found NaN, expected a finite f16 >= +0"]);
    restore();

    rewrite(&dir, |_, t| {
        tensor(t, "model.layers.0.self_attn.v_proj.scales").data[..2]
            .copy_from_slice(&f16::from_f32(-1.0).to_le_bytes())
    });
    let (_, msg) = load_err(&dir);
    assert_contains(
        &msg,
        &["model.layers.0.self_attn.v_proj.scales: scale at row 0, group 0: found -1"],
    );
}

#[test]
fn tensor_names_dtypes_and_shapes_are_checked() {
    let (_t, dir) = packed();
    let saved = std::fs::read(dir.join(PACKED_FILE)).unwrap();
    let restore = || std::fs::write(dir.join(PACKED_FILE), &saved).unwrap();

    rewrite(&dir, |_, t| {
        let q = tensor(t, "model.layers.0.mlp.up_proj.qweight"); // [100, 25]
        q.shape = vec![100, 24];
        q.data.truncate(2400);
    });
    let (e, msg) = load_err(&dir);
    assert!(matches!(e, PackError::Shape { .. }));
    assert_contains(
        &msg,
        &["tensor model.layers.0.mlp.up_proj.qweight: shape [100, 24], expected [100, 25]"],
    );
    restore();

    rewrite(&dir, |_, t| {
        let s = tensor(t, "model.layers.0.mlp.up_proj.scales");
        s.dtype = Dtype::BF16;
    });
    let (_, msg) = load_err(&dir);
    assert_contains(
        &msg,
        &["tensor model.layers.0.mlp.up_proj.scales: dtype BF16, expected F16"],
    );
    restore();

    rewrite(&dir, |_, t| {
        t.retain(|x| x.name != "model.layers.1.mlp.gate_proj.zeros")
    });
    let (_, msg) = load_err(&dir);
    assert_contains(
        &msg,
        &["tensor model.layers.1.mlp.gate_proj.zeros is missing"],
    );
    restore();

    rewrite(&dir, |_, t| t.retain(|x| x.name != "lm_head.weight"));
    let (_, msg) = load_err(&dir);
    assert_contains(&msg, &["tensor lm_head.weight is missing"]);
    restore();

    // A quantized layer must not also have a plain weight.
    rewrite(&dir, |_, t| {
        let mut extra = tensor(t, "model.layers.0.self_attn.o_proj.weight").clone();
        extra.name = "model.layers.0.self_attn.q_proj.weight".into();
        t.push(extra);
    });
    let (_, msg) = load_err(&dir);
    assert_contains(&msg, &["unexpected tensor model.layers.0.self_attn.q_proj.weight (a quantized layer has no .weight)"]);
    restore();

    rewrite(&dir, |_, t| {
        let mut z = tensor(t, "model.layers.0.mlp.gate_proj.zeros").clone();
        z.name = "model.layers.0.self_attn.v_proj.zeros".into();
        z.shape = vec![20, 1];
        z.data.truncate(20);
        t.push(z);
    });
    let (_, msg) = load_err(&dir);
    assert_contains(&msg, &["unexpected tensor model.layers.0.self_attn.v_proj.zeros (only asym_group layers have zero points)"]);
}

#[test]
fn not_a_packed_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tmp.path().join("student");
    write_student(&student, SCHEME, 1);
    let e = load_packed(&student, &Device::Cpu).map(|_| ()).unwrap_err();
    assert!(
        e.to_string()
            .contains("not a packed model directory: model.packed.safetensors is missing"),
        "{e}"
    );
    // Garbage in place of the header.
    std::fs::write(
        student.join(PACKED_FILE),
        b"\x10\0\0\0\0\0\0\0not json at all!",
    )
    .unwrap();
    let e = load_packed(&student, &Device::Cpu).map(|_| ()).unwrap_err();
    assert!(
        e.to_string()
            .contains("not a valid safetensors file: header is not JSON"),
        "{e}"
    );
}
