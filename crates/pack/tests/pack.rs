//! Round trips of `pack` / `load_packed` on a synthetic student: the dequantized weights equal
//! the fake-quantized student's bit for bit, sizes match theory, output is deterministic and
//! atomic, and the spec's NF tables are the code's.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use qat_model::ModelDir;
use qat_pack::{load_packed, pack, PackError, PACKED_FILE};
use qat_quant::{fake_weight, Scheme, NF3_LEVELS, NF4_LEVELS};

fn bits(t: &Tensor) -> Vec<u32> {
    qat_model::custom_op::f32_bits(t).unwrap()
}

#[test]
fn packed_weights_equal_fake_quantized_student_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let (student, out) = (tmp.path().join("student"), tmp.path().join("packed"));
    write_student(&student, SCHEME, 1);
    let summary = pack(&student, &out).unwrap();
    assert_eq!(summary.size.quantized_layers, 13);
    assert_eq!(summary.full_precision_layers, 1);

    let (model, scheme) = load_packed(&out, &Device::Cpu).unwrap();
    assert_eq!(
        scheme,
        Scheme::load(student.join("quant_scheme.json")).unwrap()
    );
    let dir = ModelDir::open(&student).unwrap();
    let teacher = dir.load(&Device::Cpu, DType::F32).unwrap();
    let mut quantized = 0;
    for (packed, source) in model.linears().into_iter().zip(teacher.linears()) {
        let id = packed.id();
        let want = match scheme.resolve(id).weight {
            Some(wq) => {
                quantized += 1;
                fake_weight(source.weight(), &wq).unwrap()
            }
            None => source.weight().clone(),
        };
        assert_eq!(bits(packed.weight()), bits(&want), "{id}");
    }
    assert_eq!(quantized, 13);

    // The loaded model runs act/kv quantization only: same logits as the student under
    // FakeQuant (which also fake-quantizes the weights, to the same values).
    let mut student_model = teacher.clone();
    student_model.set_hooks(std::sync::Arc::new(qat_quant::FakeQuant::for_inference(
        scheme.clone(),
    )));
    let tokens = Tensor::new(&[[1u32, 5, 9, 3, 17, 2, 11]], &Device::Cpu).unwrap();
    let a = model.forward_full(&tokens).unwrap();
    let b = student_model.forward_full(&tokens).unwrap();
    assert_eq!(bits(&a), bits(&b));
    let fp = teacher.forward_full(&tokens).unwrap();
    assert_ne!(bits(&a), bits(&fp), "quantization had no effect");
}

#[test]
fn sizes_match_theory_and_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (student, out) = (tmp.path().join("student"), tmp.path().join("packed"));
    write_student(&student, SCHEME, 2);
    let s = pack(&student, &out).unwrap();
    let file_len = std::fs::metadata(out.join(PACKED_FILE)).unwrap().len();
    assert_eq!(s.bytes, file_len);
    // Per layer (rows x bytes): codes, scales (x2 for nf3), zeros (asym).
    let layers: [(usize, usize, u8, usize, &str); 13] = [
        (40, 40, 3, 10, "nf3"),
        (20, 40, 4, 40, "nf4"),
        (20, 40, 8, 40, "sym"),
        (100, 40, 2, 8, "asym"),
        (100, 40, 5, 40, "sym"),
        (40, 100, 7, 25, "asym"),
        (40, 40, 6, 40, "sym"),
        (20, 40, 3, 40, "sym"),
        (20, 40, 2, 40, "sym"),
        (40, 40, 4, 40, "asym"),
        (100, 40, 3, 20, "asym"), // layers.1.mlp.gate_proj: the top-level quantizer
        (100, 40, 4, 20, "nf4"),
        (40, 100, 3, 50, "nf3"),
    ];
    let (mut code, mut scale, mut zero, mut n, mut theory) = (0u64, 0u64, 0u64, 0u64, 0f64);
    for (out_f, in_f, b, g, kind) in layers {
        let groups = (out_f * in_f / g) as u64;
        code += (out_f * (in_f * usize::from(b)).div_ceil(8)) as u64;
        scale += groups * if kind == "nf3" { 4 } else { 2 };
        zero += if kind == "asym" { groups } else { 0 };
        n += (out_f * in_f) as u64;
        let extra = match kind {
            "nf3" => 32.0,
            "asym" => 24.0,
            _ => 16.0,
        };
        theory += (out_f * in_f) as f64 * (f64::from(b) + extra / g as f64);
    }
    assert_eq!(
        (
            s.size.code_bytes,
            s.size.scale_bytes,
            s.size.zero_bytes,
            s.size.quantized_weights
        ),
        (code, scale, zero, n)
    );
    assert!((s.size.bits_per_weight_theory - theory / n as f64).abs() < 1e-12);
    assert!((s.size.bits_per_weight - 8.0 * (code + scale + zero) as f64 / n as f64).abs() < 1e-12);
    // Row padding only: 4 bits per row of 3 x 100 and 7 x 100 bits, 0 elsewhere.
    let padding_bits = 40.0 * 4.0 + 40.0 * 4.0;
    let excess = s.size.bits_per_weight - s.size.bits_per_weight_theory;
    assert!((excess - padding_bits / n as f64).abs() < 1e-12, "{excess}");
    assert!(s.size.overhead() < 0.01, "{:?}", s.size);
}

