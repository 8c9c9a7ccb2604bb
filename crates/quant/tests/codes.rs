//! The packer's contract: `dequantize_codes(quantize_codes(w)) == fake_weight(w)` bit for bit in
//! f32, for every weight format and bit width, on random weights plus the awkward rows (zeros,
//! constants, ties, scales that saturate or underflow f16); and the codes' layout and ranges.

use candle_core::{DType, Device, Tensor};
use half::f16;
use qat_quant::{dequantize_codes, fake_weight, quantize_codes, WeightCodes, WeightQuant};

/// A small deterministic generator (SplitMix64), so the test needs no `rand`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Roughly normal (sum of uniforms), times `scale`.
    fn normal(&mut self, scale: f32) -> f32 {
        let s: f32 = (0..4)
            .map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32)
            .sum();
        (s - 2.0) * scale
    }
}

const IN: usize = 96;

/// 12 rows × 96: random rows at several scales, then special rows.
fn weights() -> Tensor {
    let mut rng = Rng(7);
    let mut rows: Vec<Vec<f32>> = [0.02f32, 0.5, 3.0, 1e-3]
        .iter()
        .map(|&s| (0..IN).map(|_| rng.normal(s)).collect())
        .collect();
    rows.push(vec![0.0; IN]); // all zero
    rows.push(vec![0.3; IN]); // constant (min = max)
    rows.push(vec![-0.7; IN]);
    rows.push((0..IN).map(|i| i as f32 * 0.5 - 20.0).collect()); // many exact .5 ties
    rows.push(
        (0..IN)
            .map(|i| if i % 2 == 0 { 3e6 } else { -2e6 })
            .collect(),
    ); // f16 saturates
    rows.push((0..IN).map(|i| (i as f32 - 40.0) * 1e-10).collect()); // scales underflow f16
    rows.push(
        (0..IN)
            .map(|i| {
                if i < 48 {
                    rng.normal(1.0).abs()
                } else {
                    -rng.normal(1.0).abs()
                }
            })
            .collect(),
    );
    rows.push(
        (0..IN)
            .map(|i| if i % 3 == 0 { -0.0 } else { rng.normal(0.1) })
            .collect(),
    );
    let flat: Vec<f32> = rows.concat();
    Tensor::from_vec(flat, (12, IN), &Device::Cpu).unwrap()
}

fn quantizers() -> Vec<WeightQuant> {
    let mut v = Vec::new();
    for bits in 2..=8 {
        v.push(WeightQuant::sym_per_channel(bits));
        for g in [None, Some(32), Some(16), Some(96), Some(1)] {
            v.push(WeightQuant::asym_group(bits, g));
        }
    }
    for g in [None, Some(32), Some(8), Some(1)] {
        v.push(WeightQuant::nf3(g));
        v.push(WeightQuant::nf4(g));
    }
    for t in qat_quant::GgmlType::ALL {
        v.push(WeightQuant::ggml(t));
    }
    v
}

fn bits_of(t: &Tensor) -> Vec<u32> {
    qat_model::custom_op::f32_bits(t).unwrap()
}

#[test]
fn dequantized_codes_equal_fake_weight_bit_for_bit() {
    let w = weights();
    for wq in quantizers() {
        let c = quantize_codes(&w, &wq).unwrap();
        let back = dequantize_codes(&c, &wq, &Device::Cpu).unwrap();
        assert_eq!(back.dims(), [12, IN]);
        let fake = fake_weight(&w, &wq).unwrap();
        let (a, b) = (bits_of(&back), bits_of(&fake));
        if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i]) {
            panic!(
                "{wq:?}: element {i} (row {}): codes give {}, fake_weight {}",
                i / IN,
                f32::from_bits(a[i]),
                f32::from_bits(b[i])
            );
        }
        // bf16 weights: the codes of the widened weight, fake_weight's values before its cast back.
        let wb = w.to_dtype(DType::BF16).unwrap();
        let cb = quantize_codes(&wb, &wq).unwrap();
        let fb = fake_weight(&wb, &wq).unwrap();
        let back_b = dequantize_codes(&cb, &wq, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        assert_eq!(
            bits_of(&back_b.to_dtype(DType::F32).unwrap()),
            bits_of(&fb.to_dtype(DType::F32).unwrap()),
            "{wq:?} bf16"
        );
    }
}

