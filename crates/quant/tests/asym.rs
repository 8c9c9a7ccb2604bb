//! Hand-worked checks of the `asym_group` weight quantizer (BitDistiller's asymmetric MinMax per
//! group): scales, zero points, ties, clamping, degenerate groups, f16 scales, every bit width,
//! and its two gradients (`minmax` against a hand derivation in f64, `ste` = identity).
//!
//! Reference computation (BitDistiller `quantization/quantizer.py`, `pseudo_quantize_tensor` and
//! `SteInt2AsymQuantizer`), per group with `max_int = 2^bits - 1`:
//! `scales = (max - min).clamp(min=1e-5) / max_int; zeros = (-round(min / scales)).clamp(0, max_int);
//! w = (clamp(round(w / scales) + zeros, 0, max_int) - zeros) * scales`, with qat's f16 scale.

// The expected values are written as exact decimal expansions of f32/f16 values.
#![allow(clippy::excessive_precision)]

use candle_core::{DType, Device, Tensor, Var};
use half::f16;
use qat_quant::{asym_max_int, fake_weight, WeightGrad, WeightQuant};

fn t2(rows: &[&[f64]]) -> Tensor {
    let cols = rows[0].len();
    let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), cols), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn asym(bits: u8, group: Option<usize>) -> WeightQuant {
    WeightQuant::asym_group(bits, group)
}

#[test]
fn groups_of_four_at_four_bits_by_hand() {
    // max_int 15. Row 0, group 0: [-0.25, 0.1, 0.3, 3.5]: range 3.75, scale 3.75/15 = 0.25 (exact
    //   in f16); zero = -round(-0.25/0.25) = 1; w/s = [-1, 0.4, 1.2, 14] → round + 1 = [0, 1, 2, 15]
    //   → (code - 1)·0.25 = [-0.25, 0, 0.25, 3.5].
    // Row 0, group 1: all zero: range clamps to 1e-5, scale f16(1e-5/15) = 11·2^-24 (subnormal:
    //   6.67e-7 / 2^-24 = 11.18 → 11); zero = 0, codes 0 → zeros.
    // Row 1, group 0: constant 0.3 (min = max): same scale 11·2^-24; zero = clamp(-round(0.3/s)) = 0;
    //   code = clamp(round(0.3/s) ≈ 457572, 0, 15) = 15 → 15·11·2^-24 = 165·2^-24 ≈ 9.83e-6
    //   (BitDistiller maps a constant group to ~1e-5 · sign: its range clamp, kept as is).
    // Row 1, group 1: [-1.5, -0.75, 0.375, 2.25]: range 3.75, scale 0.25; zero = -round(-6) = 6;
    //   w/s = [-6, -3, 1.5, 9] → round (1.5 → 2, ties to even) + 6 = [0, 3, 8, 15]
    //   → [-1.5, -0.75, 0.5, 2.25].
    let w = t2(&[
        &[-0.25, 0.1, 0.3, 3.5, 0.0, 0.0, 0.0, 0.0],
        &[0.3, 0.3, 0.3, 0.3, -1.5, -0.75, 0.375, 2.25],
    ]);
    let c = (165.0 * 2f64.powi(-24)) as f32;
    let want = [
        -0.25, 0.0, 0.25, 3.5, 0.0, 0.0, 0.0, 0.0, c, c, c, c, -1.5, -0.75, 0.5, 2.25,
    ];
    for dtype in [DType::F32, DType::F64] {
        let out = fake_weight(&w.to_dtype(dtype).unwrap(), &asym(4, Some(4))).unwrap();
        assert_eq!(out.dtype(), dtype);
        assert_eq!(flat(&out), want, "{dtype:?}");
    }
    assert_eq!(
        f16::from_f32(1e-5 / 15.0).to_f64(),
        11.0 * 2f64.powi(-24),
        "scale of a constant group"
    );
    // A constant negative group mirrors it: zero = 15, code 0 → (0 - 15)·s.
    let neg = fake_weight(&t2(&[&[-0.3; 4]]), &asym(4, Some(4))).unwrap();
    assert_eq!(flat(&neg), [-c; 4]);
}

