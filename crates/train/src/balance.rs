//! Function-preserving rebalancing of the K and V channels before KV-cache quantization.
//!
//! Per-token KV quantization (LLM-QAT) shares one scale across all kv heads x head_dim values of
//! a token, so a few large channels crush the rest to zero. In full precision the model is
//! unchanged if
//!
//! * a RoPE pair (dims j and j + head_dim/2) of kv head g in k_proj is scaled by a, and the same
//!   pair of every query head that reads kv head g in q_proj by 1/a (q.k is unchanged, and RoPE
//!   rotates within the pair, so it commutes with a uniform scale of the pair);
//! * dim d of kv head g in v_proj is scaled by b, and the o_proj input columns of that dim of
//!   every query head reading kv head g by 1/b (attention mixes each dim separately).
//!
//! [`balance_kv`] picks a and b so that every channel's max |value| over calibration tokens
//! equals the layer's mean channel max. q_proj, k_proj and v_proj rows scale as a whole, so their
//! per-output-channel weight quantization is unaffected; o_proj columns are rescaled.

use crate::student::Student;
use candle_core::{Result, Tensor};
use qat_model::{KvKind, LinearId, QuantHooks};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Records the per-channel max |x| of K and V (pre-RoPE), `[kv_heads * head_dim]` per layer.
#[derive(Debug, Default)]
struct KvRanges {
    max: Mutex<HashMap<(usize, bool), Vec<f32>>>,
}

impl QuantHooks for KvRanges {
    fn kv(&self, layer: usize, kind: KvKind, x: &Tensor) -> Result<Tensor> {
        let (_, h, _, d) = x.dims4()?;
        let m: Vec<f32> = x.abs()?.max(2)?.max(0)?.reshape(h * d)?.to_vec1()?; // over batch and time
        let mut all = self.max.lock().expect("lock");
        let e = all
            .entry((layer, kind == KvKind::Key))
            .or_insert_with(|| vec![0.0; h * d]);
        for (a, b) in e.iter_mut().zip(m) {
            *a = a.max(b);
        }
        Ok(x.clone())
    }
    fn weight(&self, _id: LinearId, w: &Tensor) -> Result<Tensor> {
        Ok(w.clone())
    }
}

/// Spread of channel maxima before and after (max / mean, averaged over layers).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct BalanceReport {
    pub calibration_sequences: usize,
    pub k_max_over_mean_before: f64,
    pub v_max_over_mean_before: f64,
}

fn max_over_mean(v: &[f32]) -> f64 {
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
    v.iter().cloned().fold(0f32, f32::max) as f64 / mean.max(1e-30)
}

/// Rebalances the student's K/V channels from `calibration` token sequences (full precision).
pub fn balance_kv(student: &mut Student, calibration: &[Vec<u32>]) -> Result<BalanceReport> {
    let cfg = student.model.config().clone();
    let dev = student.model.device().clone();
    let saved = student.model.hooks().clone();
    let ranges = Arc::new(KvRanges::default());
    student.model.set_hooks(ranges.clone());
    for seq in calibration {
        let x = Tensor::from_vec(seq.clone(), (1, seq.len()), &dev)?;
        student
            .model
            .forward_hidden(&x, &mut student.model.new_cache(vec![0]))?;
    }
    student.model.set_hooks(saved);
    let maxima = ranges.max.lock().expect("lock").clone();
    let (hd, nkv, rep) = (
        cfg.head_dim,
        cfg.num_kv_heads,
        cfg.num_heads / cfg.num_kv_heads,
    );
    let mut tensors = student.tensors();
    let mut changed = Vec::new();
    let (mut kb, mut vb) = (0.0, 0.0);
    for layer in 0..cfg.num_layers {
        let (Some(mk), Some(mv)) = (maxima.get(&(layer, true)), maxima.get(&(layer, false))) else {
            continue;
        };
        kb += max_over_mean(mk) / cfg.num_layers as f64;
        vb += max_over_mean(mv) / cfg.num_layers as f64;
        let key = |p: &str| format!("model.layers.{layer}.self_attn.{p}.weight");
        let mut q: Vec<Vec<f32>> = tensors[&key("q_proj")].to_vec2()?;
        let mut k: Vec<Vec<f32>> = tensors[&key("k_proj")].to_vec2()?;
        let mut v: Vec<Vec<f32>> = tensors[&key("v_proj")].to_vec2()?;
        let mut o: Vec<Vec<f32>> = tensors[&key("o_proj")].to_vec2()?;
        // K: one factor per RoPE pair, to the mean pair max.
        let half = hd / 2;
        let pair_max: Vec<f32> = (0..nkv * half)
            .map(|i| {
                let (g, j) = (i / half, i % half);
                mk[g * hd + j].max(mk[g * hd + j + half])
            })
            .collect();
        let k_target = pair_max.iter().map(|&x| x as f64).sum::<f64>() / pair_max.len() as f64;
        for g in 0..nkv {
            for j in 0..half {
                let m = pair_max[g * half + j] as f64;
                if m <= 0.0 {
                    continue;
                }
                let a = (k_target / m) as f32;
                for dim in [j, j + half] {
                    k[g * hd + dim].iter_mut().for_each(|w| *w *= a);
                    for h in g * rep..(g + 1) * rep {
                        q[h * hd + dim].iter_mut().for_each(|w| *w /= a);
                    }
                }
            }
        }
        // V: one factor per channel, to the mean channel max.
        let v_target = mv.iter().map(|&x| x as f64).sum::<f64>() / mv.len() as f64;
        for g in 0..nkv {
            for dim in 0..hd {
                let m = mv[g * hd + dim] as f64;
                if m <= 0.0 {
                    continue;
                }
                let b = (v_target / m) as f32;
                v[g * hd + dim].iter_mut().for_each(|w| *w *= b);
                for h in g * rep..(g + 1) * rep {
                    o.iter_mut().for_each(|row| row[h * hd + dim] /= b);
                }
            }
        }
        for (name, rows) in [("q_proj", q), ("k_proj", k), ("v_proj", v), ("o_proj", o)] {
            let (r, c) = (rows.len(), rows[0].len());
            tensors.insert(key(name), Tensor::from_vec(rows.concat(), (r, c), &dev)?);
            changed.push(key(name));
        }
    }
    for (name, var) in student.vars() {
        if changed.contains(&name) {
            var.set(&tensors[&name])?;
        }
    }
    Ok(BalanceReport {
        calibration_sequences: calibration.len(),
        k_max_over_mean_before: kb,
        v_max_over_mean_before: vb,
    })
}
