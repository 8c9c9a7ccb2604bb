//! Hand-worked checks of the NormalFloat weight formats: NF3 (BitDistiller's n2f3, per-sign
//! scales) and NF4 (QLoRA, absmax), including values exactly at the decision thresholds, f16
//! scales, degenerate groups, the bits they require, and their straight-through gradient.

// The expected values are written as exact decimal expansions of f32 values.
#![allow(clippy::excessive_precision)]

use candle_core::{DType, Device, Tensor, Var};
use half::f16;
use qat_quant::{
    fake_weight, NfGrid, WeightGrad, WeightQuant, NF3_LEVELS, NF3_THRESHOLDS, NF4_LEVELS,
    NF4_THRESHOLDS,
};

fn row(xs: &[f32]) -> Tensor {
    Tensor::from_vec(xs.to_vec(), (1, xs.len()), &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The next f32 towards +∞ / -∞ (for finite non-zero x).
fn up(x: f32) -> f32 {
    f32::from_bits(if x > 0.0 {
        x.to_bits() + 1
    } else {
        x.to_bits() - 1
    })
}
fn down(x: f32) -> f32 {
    f32::from_bits(if x > 0.0 {
        x.to_bits() - 1
    } else {
        x.to_bits() + 1
    })
}

/// BitDistiller `quantization/quantizer.py`, `SteN2F3Quantizer.round_n2f3`: levels and the
/// thresholds it compares with (`q_pos >= 0.8114928305149078` → 1.0, ...).
const BITDISTILLER_NF3_LEVELS: [&str; 8] = [
    "-1.0",
    "-0.5350227355957031",
    "-0.2469314038753510",
    "0",
    "0.1833375245332718",
    "0.3819939494132996",
    "0.6229856610298157",
    "1.0",
];
const BITDISTILLER_NF3_THRESHOLDS: [&str; 7] = [
    "-0.7675113677978516",
    "-0.39097706973552704",
    "-0.1234657019376755",
    "0.0916687622666359",
    "0.2826657369732857",
    "0.5024898052215576",
    "0.8114928305149078",
];
/// bitsandbytes `csrc/kernels.cu`: `dDequantizeNF4` levels and `dQuantizeNF4` thresholds.
const BNB_NF4_LEVELS: [&str; 16] = [
    "-1.0",
    "-0.6961928009986877",
    "-0.5250730514526367",
    "-0.39491748809814453",
    "-0.28444138169288635",
    "-0.18477343022823334",
    "-0.09105003625154495",
    "0.0",
    "0.07958029955625534",
    "0.16093020141124725",
    "0.24611230194568634",
    "0.33791524171829224",
    "0.44070982933044434",
    "0.5626170039176941",
    "0.7229568362236023",
    "1.0",
];
const BNB_NF4_THRESHOLDS: [&str; 15] = [
    "-0.8480964004993439",
    "-0.6106329262256622",
    "-0.4599952697753906",
    "-0.33967943489551544",
    "-0.23460740596055984",
    "-0.13791173323988914",
    "-0.045525018125772476",
    "0.03979014977812767",
    "0.1202552504837513",
    "0.2035212516784668",
    "0.2920137718319893",
    "0.3893125355243683",
    "0.5016634166240692",
    "0.6427869200706482",
    "0.8614784181118011",
];

#[test]
fn grids_are_the_references_values() {
    // PyTorch: Python float (f64) → float32.
    let torch = |s: &&str| s.parse::<f64>().unwrap() as f32;
    // C `float` literal: the decimal rounded to f32 directly (Rust's f32 parsing does the same).
    let c_float = |s: &&str| s.parse::<f32>().unwrap();
    assert_eq!(NF3_LEVELS, BITDISTILLER_NF3_LEVELS.map(|s| torch(&s)));
    assert_eq!(
        NF3_THRESHOLDS,
        BITDISTILLER_NF3_THRESHOLDS.map(|s| torch(&s))
    );
    assert_eq!(NF4_LEVELS, BNB_NF4_LEVELS.map(|s| c_float(&s)));
    assert_eq!(NF4_THRESHOLDS, BNB_NF4_THRESHOLDS.map(|s| c_float(&s)));
    // The two roundings differ for some NF4 thresholds: the f64 of 0.8614784181118011 is exactly
    // halfway between two f32 (ties to even picks the upper one), while the decimal itself lies
    // just below that midpoint, so the C literal is the lower one.
    assert_eq!(f64::from(NF4_THRESHOLDS[14]), 0.861478388309478759765625);
    assert_eq!(
        f64::from(torch(&BNB_NF4_THRESHOLDS[14])),
        0.86147844791412353515625
    );
    // Thresholds are the midpoints of consecutive levels and lie strictly between them.
    for (k, t) in NF3_THRESHOLDS.iter().enumerate() {
        let mid = (f64::from(NF3_LEVELS[k]) + f64::from(NF3_LEVELS[k + 1])) / 2.0;
        assert_eq!(*t, mid as f32, "NF3 threshold {k}");
    }
    for (k, t) in NF4_THRESHOLDS.iter().enumerate() {
        let mid = (f64::from(NF4_LEVELS[k]) + f64::from(NF4_LEVELS[k + 1])) / 2.0;
        assert!((f64::from(*t) - mid).abs() <= 6e-8, "NF4 threshold {k}");
        assert!(
            NF4_LEVELS[k] < *t && *t < NF4_LEVELS[k + 1],
            "NF4 threshold {k}"
        );
    }
}

#[test]
fn nf3_scales_positive_and_negative_weights_separately() {
    // One group: max 4 → positive scale 4, min -2 → negative scale 2 (both exact in f16).
    // u = x/s: -2/2 = -1 → level 0 (-1)            → -2
    //          -1/2 = -0.5 ∈ [-0.7675, -0.3910) → -0.5350227355957031 → ·2
    //          -0.25/2 = -0.125 < -0.1234657      → -0.2469314038753510 → ·2
    //          0 → 0; 0.5/4 = 0.125 ∈ [0.0917, 0.2827) → 0.1833375245332718 → ·4
    //          1/4 = 0.25 → same level → ·4; 2/4 = 0.5 ∈ [0.2827, 0.5025) → 0.3819939494132996 → ·4
    //          4/4 = 1 → 1 → 4
    let x = [-2.0, -1.0, -0.25, 0.0, 0.5, 1.0, 2.0, 4.0];
    let l = NF3_LEVELS;
    let want = [
        -2.0,
        l[1] * 2.0,
        l[2] * 2.0,
        0.0,
        l[4] * 4.0,
        l[4] * 4.0,
        l[5] * 4.0,
        4.0,
    ];
    for dtype in [DType::F32, DType::F64] {
        let w = row(&x).to_dtype(dtype).unwrap();
        let out = fake_weight(&w, &WeightQuant::nf3(None)).unwrap();
        assert_eq!(out.dtype(), dtype);
        assert_eq!(flat(&out), want, "{dtype:?}");
    }
    // Groups of 4: [-2, -1, -0.25, 0] has max 0 → positive scale 0 (BitDistiller divides 0 by 0
    // here and gets NaN; qat gives 0) and |min| 2; [0.5, 1, 2, 4] has min 0.5 → its negative scale
    // 0.5 is stored but unused.
    let out = fake_weight(&row(&x), &WeightQuant::nf3(Some(4))).unwrap();
    assert_eq!(flat(&out), want);
}

#[test]
fn nf3_values_at_thresholds_take_the_upper_level() {
    // BitDistiller (quantizer.py, round_n2f3):
    //   q_pos >= 0.8114928305149078 → 1.0;  [0.5024898052215576, 0.8114928305149078) → 0.6229856610298157
    //   [0.2826657369732857, 0.5024898052215576) → 0.3819939494132996
    //   [0.0916687622666359, 0.2826657369732857) → 0.1833375245332718;  < 0.0916687622666359 → 0
    //   q_neg >= -0.1234657019376755 → 0;  [-0.39097706973552704, -0.1234657019376755) → -0.2469314038753510
    //   [-0.7675113677978516, -0.39097706973552704) → -0.5350227355957031;  < -0.7675113677978516 → -1
    // With max 1 and min -1 both scales are 1, so u = x: a value exactly at threshold k takes
    // level k + 1, the f32 just below it level k.
    let mut at = vec![-1.0f32];
    at.extend(NF3_THRESHOLDS);
    at.push(1.0);
    let mut want = vec![NF3_LEVELS[0]];
    want.extend(&NF3_LEVELS[1..]);
    want.push(1.0);
    assert_eq!(
        flat(&fake_weight(&row(&at), &WeightQuant::nf3(None)).unwrap()),
        want
    );
    let mut below = vec![-1.0f32];
    below.extend(NF3_THRESHOLDS.map(down));
    below.push(1.0);
    let mut want = vec![NF3_LEVELS[0]];
    want.extend(&NF3_LEVELS[..7]);
    want.push(1.0);
    assert_eq!(
        flat(&fake_weight(&row(&below), &WeightQuant::nf3(None)).unwrap()),
        want
    );
    for (k, t) in NF3_THRESHOLDS.iter().enumerate() {
        assert_eq!(NfGrid::Nf3.index(*t), k as u8 + 1);
        assert_eq!(NfGrid::Nf3.index(down(*t)), k as u8);
    }
}

#[test]
fn nf4_values_at_thresholds_take_the_lower_level() {
    // bitsandbytes dQuantizeNF4: `if (x > 0.8614784181118011f) return 0b1111; else 0b1110` ...:
    // strictly greater moves up, so a value exactly at threshold k keeps level k. Scale = absmax 1.
    let mut at = vec![-1.0f32];
    at.extend(NF4_THRESHOLDS);
    at.push(1.0);
    let mut want = vec![-1.0f32];
    want.extend(&NF4_LEVELS[..15]);
    want.push(1.0);
    assert_eq!(
        flat(&fake_weight(&row(&at), &WeightQuant::nf4(None)).unwrap()),
        want
    );
    let mut above = vec![-1.0f32];
    above.extend(NF4_THRESHOLDS.map(up));
    above.push(1.0);
    let mut want = vec![-1.0f32];
    want.extend(&NF4_LEVELS[1..]);
    want.push(1.0);
    assert_eq!(
        flat(&fake_weight(&row(&above), &WeightQuant::nf4(None)).unwrap()),
        want
    );
    for (k, t) in NF4_THRESHOLDS.iter().enumerate() {
        assert_eq!(NfGrid::Nf4.index(*t), k as u8);
        assert_eq!(NfGrid::Nf4.index(up(*t)), k as u8 + 1);
    }
}

#[test]
fn nf4_uses_the_f16_absmax_per_group() {
    // Group 0: [-4, 2, 0.1, 1]: absmax 4 → u = [-1, 0.5, 0.025, 0.25]
    //   → levels [0 (-1), 12 (0.5 ∈ (0.3893, 0.5017]: 0.44070982933044434), 7 (0.025 ≤ 0.0398: 0),
    //     10 (0.25 ∈ (0.2035, 0.2920]: 0.24611230194568634)] · 4.
    // Group 1: [0.1, -0.3, 0, 0]: absmax 0.3 → f16 scale 0.300048828125 (0.3·4096 = 1228.8 → 1229
    //   /4096); u(-0.3) = -0.99984 → level 0 → -0.300048828125 (not -0.3); u(0.1) = 0.33328
    //   ∈ (0.2920, 0.3893] → level 11 (0.33791524171829224) · s.
    // Group 2: all zero → scale 0 → zeros (never NaN).
    let x = [-4.0, 2.0, 0.1, 1.0, 0.1, -0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    let s1 = f16::from_f32(0.3).to_f32();
    assert_eq!(f64::from(s1), 0.300048828125);
    let l = NF4_LEVELS;
    let want = [
        -4.0,
        l[12] * 4.0,
        0.0,
        l[10] * 4.0,
        l[11] * s1,
        -s1,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
    ];
    let out = fake_weight(&row(&x), &WeightQuant::nf4(Some(4))).unwrap();
    assert_eq!(flat(&out), want);
    // NF3 with the same groups: group 1 has max 0.1 → positive scale f16(0.1) and |min| 0.3.
    let out = flat(&fake_weight(&row(&x), &WeightQuant::nf3(Some(4))).unwrap());
    assert_eq!(out[4], f16::from_f32(0.1).to_f32()); // 0.1 / f16(0.1) ≈ 1.00024 → level 1.0
    assert_eq!(out[5], -s1);
    assert!(out[8..].iter().all(|&v| v == 0.0 && v.to_bits() == 0));
}

#[test]
fn nf_formats_require_their_bits_and_pass_gradients_straight_through() {
    let w = row(&[0.3, -0.7, 1.1, 0.05]);
    let wrong = WeightQuant::nf3(None);
    let wrong = WeightQuant { bits: 4, ..wrong };
    let e = fake_weight(&w, &wrong).unwrap_err().to_string();
    assert!(
        e.contains("weight format nf3 needs bits 3, found bits 4"),
        "{e}"
    );
    let e = fake_weight(&w, &WeightQuant::nf4(None).with_grad(WeightGrad::MinMax))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("weight grad \"minmax\" is not implemented for format nf4"),
        "{e}"
    );
    for wq in [WeightQuant::nf3(Some(2)), WeightQuant::nf4(Some(2))] {
        let var = Var::from_tensor(&w).unwrap();
        let out = fake_weight(var.as_tensor(), &wq).unwrap();
        assert_eq!(flat(&out), flat(&fake_weight(&w, &wq).unwrap()));
        assert_ne!(flat(&out), flat(&w));
        let c = row(&[1.0, -2.0, 3.0, 0.5]);
        let grads = (&out * &c).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(
            flat(grads.get(var.as_tensor()).unwrap()),
            flat(&c),
            "{wq:?}"
        );
    }
}

#[test]
fn half_precision_weights_are_quantized_in_f32_and_cast_back() {
    // Values exact in f16 and bf16; NF4 of [-1, 0.5, 0, 1] with absmax 1 → [-1, l12, 0, 1].
    for dtype in [DType::F16, DType::BF16] {
        let w = row(&[-1.0, 0.5, 0.0, 1.0]).to_dtype(dtype).unwrap();
        let out = fake_weight(&w, &WeightQuant::nf4(None)).unwrap();
        assert_eq!(out.dtype(), dtype);
        let want = row(&[-1.0, NF4_LEVELS[12], 0.0, 1.0])
            .to_dtype(dtype)
            .unwrap();
        assert_eq!(flat(&out), flat(&want), "{dtype:?}");
    }
}