#[test]
fn packing_is_deterministic_and_keeps_the_files() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tmp.path().join("student");
    write_student(&student, SCHEME, 3);
    std::fs::write(student.join("tokenizer.json"), "{}").unwrap();
    std::fs::write(
        student.join("provenance.json"),
        r#"{"tool": "qat-distill 0.1.0", "steps": 2}"#,
    )
    .unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let sa = pack(&student, &a).unwrap();
    let sb = pack(&student, &b).unwrap();
    assert_eq!(
        std::fs::read(a.join(PACKED_FILE)).unwrap(),
        std::fs::read(b.join(PACKED_FILE)).unwrap()
    );
    assert_eq!(sa.packed_sha256, sb.packed_sha256);
    let mut names: Vec<String> = std::fs::read_dir(&a)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "config.json",
            PACKED_FILE,
            "provenance.json",
            "quant_scheme.json",
            "tokenizer.json"
        ]
    );
    assert_eq!(
        std::fs::read(a.join("config.json")).unwrap(),
        CONFIG.as_bytes()
    );
    let prov: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("provenance.json")).unwrap()).unwrap();
    assert_eq!(prov["source_provenance"]["steps"], 2);
    assert_eq!(prov["packed_sha256"], sa.packed_sha256.as_str());
    assert_eq!(
        prov["source_weights_sha256"],
        ModelDir::open(&student)
            .unwrap()
            .weights_sha256()
            .unwrap()
            .as_str()
    );
    assert!(!tmp.path().join("a.partial").exists());
    // An existing output is refused; a stale partial directory is replaced.
    assert!(matches!(
        pack(&student, &a),
        Err(PackError::OutputExists { .. })
    ));
    let c = tmp.path().join("c");
    std::fs::create_dir_all(tmp.path().join("c.partial")).unwrap();
    std::fs::write(tmp.path().join("c.partial/junk"), "x").unwrap();
    pack(&student, &c).unwrap();
    assert!(!c.join("junk").exists() && !tmp.path().join("c.partial").exists());
}

#[test]
fn students_without_quantized_weights_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tmp.path().join("s");
    write_student(
        &student,
        r#"{"format_version": 1, "weight": null, "act": {"bits": 8}}"#,
        4,
    );
    let e = pack(&student, &tmp.path().join("o")).unwrap_err();
    assert!(matches!(e, PackError::NothingToPack { .. }), "{e}");
    std::fs::remove_file(student.join("quant_scheme.json")).unwrap();
    let e = pack(&student, &tmp.path().join("o"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("quant_scheme.json: missing"), "{e}");
    // A group size that does not divide in_features (100 for down_proj).
    write_student(
        &student,
        r#"{"format_version": 1, "weight": {"bits": 3, "format": {"kind": "asym_group", "group_size": 32}}}"#,
        4,
    );
    let e = chain(&pack(&student, &tmp.path().join("o")).unwrap_err());
    assert!(
        e.contains("does not fit the model")
            && e.contains("group size 32 does not divide in_features 40"),
        "{e}"
    );
    assert!(!tmp.path().join("o").exists() && !tmp.path().join("o.partial").exists());
}

/// formats/packed.md section 5 lists the NF levels as f32 bit patterns: they must be the code's.
#[test]
fn spec_codebook_tables_are_the_codes_levels() {
    let spec = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../formats/packed.md"
    ))
    .unwrap();
    let tail = &spec[spec.find("NF codebooks").expect("NF codebooks section")..];
    let hex: Vec<u32> = tail
        .split('`')
        .filter(|s| s.len() == 10 && s.starts_with("0x"))
        .map(|s| u32::from_str_radix(&s[2..], 16).unwrap())
        .collect();
    let want: Vec<u32> = NF3_LEVELS
        .iter()
        .chain(NF4_LEVELS.iter())
        .map(|x| x.to_bits())
        .collect();
    assert_eq!(hex, want);
}
