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

/// Log-softmax of `logits` in f64 accumulation, written into `out` (same length).
pub fn log_softmax(logits: &[f32], out: &mut Vec<f32>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&z| (z as f64 - max).exp()).sum();
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
    if params.temperature <= 0.0 {
        return argmax(logits);
    }
    let u = rng.next_f64();
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let weight = |z: f32| ((z as f64 - max) / params.temperature).exp();
    let truncated = params.top_k > 0 && params.top_k < logits.len() || params.top_p < 1.0;
    if !truncated {
        // Scan in id order: no sort needed.
        let total: f64 = logits.iter().map(|&z| weight(z)).sum();
        let target = u * total;
        let mut acc = 0.0;
        for (i, &z) in logits.iter().enumerate() {
            acc += weight(z);
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
        // logits [0, ln 3] → probabilities [1/4, 3/4].
        let mut out = Vec::new();
        log_softmax(&[0.0, 3f32.ln()], &mut out);
        assert!((out[0] - 0.25f32.ln()).abs() < 1e-6 && (out[1] - 0.75f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn top_k_orders_by_value_then_index() {
        assert_eq!(top_k_indices(&[1.0, 3.0, 3.0, 2.0, -1.0], 3), vec![1, 2, 3]);
        assert_eq!(top_k_indices(&[1.0, 2.0], 5), vec![1, 0]);
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
