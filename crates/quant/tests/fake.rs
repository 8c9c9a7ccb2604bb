//! Hand-worked checks of the fake quantizers: rounding, per-channel / per-token / KV grouping,
//! f16 weight scales, zero rows, error bounds for every bit width, and STE gradients.

use candle_core::{DType, Device, Tensor, Var};
use qat_quant::{
    fake_act, fake_kv, fake_weight, round_half_even, sym_qmax, sym_quant_dequant, sym_quantize,
    KvQuant, ScaleRounding, WeightQuant,
};

fn t2(rows: &[&[f32]]) -> Tensor {
    let cols = rows[0].len();
    let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), cols), &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn round_half_even_matches_torch_round() {
    // Ties go to the even neighbour: 0.5→0, 1.5→2, 2.5→2, -0.5→0, -2.5→-2, 3.5→4, -1.5→-2;
    // non-ties round to nearest: 0.49999997→0, 2.4→2, -2.6→-3, 7.5→8, -7.5→-8.
    let x = [
        0.5f32, 1.5, 2.5, -0.5, -2.5, 3.5, -1.5, 0.49999997, 2.4, -2.6, 7.5, -7.5,
    ];
    let want = [
        0.0f32, 2.0, 2.0, 0.0, -2.0, 4.0, -2.0, 0.0, 2.0, -3.0, 8.0, -8.0,
    ];
    for dtype in [DType::F32, DType::F64] {
        let t = Tensor::new(&x[..], &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        assert_eq!(flat(&round_half_even(&t).unwrap()), want, "{dtype:?}");
    }
}

#[test]
fn w4_per_channel_on_2x4_by_hand() {
    // 4 bits: qmax = 2^3 - 1 = 7. Scales are powers of two, so exact in f16.
    // row 0: max|x| = 1.75 → scale 0.25; x/scale = [7, -2.4, 1.2, 0.4] → q = [7, -2, 1, 0]
    //        → out = [1.75, -0.5, 0.25, 0]
    // row 1: max|x| = 3.5 → scale 0.5; x/scale = [-7, 2, 1.6, -0.4] → q = [-7, 2, 2, 0]
    //        → out = [-3.5, 1.0, 1.0, 0]
    let w = t2(&[&[1.75, -0.6, 0.3, 0.1], &[-3.5, 1.0, 0.8, -0.2]]);
    let want = [1.75f32, -0.5, 0.25, 0.0, -3.5, 1.0, 1.0, 0.0];
    for dtype in [DType::F32, DType::F64] {
        let out = fake_weight(
            &w.to_dtype(dtype).unwrap(),
            &WeightQuant::sym_per_channel(4),
        )
        .unwrap();
        assert_eq!(out.dtype(), dtype);
        assert_eq!(flat(&out), want, "{dtype:?}");
    }
    let (q, scale) = sym_quantize(&w, 4, &[1], ScaleRounding::F16).unwrap();
    assert_eq!(flat(&q), [7.0, -2.0, 1.0, 0.0, -7.0, 2.0, 2.0, 0.0]);
    assert_eq!(scale.dims(), [2, 1]);
    assert_eq!(flat(&scale), [0.25, 0.5]);
}

#[test]
fn weight_scales_are_rounded_to_f16() {
    // Row [1, 0.25] at 4 bits: exact scale 1/7 = 0.142857..., not an f16. Nearest f16:
    // 1/7 = 2^-3 · 1.142857, mantissa 0.142857 · 1024 = 146.29 → 146 → s = (1024+146)/1024/8
    // = 0.142822265625. 1/s = 7.0017 → q 7 → out 7s = 0.999755859375 (not 1);
    // 0.25/s = 1.7504 → q 2 → out 2s = 0.28564453125.
    let s16 = half::f16::from_f32(1.0 / 7.0).to_f32();
    assert_eq!(f64::from(s16), 0.142822265625);
    let w = t2(&[&[1.0, 0.25]]);
    let out = fake_weight(&w, &WeightQuant::sym_per_channel(4)).unwrap();
    assert_eq!(flat(&out), [7.0 * s16, 2.0 * s16]);
    assert_eq!(
        (7.0 * f64::from(s16), 2.0 * f64::from(s16)),
        (0.999755859375, 0.28564453125)
    );
    // Activation scales stay f32: s = fl32(1/7), q = [7, 2], and 7 · s rounds back to exactly 1.
    let act = sym_quant_dequant(&w, 4, &[1], ScaleRounding::Exact).unwrap();
    let s32 = 1.0f32 / 7.0;
    assert_eq!(flat(&act), [7.0 * s32, 2.0 * s32]);
    assert_eq!(7.0 * s32, 1.0);
}

#[test]
fn ties_round_to_even_inside_the_quantizer() {
    // Row [7, 3.5, -2.5, 0.5] at 4 bits: qmax 7, scale 7/7 = 1 (exact in f16);
    // x/scale = [7, 3.5, -2.5, 0.5] → ties to even → q = [7, 4, -2, 0].
    let w = t2(&[&[7.0, 3.5, -2.5, 0.5]]);
    assert_eq!(
        flat(&fake_weight(&w, &WeightQuant::sym_per_channel(4)).unwrap()),
        [7.0, 4.0, -2.0, 0.0]
    );
    assert_eq!(flat(&fake_act(&w, 4).unwrap()), [7.0, 4.0, -2.0, 0.0]);
}

#[test]
fn all_zero_rows_give_zeros_not_nan() {
    // Row 0 is all zero: scale 0 → q 0 → out 0 (no 0/0). Row 1 at 4 bits: max 3.5 → scale 0.5,
    // x/scale = [2, 4, 7] → out [1, 2, 3.5].
    let w = t2(&[&[0.0, 0.0, 0.0], &[1.0, 2.0, 3.5]]);
    let want = [0.0f32, 0.0, 0.0, 1.0, 2.0, 3.5];
    assert_eq!(
        flat(&fake_weight(&w, &WeightQuant::sym_per_channel(4)).unwrap()),
        want
    );
    assert_eq!(flat(&fake_act(&w, 4).unwrap()), want);
    let kv = Tensor::zeros((1, 2, 3, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(flat(&fake_kv(&kv, KvQuant::per_token(4)).unwrap())
        .iter()
        .all(|&v| v == 0.0));
}

#[test]
fn every_bit_width_bounds_error_and_levels_and_is_symmetric() {
    // A deterministic "random-ish" row of 97 values in about [-3, 3].
    let row: Vec<f32> = (0..97)
        .map(|i| ((i as f32 * 1.7).sin() * 3.0 + (i as f32 * 0.37).cos()) * 0.8)
        .collect();
    let x = Tensor::new(row.as_slice(), &Device::Cpu)
        .unwrap()
        .reshape((1, 97))
        .unwrap();
    let neg = x.neg().unwrap();
    for bits in 2..=8u8 {
        let qmax = f32::from(sym_qmax(bits).unwrap());
        assert_eq!(qmax, ((1 << (bits - 1)) - 1) as f32);
        for rounding in [ScaleRounding::Exact, ScaleRounding::F16] {
            let (q, scale) = sym_quantize(&x, bits, &[1], rounding).unwrap();
            let s = flat(&scale)[0];
            let (q, out) = (
                flat(&q),
                flat(&sym_quant_dequant(&x, bits, &[1], rounding).unwrap()),
            );
            for i in 0..row.len() {
                assert!(
                    q[i].fract() == 0.0 && q[i].abs() <= qmax,
                    "bits {bits}: q {}",
                    q[i]
                );
                assert_eq!(out[i], q[i] * s);
                // |x - q·s| ≤ s/2 (+1 ulp-ish slack for the f32 division).
                assert!(
                    (row[i] - out[i]).abs() <= s / 2.0 * (1.0 + 1e-6),
                    "bits {bits} {rounding:?}: x {} out {}",
                    row[i],
                    out[i]
                );
            }
            let mut levels: Vec<i32> = q.iter().map(|&v| v as i32).collect();
            levels.sort_unstable();
            levels.dedup();
            assert!(
                levels.len() < (1 << bits),
                "bits {bits}: {} levels",
                levels.len()
            );
            // The largest magnitude maps to ±qmax.
            assert_eq!(q.iter().fold(0f32, |m, v| m.max(v.abs())), qmax);
            // Symmetric: quant(-x) = -quant(x).
            let out_neg = flat(&sym_quant_dequant(&neg, bits, &[1], rounding).unwrap());
            assert!(
                out.iter().zip(&out_neg).all(|(a, b)| *a == -*b),
                "bits {bits} not symmetric"
            );
        }
    }
    assert!(sym_qmax(1).is_err() && sym_qmax(9).is_err());
    assert!(fake_act(&x, 9)
        .unwrap_err()
        .to_string()
        .contains("bits 9 out of range 2..=8"));
}

#[test]
fn activations_are_quantized_per_token() {
    // [2, 3, 4] at 3 bits (qmax 3); each token (last dim) has its own scale = max|x| / 3:
    // (0,0) [3, 1, -2, 0.4]       s 1    → q [3, 1, -2, 0]    → [3, 1, -2, 0]
    // (0,1) [0.75, -0.5, 0.25, 0.1] s 0.25 → q [3, -2, 1, 0] → [0.75, -0.5, 0.25, 0]
    // (0,2) zeros                  s 0    → zeros
    // (1,0) [-6, 2.5, 1, 5]        s 2    → x/s [-3, 1.25, 0.5, 2.5] → q [-3, 1, 0, 2] → [-6, 2, 0, 4]
    // (1,1) [1.5; 4]               s 0.5  → q 3 → [1.5; 4]
    // (1,2) [0.5, 12, -4, 3]       s 4    → x/s [0.125, 3, -1, 0.75] → q [0, 3, -1, 1] → [0, 12, -4, 4]
    let x: Vec<f32> = vec![
        3.0, 1.0, -2.0, 0.4, 0.75, -0.5, 0.25, 0.1, 0.0, 0.0, 0.0, 0.0, //
        -6.0, 2.5, 1.0, 5.0, 1.5, 1.5, 1.5, 1.5, 0.5, 12.0, -4.0, 3.0,
    ];
    let want: Vec<f32> = vec![
        3.0, 1.0, -2.0, 0.0, 0.75, -0.5, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0, //
        -6.0, 2.0, 0.0, 4.0, 1.5, 1.5, 1.5, 1.5, 0.0, 12.0, -4.0, 4.0,
    ];
    let x = Tensor::from_vec(x, (2, 3, 4), &Device::Cpu).unwrap();
    for dtype in [DType::F32, DType::F64] {
        let out = fake_act(&x.to_dtype(dtype).unwrap(), 3).unwrap();
        assert_eq!(out.dims(), [2, 3, 4]);
        assert_eq!(flat(&out), want, "{dtype:?}");
    }
}

#[test]
fn kv_is_quantized_per_batch_and_position_over_all_heads() {
    // x: [b=2, h=2, t=2, d=2] at 3 bits (qmax 3); one scale per (b, t) over both heads × d:
    // (b0,t0): h0 [3, 1], h1 [0.5, 0.25] → max 3, s 1 → h0 [3, 1], h1 round([0.5, 0.25]) = [0, 0]
    //          (per-head scales would have kept h1 ≈ [0.5, 0.33]: grouping spans heads)
    // (b0,t1): h0 [0, 0], h1 [-1.5, 0.75] → s 0.5 → q h1 [-3, round(1.5) = 2] → [-1.5, 1]
    // (b1,t0): h0 [6, -6], h1 [2, 1] → s 2 → q h0 [3, -3], h1 [1, round(0.5) = 0] → [6, -6], [2, 0]
    // (b1,t1): all zero → zeros
    // Layout [b][h][t][d]:
    let x: Vec<f32> = vec![
        3.0, 1.0, 0.0, 0.0, /* b0 h0 t0,t1 */ 0.5, 0.25, -1.5, 0.75, /* b0 h1 */
        6.0, -6.0, 0.0, 0.0, /* b1 h0 */ 2.0, 1.0, 0.0, 0.0, /* b1 h1 */
    ];
    let want: Vec<f32> = vec![
        3.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.5, 1.0, 6.0, -6.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0,
    ];
    let x = Tensor::from_vec(x, (2, 2, 2, 2), &Device::Cpu).unwrap();
    assert_eq!(flat(&fake_kv(&x, KvQuant::per_token(3)).unwrap()), want);
    let (_, scale) = sym_quantize(&x, 3, &[1, 3], ScaleRounding::Exact).unwrap();
    assert_eq!(scale.dims(), [2, 1, 2, 1]);
    assert_eq!(flat(&scale), [1.0, 0.5, 2.0, 0.0]);
    assert!(fake_kv(&x.reshape((4, 4)).unwrap(), KvQuant::per_token(3)).is_err());
}

#[test]
fn kv_per_head_has_one_scale_per_position_and_head() {
    // x: [b=1, h=2, t=2, d=2] at 3 bits (qmax 3); one scale per (head, position) over d:
    // h0 t0 [3, 1]      → s 1   → [3, 1]
    // h0 t1 [0, 0]      → s 0   → [0, 0]
    // h1 t0 [1.5, 0.75] → s 0.5 → q [3, round(1.5) = 2 (tie to even)] → [1.5, 1]
    // h1 t1 [-6, 2.5]   → s 2   → q [-3, round(1.25) = 1] → [-6, 2]
    // (per token, h1 t0 would share h0's scale 1: [round(1.5) = 2, round(0.75) = 1])
    let x: Vec<f32> = vec![3.0, 1.0, 0.0, 0.0, 1.5, 0.75, -6.0, 2.5];
    let x = Tensor::from_vec(x, (1, 2, 2, 2), &Device::Cpu).unwrap();
    // f32/f64 take the fused CPU kernel, f16/bf16 the composed ops (every value is exact in both).
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        let out = fake_kv(&x.to_dtype(dtype).unwrap(), KvQuant::per_head(3)).unwrap();
        assert_eq!(
            flat(&out),
            [3.0, 1.0, 0.0, 0.0, 1.5, 1.0, -6.0, 2.0],
            "{dtype:?}"
        );
    }
    assert_eq!(
        flat(&fake_kv(&x, KvQuant::per_token(3)).unwrap()),
        [3.0, 1.0, 0.0, 0.0, 2.0, 1.0, -6.0, 2.0]
    );
    let (_, scale) = sym_quantize(&x, 3, &[3], ScaleRounding::Exact).unwrap();
    assert_eq!(flat(&scale), [1.0, 0.0, 0.5, 2.0]);
    assert!(fake_kv(&x.reshape((2, 4)).unwrap(), KvQuant::per_head(3)).is_err());
}

#[test]
fn ste_gradient_is_identity_and_value_is_exact() {
    // loss = sum(fake(x) · c) → d loss / d x = c exactly (STE), while fake(x) == quant(x) bit for bit.
    for dtype in [DType::F32, DType::F64] {
        let dev = Device::Cpu;
        let data: Vec<f64> = (0..24).map(|i| ((i as f64) * 0.731).sin() * 2.0).collect();
        let cdat: Vec<f64> = (0..24).map(|i| (i as f64) * 0.25 - 3.0).collect();
        let x = Var::from_tensor(
            &Tensor::from_vec(data, (2, 3, 4), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let c = Tensor::from_vec(cdat, (2, 3, 4), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let w2 = x.as_tensor().reshape((6, 4)).unwrap();
        let cases: [(&str, Tensor, Tensor); 4] = [
            (
                "act",
                fake_act(x.as_tensor(), 4).unwrap(),
                sym_quant_dequant(x.as_tensor(), 4, &[2], ScaleRounding::Exact).unwrap(),
            ),
            (
                "weight",
                fake_weight(&w2, &WeightQuant::sym_per_channel(3))
                    .unwrap()
                    .reshape((2, 3, 4))
                    .unwrap(),
                sym_quant_dequant(&w2, 3, &[1], ScaleRounding::F16)
                    .unwrap()
                    .reshape((2, 3, 4))
                    .unwrap(),
            ),
            (
                "kv",
                fake_kv(
                    &x.as_tensor().reshape((1, 2, 3, 4)).unwrap(),
                    KvQuant::per_token(2),
                )
                .unwrap()
                .reshape((2, 3, 4))
                .unwrap(),
                sym_quant_dequant(
                    &x.as_tensor().reshape((1, 2, 3, 4)).unwrap(),
                    2,
                    &[1, 3],
                    ScaleRounding::Exact,
                )
                .unwrap()
                .reshape((2, 3, 4))
                .unwrap(),
            ),
            (
                "kv per head",
                fake_kv(
                    &x.as_tensor().reshape((1, 2, 3, 4)).unwrap(),
                    KvQuant::per_head(2),
                )
                .unwrap()
                .reshape((2, 3, 4))
                .unwrap(),
                sym_quant_dequant(x.as_tensor(), 2, &[2], ScaleRounding::Exact).unwrap(),
            ),
        ];
        for (name, fake, value) in cases {
            assert_eq!(
                flat(&fake),
                flat(&value),
                "{name} {dtype:?}: value must be exactly the quantized one"
            );
            assert_ne!(
                flat(&fake),
                flat(x.as_tensor()),
                "{name}: quantization should change something"
            );
            let loss = (fake * &c).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let g = grads.get(x.as_tensor()).expect("gradient reaches x");
            assert_eq!(
                flat(g),
                flat(&c),
                "{name} {dtype:?}: gradient must be the identity"
            );
        }
    }
}

#[test]
fn half_precision_inputs_are_quantized_in_f32_and_cast_back() {
    // Same hand-worked row as the ties test; f16/bf16 represent every value exactly.
    for dtype in [DType::F16, DType::BF16] {
        let w = t2(&[&[7.0, 3.5, -2.5, 0.5]]).to_dtype(dtype).unwrap();
        let out = fake_weight(&w, &WeightQuant::sym_per_channel(4)).unwrap();
        assert_eq!(out.dtype(), dtype);
        assert_eq!(flat(&out), [7.0, 4.0, -2.0, 0.0]);
    }
    let ints = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
    assert!(fake_act(&ints, 4)
        .unwrap_err()
        .to_string()
        .contains("expected a float dtype"));
}