#[test]
fn two_bits_ties_and_clamping_by_hand() {
    // max_int 3; every group below has range 3 → scale 1.
    // [-1, -0.2, 0.5, 2]: zero = -round(-1) = 1; round(w) + 1 = [0, 1, 1 (0.5 → 0, tie to even), 3]
    //   → [-1, 0, 0, 2] (BitDistiller's training `Round` rounds 0.5 away from zero: 1; torch.round,
    //   used by its `pseudo_quantize_tensor` and by qat, gives 0).
    // [-2.5, 0.5, 0, 0]: the zero point ties: -round(-2.5) = 2; round(w) + 2 = [0, 2, 2, 2]
    //   → [-2, 0, 0, 0].
    // [-1.5, 1.5, 0, 0]: zero = -round(-1.5) = 2; round(1.5) + 2 = 4 > 3 → clamped to 3
    //   → [-2, 1, 0, 0]: the maximum itself is clamped.
    let w = t2(&[&[
        -1.0, -0.2, 0.5, 2.0, -2.5, 0.5, 0.0, 0.0, -1.5, 1.5, 0.0, 0.0,
    ]]);
    let out = fake_weight(&w, &asym(2, Some(4))).unwrap();
    assert_eq!(
        flat(&out),
        [-1.0, 0.0, 0.0, 2.0, -2.0, 0.0, 0.0, 0.0, -2.0, 1.0, 0.0, 0.0]
    );
    // Per output channel (group_size null) is one group per row.
    let row = t2(&[&[-1.0, -0.2, 0.5, 2.0]]);
    assert_eq!(
        flat(&fake_weight(&row, &asym(2, None)).unwrap()),
        [-1.0, 0.0, 0.0, 2.0]
    );
}

#[test]
fn three_bit_ties_and_eight_bit_f16_scale_by_hand() {
    // 3 bits, max_int 7: [0, 1.5, 2.5, 7]: range 7, scale 1, zero = -round(0) = 0;
    //   round: 1.5 → 2, 2.5 → 2 (ties to even) → [0, 2, 2, 7].
    let w = t2(&[&[0.0, 1.5, 2.5, 7.0]]);
    assert_eq!(
        flat(&fake_weight(&w, &asym(3, None)).unwrap()),
        [0.0, 2.0, 2.0, 7.0]
    );
    // 8 bits, max_int 255: [0, 0.5, 1]: scale 1/255 = 2^-8·1.00392 → f16 mantissa
    //   round(0.00392·1024 = 4.016) = 4 → s = 1028·2^-18 = 257·2^-16; zero 0;
    //   0.5/s = 127.502 → 128 → 128·257·2^-16 = 0.501953125; 1/s = 255.004 → 255
    //   → 255·257·2^-16 = 65535·2^-16 = 0.9999847412109375 (not 1: the scale is f16).
    let s = f16::from_f32(1.0 / 255.0).to_f64();
    assert_eq!(s, 257.0 * 2f64.powi(-16));
    let w = t2(&[&[0.0, 0.5, 1.0]]);
    assert_eq!(
        flat(&fake_weight(&w, &asym(8, None)).unwrap()),
        [0.0, 0.501953125, 0.9999847412109375]
    );
}

#[test]
fn every_bit_width_bounds_error_and_uses_the_range() {
    // A deterministic row of 64 values in about [-2.5, 3.3], groups of 16.
    let row: Vec<f64> = (0..64)
        .map(|i| (i as f64 * 1.3).sin() * 2.4 + (i as f64 * 0.21).cos() * 0.9)
        .collect();
    let w = t2(&[&row]);
    for bits in 2..=8u8 {
        let m = f64::from(asym_max_int(bits).unwrap());
        assert_eq!(m, f64::from((1u16 << bits) - 1));
        let out = flat(&fake_weight(&w, &asym(bits, Some(16))).unwrap());
        for (g, (xs, qs)) in row.chunks(16).zip(out.chunks(16)).enumerate() {
            let (mx, mn) = xs.iter().fold((f64::MIN, f64::MAX), |(a, b), &x| {
                (a.max(x as f32 as f64), b.min(x as f32 as f64))
            });
            let s = f16::from_f64((mx - mn) / m).to_f64();
            let mut levels: Vec<i64> = Vec::new();
            for (&x, &q) in xs.iter().zip(qs) {
                let x = x as f32 as f64;
                // Inside the range, the error is at most s/2 (+ the zero point's rounding,
                // which shifts the grid by less than s/2 and is absorbed by the clamp at the ends).
                assert!(
                    (x - f64::from(q)).abs() <= s * (1.0 + 1e-3),
                    "bits {bits} group {g}"
                );
                levels.push((f64::from(q) / s).round() as i64);
            }
            levels.sort_unstable();
            levels.dedup();
            assert!(
                levels.len() <= (1 << bits),
                "bits {bits}: {} levels",
                levels.len()
            );
            // The group's ends map to within one step of themselves: the grid spans the range.
            let (qmx, qmn) = qs
                .iter()
                .fold((f32::MIN, f32::MAX), |(a, b), &q| (a.max(q), b.min(q)));
            assert!((f64::from(qmx) - mx).abs() <= s && (f64::from(qmn) - mn).abs() <= s);
        }
    }
    assert!(asym_max_int(1).is_err() && asym_max_int(9).is_err());
}

