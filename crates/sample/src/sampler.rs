//! Per-position math on one row of logits: log-softmax, the top-K that shards store, and the
//! choice of the next token (greedy, or sampling with temperature, top-k and top-p).

use crate::rng::SequenceRng;
use serde::{Deserialize, Serialize};

/// How the next token is drawn once the greedy prefix is done.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy.
    pub temperature: f64,
    /// Keep only the k most probable tokens (0 = no truncation).
    pub top_k: usize,
    /// Keep the smallest set of most probable tokens whose mass reaches p (1 = no truncation).
    pub top_p: f64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        }
    }
}

/// Log-softmax of `logits` in f64 accumulation, written into `out` (same length), leaving each
/// `exp(z - max)` (f64, the terms of its sum) in `exps`: with temperature 1 they are exactly the
/// weights [`sample_with_exps`] draws from, so a row's exponentials are computed once.
pub fn log_softmax_exps(logits: &[f32], out: &mut Vec<f32>, exps: &mut Vec<f64>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    exps.clear();
    exps.extend(logits.iter().map(|&z| (z as f64 - max).exp()));
    let sum: f64 = exps.iter().sum();
    let log_z = max + sum.ln();
    out.clear();
    out.extend(logits.iter().map(|&z| (z as f64 - log_z) as f32));
}

/// Indices of the `k` largest values, largest first; ties broken by the smaller index.
pub fn top_k_indices(values: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    let cmp = |a: &u32, b: &u32| {
        values[*b as usize]
            .total_cmp(&values[*a as usize])
            .then(a.cmp(b))
    };
    let k = k.min(values.len());
    if k < idx.len() {
        idx.select_nth_unstable_by(k, cmp);
        idx.truncate(k);
    }
    idx.sort_unstable_by(cmp);
    idx
}

/// Index of the largest value (the smallest index among ties).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Draws the next token from `logits` under `params`, consuming exactly one uniform from `rng`
/// (none when greedy), so a sequence's stream does not depend on the truncation settings.
pub fn sample(logits: &[f32], params: &SamplingParams, rng: &mut SequenceRng) -> u32 {
    sample_with_exps(logits, None, params, rng)
}

/// [`sample`], given the row's `exp(z - max)` from [`log_softmax_exps`]: used as the weights
/// when the temperature is 1 and nothing is truncated (the same f64 values `sample` computes,
/// `x / 1.0` being `x`), so the same token for the same uniform, with no exponential computed.
pub fn sample_with_exps(
    logits: &[f32],
    exps: Option<&[f64]>,
    params: &SamplingParams,
    rng: &mut SequenceRng,
) -> u32 {
    if params.temperature <= 0.0 {
        return argmax(logits);
    }
    draw(logits, exps, params, rng.next_f64())
}

/// Whether `params` cut the distribution of a `vocab`-wide row (top-k below the vocabulary, or
/// top-p below 1) before the draw.
pub fn truncates(params: &SamplingParams, vocab: usize) -> bool {
    params.top_k > 0 && params.top_k < vocab || params.top_p < 1.0
}

