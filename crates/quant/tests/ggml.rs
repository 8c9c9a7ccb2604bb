//! llama.cpp's GGUF block grids (`q4_0`, `q4_1`, `q8_0`) with hand-worked values: the reference
//! quantizers of ggml-quants.c (`quantize_row_q4_0_ref`, `_q4_1_ref`, `_q8_0_ref`) and the
//! dequantization llama.cpp runs, worked out below on paper (ties, zero blocks, blocks whose
//! largest |x| is positive), then checked through `fake_weight`, `quantize_codes` and the bytes.

// The expected decimals are exact binary values (f16 scales times small integers), quoted in full.
#![allow(clippy::excessive_precision)]

use candle_core::{DType, Device, Tensor, Var};
use half::f16;
use qat_quant::{fake_weight, quantize_codes, GgmlType, Scheme, WeightFormat, WeightQuant};

/// A block of 32: `head` then zeros.
fn block(head: &[f32]) -> Vec<f32> {
    let mut v = head.to_vec();
    v.resize(32, 0.0);
    v
}

fn fake(xs: &[f32], t: GgmlType) -> Vec<f32> {
    let w = Tensor::from_vec(xs.to_vec(), (1, xs.len()), &Device::Cpu).unwrap();
    fake_weight(&w, &WeightQuant::ggml(t))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn q4_0_by_hand() {
    // Largest |x| first reached by -2 (the later +2 ties and does not replace it): d = -2/-8 =
    // 0.25, id = 4, code = trunc(4x + 8.5): 1 → 12, -2 → 0, 0.5 → 10, 0.75 → 11, -1 → 4,
    // 2 → 16.5 → 15 (clamped: 2 becomes 1.75), 0.125 → 9 (tie 0.5 goes up), -0.125 → 8 (tie
    // -0.5 goes up to 0), 0.375 → 10 (1.5 → 2), -0.375 → 7 (-1.5 → -1), 0 → 8.
    let xs = block(&[
        1.0, -2.0, 0.5, 0.75, -1.0, 2.0, 0.125, -0.125, 0.375, -0.375,
    ]);
    let b = GgmlType::Q4_0.quantize_block(&xs);
    assert_eq!(b.d, f16::from_f32(0.25));
    assert_eq!(&b.codes[..11], &[12, 0, 10, 11, 4, 15, 9, 8, 10, 7, 8]);
    let want = block(&[1.0, -2.0, 0.5, 0.75, -1.0, 1.75, 0.25, 0.0, 0.5, -0.25]);
    assert_eq!(bits(&fake(&xs, GgmlType::Q4_0)), bits(&want));

    // Largest |x| positive: d = 3/-8 = -0.375 (negative), id = f32(1/-0.375) = -2.6666667;
    // 3 → 3·id = -8.0000002 → f32 -8 → 0.5 → code 0 → (0-8)·(-0.375) = 3;
    // -1 → 2.6666667 + 8.5 → code 11 → 3·(-0.375) = -1.125; 0 → code 8 → 0·(-0.375) = -0.
    let xs = block(&[3.0, -1.0]);
    let b = GgmlType::Q4_0.quantize_block(&xs);
    assert_eq!(b.d.to_f32(), -0.375);
    assert_eq!(&b.codes[..3], &[0, 11, 8]);
    let got = fake(&xs, GgmlType::Q4_0);
    assert_eq!(&got[..2], &[3.0, -1.125]);
    assert_eq!(
        got[2].to_bits(),
        (-0.0f32).to_bits(),
        "llama.cpp gives -0 here"
    );

    // All zero: max stays 0, d = 0/-8 = -0 (stored as f16 0x8000), id = 0, codes 8, values -0.
    let xs = vec![0.0f32; 32];
    let b = GgmlType::Q4_0.quantize_block(&xs);
    assert_eq!(b.d.to_bits(), 0x8000);
    assert_eq!(b.codes, [8; 32]);
    assert!(fake(&xs, GgmlType::Q4_0)
        .iter()
        .all(|v| v.to_bits() == 0x8000_0000));
}

#[test]
fn q4_0_codes_use_the_f32_scale_and_values_the_f16_one() {
    // max = -0.1 (f32 -0.100000001490116): d = 0.0125000001862645 (f32), f16(d) =
    // 0.0124969482421875 (= 0x2266: 1638/131072). x = -0.1: code trunc(-8 + 8.5) = 0,
    // value -8 · f16(d) = -0.0999755859375 (not -0.1: the stored scale is f16).
    let xs = block(&[-0.1]);
    let b = GgmlType::Q4_0.quantize_block(&xs);
    assert_eq!(b.d.to_bits(), 0x2266);
    assert_eq!(b.codes[0], 0);
    assert_eq!(fake(&xs, GgmlType::Q4_0)[0], -0.0999755859375);
}

#[test]
fn q8_0_by_hand() {
    // amax 127: d = 1, id = 1, q = roundf(x), half away from zero: 2.5 → 3, -2.5 → -3, 0.5 → 1,
    // -0.5 → -1, 1.49 → 1, -0.49 → -0 → 0. Codes are q + 128.
    let xs = block(&[127.0, 2.5, -2.5, 0.5, -0.5, 1.49, -0.49, -127.0]);
    let b = GgmlType::Q8_0.quantize_block(&xs);
    assert_eq!(b.d, f16::ONE);
    assert_eq!(&b.codes[..9], &[255, 131, 125, 129, 127, 129, 128, 1, 128]);
    let want = block(&[127.0, 3.0, -3.0, 1.0, -1.0, 1.0, 0.0, -127.0]);
    assert_eq!(bits(&fake(&xs, GgmlType::Q8_0)), bits(&want));
    // amax 1: d = 1/127 = 0.007874016 (f32), id = 127, so 1 → q = 127; but f16(d) =
    // 1032/131072 = 0.00787353515625, and the value is 127 · f16(d) = 0.99993896484375.
    let xs = block(&[1.0, -0.5]);
    let b = GgmlType::Q8_0.quantize_block(&xs);
    assert_eq!(b.d.to_f32(), 0.00787353515625);
    assert_eq!(&b.codes[..2], &[255, 128 - 64]); // -0.5 · 127 = -63.5 → -64
    assert_eq!(
        &fake(&xs, GgmlType::Q8_0)[..2],
        &[0.99993896484375, -0.50390625]
    );
    // All zero: d = 0, codes 128, values +0.
    let b = GgmlType::Q8_0.quantize_block(&[0.0; 32]);
    assert_eq!((b.d.to_bits(), b.codes), (0, [128; 32]));
}

#[test]
fn q4_1_by_hand() {
    // min -0.5, max 7: d = 7.5/15 = 0.5, id = 2, m = -0.5; code = trunc((x + 0.5)·2 + 0.5):
    // 7 → 15.5 → 15 → 7; 0.25 → 2.0 → 2 (the tie 1.5 goes up) → 0.5; -0.25 → 1.0 → 1 → 0;
    // 0 → 1.5 → 1 → 0; -0.5 → 0 → -0.5.
    let xs = block(&[-0.5, 7.0, 0.25, -0.25]);
    let b = GgmlType::Q4_1.quantize_block(&xs);
    assert_eq!((b.d.to_f32(), b.m.to_f32()), (0.5, -0.5));
    assert_eq!(&b.codes[..5], &[0, 15, 2, 1, 1]);
    let want = block(&[-0.5, 7.0, 0.5, 0.0]);
    assert_eq!(bits(&fake(&xs, GgmlType::Q4_1)), bits(&want));
    // min -0.1, max 1.4 (f32): max - min = 1.5 exactly after rounding, d = 0.1 (f32), id = 10;
    // f16(d) = f16(m) magnitude 0.0999755859375 (1638/16384). 1.4 → 15.5 → 15 → 15·f16(d) +
    // f16(m) = 1.399658203125; 0 → (0.1·10 = 1) + 0.5 → 1 → 0; -0.1 → 0 → -0.0999755859375.
    let xs = block(&[-0.1, 1.4]);
    let b = GgmlType::Q4_1.quantize_block(&xs);
    assert_eq!(
        (b.d.to_f32(), b.m.to_f32()),
        (0.0999755859375, -0.0999755859375)
    );
    assert_eq!(&b.codes[..3], &[0, 15, 1]);
    assert_eq!(
        &fake(&xs, GgmlType::Q4_1)[..3],
        &[-0.0999755859375, 1.399658203125, 0.0]
    );
    // A constant block: d = 0, id = 0, codes 0, every value f16(min).
    let b = GgmlType::Q4_1.quantize_block(&[0.3; 32]);
    assert_eq!(
        (b.d, b.m, b.codes),
        (f16::ZERO, f16::from_f32(0.3), [0; 32])
    );
}

#[test]
fn block_bytes_follow_ggml_layout() {
    // Q4_0: d (f16 LE), then byte j = code j | code (j + 16) << 4.
    let mut xs = block(&[1.0, -2.0]);
    xs[16] = 0.5; // code 10 in the high nibble of byte 0
    let mut out = Vec::new();
    GgmlType::Q4_0.encode(&GgmlType::Q4_0.quantize_block(&xs), &mut out);
    assert_eq!(out.len(), 18);
    assert_eq!(&out[..2], &f16::from_f32(0.25).to_le_bytes());
    assert_eq!(out[2], 12 | (10 << 4));
    assert_eq!(out[3], 0x80); // code 0 low, code 8 high
                              // Q8_0: d, then signed bytes: 127 → 0x7F, -3 → 0xFD.
    let mut out = Vec::new();
    GgmlType::Q8_0.encode(
        &GgmlType::Q8_0.quantize_block(&block(&[127.0, -2.5])),
        &mut out,
    );
    assert_eq!((out.len(), out[2], out[3], out[4]), (34, 0x7F, 0xFD, 0));
    // Q4_1: d, m, codes.
    let mut out = Vec::new();
    GgmlType::Q4_1.encode(
        &GgmlType::Q4_1.quantize_block(&block(&[-0.5, 7.0])),
        &mut out,
    );
    assert_eq!(out.len(), 20);
    assert_eq!(&out[2..4], &f16::from_f32(-0.5).to_le_bytes());
}

#[test]
fn straight_through_gradient_and_dtypes() {
    let xs: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.037).collect();
    let w = Var::from_vec(xs.clone(), (1, 64), &Device::Cpu).unwrap();
    for t in GgmlType::ALL {
        let q = fake_weight(w.as_tensor(), &WeightQuant::ggml(t)).unwrap();
        let g = (q.clone() * 3.0)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gw: Vec<f32> = g.get(&w).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(gw.iter().all(|&v| v == 3.0), "{t:?}: {gw:?}");
        // Same values (up to the sign of zero) as untracked; bf16 weights give the values
        // of their f32 widening, cast back.
        let plain = fake(&xs, t);
        let tracked: Vec<f32> = q.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(tracked, plain, "{t:?}");
        let wb = w.as_tensor().detach().to_dtype(DType::BF16).unwrap();
        let wide: Vec<f32> = wb
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let fb = fake_weight(&wb, &WeightQuant::ggml(t)).unwrap();
        let want = Tensor::from_vec(fake(&wide, t), (1, 64), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        assert_eq!(
            fb.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            want.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
        // The codes dequantize to the same bits.
        let c = quantize_codes(&w.as_tensor().detach(), &WeightQuant::ggml(t)).unwrap();
        assert_eq!(
            bits(&c.dequantize(&WeightQuant::ggml(t)).unwrap()),
            bits(&plain),
            "{t:?}"
        );
    }
}

#[test]
fn names_json_and_shapes() {
    for (name, t, canonical) in [
        ("Q4_0", GgmlType::Q4_0, "Q4_0"),
        ("q4_1a8", GgmlType::Q4_1, "Q4_1A8"),
        ("Q8_0KV8", GgmlType::Q8_0, "Q8_0KV8"),
    ] {
        let s: Scheme = name.parse().unwrap();
        assert_eq!(s.weight, Some(WeightQuant::ggml(t)));
        assert_eq!(s.to_string(), canonical);
        let json = serde_json::to_string(&s).unwrap();
        assert!(
            json.contains(&format!("{{\"kind\":\"{}\"}}", t.name())),
            "{json}"
        );
        assert_eq!(Scheme::from_json_str(&json, "".as_ref()).unwrap(), s);
    }
    for bad in ["Q4", "Q5_0", "Q4_2", "Q4_0G32"] {
        let e = bad.parse::<Scheme>().unwrap_err().to_string();
        assert!(e.contains(&format!("invalid scheme {bad:?}")), "{e}");
    }
    let e = Scheme::from_json_str(
        r#"{"format_version": 1, "weight": {"bits": 4, "format": {"kind": "q4_0", "group_size": 32}}}"#,
        "".as_ref(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("unknown field `group_size`"), "{e}");
    let e = Scheme::from_json_str(
        r#"{"format_version": 1, "weight": {"bits": 3, "format": {"kind": "q8_0"}}}"#,
        "".as_ref(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("weight format q8_0 needs bits 8, found bits 3"),
        "{e}"
    );
    assert_eq!(WeightFormat::Ggml(GgmlType::Q4_0).group_len(64), Ok(32));
    assert_eq!(
        WeightFormat::Ggml(GgmlType::Q4_0).group_len(172).unwrap_err(),
        "Q4_0 block size 32 does not divide in_features 172 (keep the layer unquantized with an override, weight null)"
    );
    let w = Tensor::zeros((2, 48), DType::F32, &Device::Cpu).unwrap();
    let e = fake_weight(&w, &WeightQuant::ggml(GgmlType::Q8_0))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("block size 32 does not divide in_features 48"),
        "{e}"
    );
}

/// Decodes `Q4_0` / `Q8_0` blocks as llama.cpp's `dequantize_row_*` does (independently of
/// `GgmlType::value`): `Q4_0` `(nibble - 8)·d` with code `j` in the low nibble of byte `j` and
/// code `j + 16` in the high nibble; `Q8_0` `q·d` with `q` a signed byte.
fn decode_blocks(bytes: &[u8], t: GgmlType) -> Vec<f32> {
    let mut out = Vec::new();
    for b in bytes.chunks(t.block_bytes()) {
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        match t {
            GgmlType::Q4_0 => {
                let q = |c: u8| (f32::from(c) - 8.0) * d;
                out.extend(b[2..18].iter().map(|&x| q(x & 0x0f)));
                out.extend(b[2..18].iter().map(|&x| q(x >> 4)));
            }
            _ => out.extend(b[2..34].iter().map(|&x| f32::from(x as i8) * d)),
        }
    }
    out
}

/// A symmetric per-channel student (LLM-QAT's weights, any bits) fits llama.cpp's blocks
/// exactly: every block of a row gets the row's f16 scale as `d`. Hand-worked row (4 bits):
/// max|x| = 1, scale = f16(1/7) = 1170·2^-13 = 0.142822265625; 1 → q = rint(7.0017) = 7, code 15;
/// -0.5 → rint(-3.5008) = -4, code 4; 0.25 → rint(1.7504) = 2, code 10; 0 → code 8.
#[test]
fn sym_per_channel_weights_are_q4_0_or_q8_0_blocks_bit_for_bit() {
    let sym = |b: u8| WeightQuant::new(b, WeightFormat::SymPerChannel);
    let row = Tensor::from_vec(block(&[1.0, -0.5, 0.25]), (1, 32), &Device::Cpu).unwrap();
    let codes = quantize_codes(&row, &sym(4)).unwrap();
    let bytes = qat_quant::sym_channel_blocks(&codes, 4).unwrap();
    assert_eq!(qat_quant::sym_channel_type(4), GgmlType::Q4_0);
    assert_eq!(bytes.len(), 18);
    assert_eq!(
        f16::from_le_bytes([bytes[0], bytes[1]]).to_f32(),
        0.142822265625
    );
    // Bytes j = code j | code j+16 << 4; codes 16.. are all 8 (zeros).
    assert_eq!(
        &bytes[2..6],
        &[15 | 8 << 4, 4 | 8 << 4, 10 | 8 << 4, 8 | 8 << 4]
    );
    let values = decode_blocks(&bytes, GgmlType::Q4_0);
    assert_eq!(
        &values[..3],
        &[
            7.0 * 0.142822265625,
            -4.0 * 0.142822265625,
            2.0 * 0.142822265625
        ]
    );

    // Every width 2..=8 on rows of 64 (two blocks, one scale), one of them all zeros.
    let mut w: Vec<f32> = (0..3 * 64)
        .map(|i| ((i * 7919 % 211) as f32 - 105.0) / 97.0)
        .collect();
    w[128..].fill(0.0);
    let tensor = Tensor::from_vec(w, (3, 64), &Device::Cpu).unwrap();
    for b in 2..=8u8 {
        let t = qat_quant::sym_channel_type(b);
        assert_eq!(
            t,
            if b <= 4 {
                GgmlType::Q4_0
            } else {
                GgmlType::Q8_0
            }
        );
        let expected: Vec<f32> = fake_weight(&tensor, &sym(b))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let codes = quantize_codes(&tensor, &sym(b)).unwrap();
        let got = decode_blocks(&qat_quant::sym_channel_blocks(&codes, b).unwrap(), t);
        assert_eq!(bits(&got), bits(&expected), "{b} bits");
    }
}