#[test]
fn a_group_size_that_does_not_divide_in_is_an_error() {
    let w = Tensor::zeros((2, 12), DType::F32, &Device::Cpu).unwrap();
    let e = fake_weight(&w, &asym(4, Some(8))).unwrap_err().to_string();
    assert!(
        e.contains("weight [2, 12] with format asym_group (group_size 8): group size 8 does not divide in_features 12"),
        "{e}"
    );
    let e = fake_weight(&w, &asym(9, Some(4))).unwrap_err().to_string();
    assert!(e.contains("weight bits 9 out of range 2..=8"), "{e}");
    let e = fake_weight(&w, &asym(4, Some(0))).unwrap_err().to_string();
    assert!(e.contains("group_size 0"), "{e}");
}

/// The gradient of `Σ c_j · ŵ_j` with respect to one group `x` under BitDistiller's formula, by
/// the chain rule in f64: `ŵ_j = (clamp(R(x_j/s) + z, 0, M) - z)·s` with R straight-through, the
/// clamp passing gradient on `[0, M]` (torch), `z` constant (torch.round), `s = max(max - min,
/// 1e-5)/M` (clamp passing gradient where `max - min >= 1e-5`), and amax/amin sharing their
/// gradient evenly between tied elements. The scale's f16 rounding is passed straight through.
fn minmax_grad_reference(x: &[f64], bits: u8, c: &[f64]) -> Vec<f64> {
    let m = f64::from((1u16 << bits) - 1);
    let mx = x.iter().copied().fold(f64::MIN, f64::max);
    let mn = x.iter().copied().fold(f64::MAX, f64::min);
    let range_ok = if mx - mn >= 1e-5 { 1.0 } else { 0.0 };
    let s = f16::from_f64(((mx - mn).max(1e-5) / m).min(65504.0)).to_f64();
    let z = (-(mn / s).round_ties_even()).clamp(0.0, m);
    let mut d_s = 0.0; // ∂L/∂s
    let mut direct = vec![0.0; x.len()];
    for j in 0..x.len() {
        let v = (x[j] / s).round_ties_even() + z;
        let inside = if (0.0..=m).contains(&v) { 1.0 } else { 0.0 };
        let code = v.clamp(0.0, m);
        // ∂ŵ_j/∂x_j = inside · (1/s) · s;  ∂ŵ_j/∂s = inside · (-x_j/s²) · s + (code - z)
        direct[j] = c[j] * inside * (1.0 / s) * s;
        d_s += c[j] * (inside * (-x[j] / (s * s)) * s + (code - z));
    }
    let n_max = x.iter().filter(|&&v| v == mx).count() as f64;
    let n_min = x.iter().filter(|&&v| v == mn).count() as f64;
    (0..x.len())
        .map(|i| {
            let d_max = if x[i] == mx { 1.0 / n_max } else { 0.0 };
            let d_min = if x[i] == mn { 1.0 / n_min } else { 0.0 };
            direct[i] + d_s * range_ok / m * (d_max - d_min)
        })
        .collect()
}