/// The token [`sample_with_exps`] draws for the uniform `u` in [0, 1) (a positive temperature):
/// inverse CDF in id order over the weights `exp((z - max) / T)`, summed in f64, after the
/// truncation.
pub fn draw(logits: &[f32], exps: Option<&[f64]>, params: &SamplingParams, u: f64) -> u32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let weight = |z: f32| ((z as f64 - max) / params.temperature).exp();
    if !truncates(params, logits.len()) {
        // Scan in id order: no sort needed.
        let computed: Vec<f64>;
        let weights = match exps {
            Some(e) if params.temperature == 1.0 && e.len() == logits.len() => e,
            _ => {
                computed = logits.iter().map(|&z| weight(z)).collect();
                &computed
            }
        };
        let total: f64 = weights.iter().sum();
        let target = u * total;
        let mut acc = 0.0;
        for (i, w) in weights.iter().enumerate() {
            acc += w;
            if acc > target {
                return i as u32;
            }
        }
        return argmax(logits);
    }
    let k = if params.top_k > 0 {
        params.top_k.min(logits.len())
    } else {
        logits.len()
    };
    let order = top_k_indices(logits, k);
    let weights: Vec<f64> = order.iter().map(|&i| weight(logits[i as usize])).collect();
    let total: f64 = weights.iter().sum();
    let mut keep = weights.len();
    if params.top_p < 1.0 {
        let mut acc = 0.0;
        for (j, w) in weights.iter().enumerate() {
            acc += w / total;
            if acc >= params.top_p {
                keep = j + 1;
                break;
            }
        }
    }
    let kept_total: f64 = weights[..keep].iter().sum();
    let target = u * kept_total;
    let mut acc = 0.0;
    for j in 0..keep {
        acc += weights[j];
        if acc > target {
            return order[j];
        }
    }
    order[keep - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_hand_worked() {
        // logits [0, ln 3] → probabilities [1/4, 3/4]; exp(z - max) = [1/3, 1].
        let (mut out, mut exps) = (Vec::new(), Vec::new());
        log_softmax_exps(&[0.0, 3f32.ln()], &mut out, &mut exps);
        assert!((out[0] - 0.25f32.ln()).abs() < 1e-6 && (out[1] - 0.75f32.ln()).abs() < 1e-6);
        assert!(
            (exps[0] - 1.0 / 3.0).abs() < 1e-7 && exps[1] == 1.0,
            "{exps:?}"
        );
    }

    /// With temperature 1, sampling from log-softmax's exponentials draws the token `sample`
    /// draws, uniform for uniform (also past where the sum's rounding matters: wide rows of
    /// near-equal logits); other temperatures ignore them.
    #[test]
    fn sampling_with_the_log_softmax_exps_draws_the_same_tokens() {
        let mut state = 7u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        let (mut out, mut exps) = (Vec::new(), Vec::new());
        for (row, width) in [(0u64, 4usize), (1, 512), (2, 32000), (3, 32000)] {
            let spread = if row == 3 { 1e-3 } else { 8.0 };
            let logits: Vec<f32> = (0..width).map(|_| (next() - 0.5) * spread).collect();
            log_softmax_exps(&logits, &mut out, &mut exps);
            for temperature in [1.0, 0.7] {
                let p = SamplingParams {
                    temperature,
                    ..Default::default()
                };
                let (mut a, mut b) = (SequenceRng::new(3, row), SequenceRng::new(3, row));
                for _ in 0..300 {
                    assert_eq!(
                        sample(&logits, &p, &mut a),
                        sample_with_exps(&logits, Some(&exps), &p, &mut b),
                        "row {row}, T {temperature}"
                    );
                }
            }
        }
    }

    #[test]
    fn top_k_orders_by_value_then_index() {
        assert_eq!(top_k_indices(&[1.0, 3.0, 3.0, 2.0, -1.0], 3), vec![1, 2, 3]);
        assert_eq!(top_k_indices(&[1.0, 2.0], 5), vec![1, 0]);
        assert_eq!(top_k_indices(&[1.0, 2.0], 0), Vec::<u32>::new());
        // Ties at the cut: the smaller indices stay; -0 ranks below +0 (total order).
        assert_eq!(
            top_k_indices(&[5.0, 1.0, 5.0, 1.0, 1.0, 7.0], 4),
            vec![5, 0, 2, 1]
        );
        assert_eq!(top_k_indices(&[-0.0, 0.0, -1.0], 2), vec![1, 0]);
        // Against a full sort by (value desc, index asc), on rows with many ties.
        let mut state = 11u64;
        for k in [1, 7, 64, 300] {
            let values: Vec<f32> = (0..1000)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 40) % 50) as f32 - 25.0
                })
                .collect();
            let mut all: Vec<u32> = (0..1000).collect();
            all.sort_by(|a, b| {
                values[*b as usize]
                    .total_cmp(&values[*a as usize])
                    .then(a.cmp(b))
            });
            all.truncate(k);
            assert_eq!(top_k_indices(&values, k), all, "k {k}");
        }
    }

    #[test]
    fn sampling_frequencies_follow_softmax_and_truncation() {
        let logits = [0.0f32, 1.0, 2.0, -30.0];
        let mut rng = SequenceRng::new(42, 0);
        let n = 200_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[sample(&logits, &SamplingParams::default(), &mut rng) as usize] += 1;
        }
        let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
        for i in 0..3 {
            let p = (logits[i] as f64).exp() / z;
            let f = counts[i] as f64 / n as f64;
            assert!((f - p).abs() < 0.005, "token {i}: freq {f} vs p {p}");
        }
        // top-k 1 and temperature 0 are greedy.
        let greedy = SamplingParams {
            temperature: 1.0,
            top_k: 1,
            top_p: 1.0,
        };
        assert_eq!(sample(&logits, &greedy, &mut rng), 2);
        assert_eq!(
            sample(
                &logits,
                &SamplingParams {
                    temperature: 0.0,
                    ..Default::default()
                },
                &mut rng
            ),
            2
        );
        // top-p 0.7: softmax of [0,1,2] is [.090, .245, .665]; the set {2, 1} reaches 0.7.
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.7,
        };
        let mut seen = [false; 4];
        for _ in 0..2000 {
            seen[sample(&logits, &p, &mut rng) as usize] = true;
        }
        assert_eq!(seen, [false, true, true, false]);
    }
}