#[test]
fn codes_have_the_documented_layout_and_ranges() {
    let w = weights();
    for wq in quantizers() {
        let c = quantize_codes(&w, &wq).unwrap();
        let g = wq.format.group_len(IN).unwrap();
        assert_eq!((c.out_features, c.in_features, c.group_size), (12, IN, g));
        assert_eq!(c.n_groups(), IN / g);
        assert_eq!(c.codes.len(), 12 * IN);
        let (max_code, scales_per_group, zeros) = match wq.format {
            qat_quant::WeightFormat::SymPerChannel => ((1u16 << wq.bits) - 2, 1, false),
            qat_quant::WeightFormat::AsymGroup { .. } => ((1u16 << wq.bits) - 1, 1, true),
            qat_quant::WeightFormat::Nf3 { .. } => (7, 2, false),
            qat_quant::WeightFormat::Nf4 { .. } => (15, 1, false),
            qat_quant::WeightFormat::Ggml(t) => (u16::from(t.max_code()), 1, false),
        };
        assert!(c.codes.iter().all(|&q| u16::from(q) <= max_code), "{wq:?}");
        assert_eq!(
            c.scales.len(),
            12 * c.n_groups() * scales_per_group,
            "{wq:?}"
        );
        assert_eq!(
            c.zeros.as_ref().map(Vec::len),
            zeros.then_some(12 * c.n_groups())
        );
        if let Some(z) = &c.zeros {
            assert!(z.iter().all(|&z| u16::from(z) <= max_code));
        }
        let ggml = matches!(wq.format, qat_quant::WeightFormat::Ggml(_));
        assert_eq!(
            c.mins.as_ref().map(Vec::len),
            (wq.format == qat_quant::WeightFormat::Ggml(qat_quant::GgmlType::Q4_1))
                .then_some(12 * c.n_groups())
        );
        // GGUF scales follow llama.cpp: Q4_0's d is negative for a block whose largest |x| is
        // positive, and overflows f16 (inf) for the 3e6 row, as llama.cpp's would.
        assert!(
            ggml || c
                .scales
                .iter()
                .all(|s| s.is_finite() && !s.is_sign_negative()),
            "{wq:?}"
        );
    }
}

#[test]
fn codes_by_hand() {
    // One row [-1, -0.2, 0.5, 2] (see tests/asym.rs and tests/fake.rs for the arithmetic).
    let w = Tensor::new(&[[-1.0f32, -0.2, 0.5, 2.0]], &Device::Cpu).unwrap();
    // asym 2 bits: scale 1, zero 1, codes [0, 1, 1, 3].
    let c = quantize_codes(&w, &WeightQuant::asym_group(2, None)).unwrap();
    assert_eq!(c.codes, [0, 1, 1, 3]);
    assert_eq!(c.scales, [f16::ONE]);
    assert_eq!(c.zeros, Some(vec![1]));
    // sym 3 bits: qmax 3, scale f16(2/3) = 0.66650390625; q = round([-1.5, -0.3, 0.75, 3.0])
    // = [-2, 0, 1, 3] → offset binary q + 3 = [1, 3, 4, 6].
    let c = quantize_codes(&w, &WeightQuant::sym_per_channel(3)).unwrap();
    assert_eq!(c.codes, [1, 3, 4, 6]);
    assert_eq!(c.scales[0].to_f64(), 0.66650390625);
    assert_eq!(c.zeros, None);
    // NF3: scales (max 2, |min| 1); u = [-1, -0.2, 0.25, 1] → levels [0, 2, 4, 7].
    let c = quantize_codes(&w, &WeightQuant::nf3(None)).unwrap();
    assert_eq!(c.codes, [0, 2, 4, 7]);
    assert_eq!(c.scales, [f16::from_f32(2.0), f16::ONE]);
    // NF4: absmax 2; u = [-0.5, -0.1, 0.25, 1] → levels [2, 6, 10, 15]
    // (-0.5 ∈ (-0.6106, -0.4600]; -0.1 ∈ (-0.1379, -0.0455]; 0.25 ∈ (0.2035, 0.2920]).
    let c = quantize_codes(&w, &WeightQuant::nf4(None)).unwrap();
    assert_eq!(c.codes, [2, 6, 10, 15]);
    assert_eq!(c.scales, [f16::from_f32(2.0)]);
}

#[test]
fn malformed_codes_and_shapes_are_errors() {
    let w = weights();
    let wq = WeightQuant::asym_group(4, Some(32));
    let e = quantize_codes(&w, &WeightQuant::asym_group(4, Some(64)))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("group size 64 does not divide in_features 96"),
        "{e}"
    );
    let good = quantize_codes(&w, &wq).unwrap();
    let dev = Device::Cpu;
    let short = WeightCodes {
        codes: good.codes[1..].to_vec(),
        ..good.clone()
    };
    let e = dequantize_codes(&short, &wq, &dev).unwrap_err().to_string();
    assert!(e.contains("codes has 1151 entries, expected 1152"), "{e}");
    let no_zeros = WeightCodes {
        zeros: None,
        ..good.clone()
    };
    let e = dequantize_codes(&no_zeros, &wq, &dev)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("zeros None, expected 36 entries for asym_group"),
        "{e}"
    );
    let e = dequantize_codes(&good, &WeightQuant::asym_group(4, Some(16)), &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("group_size 32, expected 16"), "{e}");
    let mut bad_code = good.clone();
    bad_code.codes[5] = 16;
    let e = dequantize_codes(&bad_code, &wq, &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("codes[5] = 16 out of range 0..=15"), "{e}");
    let nf3 = WeightQuant::nf3(Some(32));
    let mut bad_nf = quantize_codes(&w, &nf3).unwrap();
    bad_nf.codes[0] = 8;
    let e = dequantize_codes(&bad_nf, &nf3, &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("codes[0] = 8 out of range 0..=7"), "{e}");
    let e = dequantize_codes(&good, &WeightQuant::nf4(Some(32)), &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("zeros given for format nf4"), "{e}");
}