fn grad_of(
    w: &[f64],
    rows: usize,
    wq: &WeightQuant,
    c: &[f64],
    dtype: DType,
) -> (Vec<f32>, Vec<f64>) {
    let dev = Device::Cpu;
    let cols = w.len() / rows;
    let t = Tensor::from_vec(w.to_vec(), (rows, cols), &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let var = Var::from_tensor(&t).unwrap();
    let out = fake_weight(var.as_tensor(), wq).unwrap();
    let ct = Tensor::from_vec(c.to_vec(), (rows, cols), &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let grads = (&out * &ct).unwrap().sum_all().unwrap().backward().unwrap();
    let g = grads.get(var.as_tensor()).expect("gradient reaches w");
    let g: Vec<f64> = g
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    (flat(&out), g)
}

#[test]
fn minmax_gradient_by_hand() {
    // One group, 2 bits (M = 3): x = [-1.5, 1.5, 0.2, -0.7], range 3 → s = 1, zero = 2;
    // round(x) + 2 = [0, 4, 2, 1] → inside [1, 0, 1, 1]; codes [0, 3, 2, 1]; ŵ = [-2, 1, 0, -1].
    // ∂ŵ_j/∂s = (code_j - z) - inside_j·x_j/s = [-2 + 1.5, 1 - 0, 0 - 0.2, -1 + 0.7]
    //         = [-0.5, 1, -0.2, -0.3]; ∂s/∂x = [-1/3, 1/3, 0, 0] (min, max).
    // With c = [1, 2, 3, 4]: ∂L/∂s = -0.5 + 2 - 0.6 - 1.2 = -0.3, so
    // ∂L/∂x = c·inside + (-0.3)·∂s/∂x = [1 + 0.1, 0 - 0.1, 3, 4] = [1.1, -0.1, 3, 4].
    let x = [-1.5, 1.5, 0.2, -0.7];
    let c = [1.0, 2.0, 3.0, 4.0];
    for dtype in [DType::F64, DType::F32] {
        let (value, g) = grad_of(&x, 1, &asym(2, None), &c, dtype);
        assert_eq!(value, [-2.0, 1.0, 0.0, -1.0], "{dtype:?}");
        let tol = if dtype == DType::F64 { 1e-12 } else { 1e-6 };
        for (got, want) in g.iter().zip([1.1, -0.1, 3.0, 4.0]) {
            assert!((got - want).abs() < tol, "{dtype:?}: {g:?}");
        }
    }
    // The same with "grad": "ste" is the identity.
    let (_, g) = grad_of(
        &x,
        1,
        &asym(2, None).with_grad(WeightGrad::Ste),
        &c,
        DType::F64,
    );
    assert_eq!(g, c);
}

#[test]
fn minmax_gradient_matches_the_chain_rule_on_many_groups() {
    // 3 rows × 32 inputs, groups of 8, with ties in the max and min, a constant group (range
    // below 1e-5: no scale gradient, and everything clamped), and an all-zero group.
    let mut w: Vec<f64> = (0..96)
        .map(|i| (i as f64 * 0.917).sin() * 1.7 + (i as f64 * 0.31).cos() * 0.6)
        .collect();
    w[3] = w[1].max(w[2]).max(w[0]) + 0.5; // a unique max ...
    w[5] = w[3]; // ... tied
    w[8..16].iter_mut().for_each(|v| *v = 0.42); // constant group
    w[16..24].iter_mut().for_each(|v| *v = 0.0); // zero group
    w[30] = -3.0;
    w[31] = -3.0; // tied min
    let c: Vec<f64> = (0..96).map(|i| ((i as f64) * 0.53).cos() - 0.2).collect();
    for bits in [2u8, 3, 4, 8] {
        let wq = asym(bits, Some(8));
        let (value, g) = grad_of(&w, 3, &wq, &c, DType::F64);
        // Forward: bit-identical to the untracked value.
        let plain = Tensor::from_vec(w.clone(), (3, 32), &Device::Cpu).unwrap();
        let plain: Vec<f64> = fake_weight(&plain, &wq)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(value, plain.iter().map(|&v| v as f32).collect::<Vec<_>>());
        for gi in 0..12 {
            let r = gi * 8..gi * 8 + 8;
            let want = minmax_grad_reference(&w[r.clone()], bits, &c[r.clone()]);
            for (k, (got, want)) in g[r].iter().zip(&want).enumerate() {
                assert!(
                    (got - want).abs() <= 1e-9 * (1.0 + want.abs()),
                    "bits {bits} group {gi} element {k}: {got} vs {want}"
                );
            }
        }
        // The constant group's elements are all clamped (round(0.42/s) ≫ M): no gradient at all.
        assert!(
            g[8..16].iter().all(|&v| v == 0.0),
            "bits {bits}: {:?}",
            &g[8..16]
        );
    }
}

#[test]
fn tracked_values_equal_inference_values_bit_for_bit() {
    // value + (sur - detach(sur)) must not move the forward value, in f32 too; zeros are +0.
    let w: Vec<f64> = (0..64).map(|i| ((i as f64) * 0.77).sin() * 0.05).collect();
    for bits in 2..=8u8 {
        for grad in [WeightGrad::MinMax, WeightGrad::Ste] {
            let wq = asym(bits, Some(16)).with_grad(grad);
            let (tracked, _) = grad_of(&w, 2, &wq, &[1.0; 64], DType::F32);
            let plain = fake_weight(&t2(&[&w[..32], &w[32..]]), &wq).unwrap();
            let bits_of = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits_of(&tracked),
                bits_of(&flat(&plain)),
                "bits {bits} {grad:?}"
            );
            assert!(tracked.iter().all(|v| v.to_bits() != (-0.0f32).to_bits()));
        }
    }
}
