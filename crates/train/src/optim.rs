//! AdamW (decoupled weight decay, as torch.optim.AdamW), learning-rate schedules and global
//! gradient-norm clipping. The optimizer state is plain tensors so checkpoints can hold it.

use crate::adamw_kernels;
use candle_core::{Result, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Learning-rate schedule over `total_steps`, with linear warmup.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrConfig {
    pub lr: f64,
    pub schedule: Schedule,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// Cosine decays to `lr * min_lr_ratio`.
    pub min_lr_ratio: f64,
}

impl LrConfig {
    /// Learning rate of optimizer step `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
                let min = self.lr * self.min_lr_ratio;
                min + (self.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW over named variables. Updates run as in-place kernels where they apply (see
/// [`Self::set_fused_kernels`]), else as composed candle ops; both give the same bits.
pub struct AdamW {
    vars: Vec<(String, Var)>,
    m: HashMap<String, Tensor>,
    v: HashMap<String, Tensor>,
    /// Optimizer steps taken.
    pub step: u64,
    cfg: AdamWConfig,
    fused: bool,
}

impl AdamW {
    pub fn new(mut vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let mut m = HashMap::new();
        let mut v = HashMap::new();
        for (name, var) in &vars {
            m.insert(name.clone(), var.as_tensor().zeros_like()?);
            v.insert(name.clone(), var.as_tensor().zeros_like()?);
        }
        Ok(Self {
            vars,
            m,
            v,
            step: 0,
            cfg,
            fused: true,
        })
    }

    /// Whether updates use the in-place kernels (crate `adamw_kernels`: one pass per moment and
    /// one for the weight; CPU f32/f64, CUDA f32) where they apply; default on. Off: composed
    /// candle ops only, the reference the kernels are tested against.
    pub fn set_fused_kernels(&mut self, on: bool) {
        self.fused = on;
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// One update with gradients `grads` (already averaged) at learning rate `lr`.
    pub fn apply(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        self.apply_scaled(grads, lr, None)
    }

    /// [`Self::apply`] with every gradient first multiplied by `grad_scale` (gradient clipping,
    /// [`clip_scale`]): the bits of scaling the gradients with candle's `g * s` and then
    /// applying them, without a pass of its own where the in-place kernels run.
    pub fn apply_scaled(
        &mut self,
        grads: &HashMap<String, Tensor>,
        lr: f64,
        grad_scale: Option<f64>,
    ) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (name, var) in &self.vars {
            let Some(g) = grads.get(name) else { continue };
            let (w, m, v) = (var.as_tensor(), &self.m[name], &self.v[name]);
            // A 16-bit gradient of an f32 weight (its forward pass cast it, [`crate::grad_sum::GradSum`]) goes
            // to the CUDA kernel as it is, which reads it as f32; elsewhere it is cast first.
            // Both see its exact value: the same bits as an f32 gradient of the same values.
            let on_cuda_kernel = w.device().is_cuda() && self.fused;
            let upcast;
            let g = if g.dtype() != w.dtype()
                && !(on_cuda_kernel && adamw_kernels::supported(w, g, m, v))
            {
                upcast = g.to_dtype(w.dtype())?;
                &upcast
            } else {
                g
            };
            if self.fused && adamw_kernels::supported(w, g, m, v) {
                // In place: the moments here are this optimizer's own tensors (checkpoints copy
                // them out before the next step), the weight is the variable's storage, as
                // `Var::set` writes it.
                let moment = |decay: f64, square| adamw_kernels::MomentUpdate {
                    decay,
                    gain: 1.0 - decay,
                    square,
                    grad_scale,
                };
                let update = adamw_kernels::WeightUpdate {
                    inv_bc1: 1.0 / bc1,
                    inv_bc2: 1.0 / bc2,
                    eps: c.eps,
                    lr,
                    decay: (c.weight_decay > 0.0).then_some(1.0 - lr * c.weight_decay),
                };
                // On CUDA the three passes run as one kernel (StepUpdate); the CPU runs them apart.
                if w.device().is_cuda() {
                    let step = adamw_kernels::StepUpdate {
                        first: moment(c.beta1, false),
                        second: moment(c.beta2, true),
                        weight: update,
                        grad: g.clone(),
                    };
                    w.inplace_op3(m, v, &step)?;
                    continue;
                }
                m.inplace_op2(g, &moment(c.beta1, false))?;
                v.inplace_op2(g, &moment(c.beta2, true))?;
                w.inplace_op3(m, v, &update)?;
                continue;
            }
            let g = &match grad_scale {
                Some(s) => (g * s)?,
                None => g.clone(),
            };
            let m = ((&self.m[name] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[name] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            let w = var.as_tensor();
            let decayed = if c.weight_decay > 0.0 {
                (w * (1.0 - lr * c.weight_decay))?
            } else {
                w.clone()
            };
            var.set(&(decayed - (update * lr)?)?)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        Ok(())
    }

    /// Rounds every variable to `dtype` and back (in place): the weights a run that stores them
    /// in `dtype` would have. A no-op for the variables' own dtype.
    pub fn round_vars_to(&self, dtype: candle_core::DType) -> Result<()> {
        for (_, var) in &self.vars {
            let w = var.as_tensor();
            if w.dtype() != dtype {
                var.set(&w.to_dtype(dtype)?.to_dtype(w.dtype())?)?;
            }
        }
        Ok(())
    }

    /// Moments as named tensors (`m.<name>`, `v.<name>`) for checkpoints.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (name, t) in &self.m {
            out.insert(format!("m.{name}"), t.clone());
        }
        for (name, t) in &self.v {
            out.insert(format!("v.{name}"), t.clone());
        }
        out
    }

    /// Restores moments saved by [`Self::state_tensors`].
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (name, _) in &self.vars {
            let (Some(m), Some(v)) = (
                tensors.get(&format!("m.{name}")),
                tensors.get(&format!("v.{name}")),
            ) else {
                candle_core::bail!("optimizer state lacks moments of {name}");
            };
            self.m.insert(name.clone(), m.clone());
            self.v.insert(name.clone(), v.clone());
        }
        self.step = step;
        Ok(())
    }
}

/// Scales all gradients so that their global L2 norm is at most `max_norm`; returns the norm
/// before clipping. (Training folds the scaling into AdamW instead: [`grad_norm`],
/// [`clip_scale`], [`AdamW::apply_scaled`].)
pub fn clip_grad_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads)?;
    if let Some(s) = clip_scale(norm, max_norm) {
        for g in grads.values_mut() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}

/// The factor gradient clipping scales the gradients by: `max_norm / (norm + 1e-6)` when
/// `max_norm > 0` and the norm exceeds it, else none.
pub fn clip_scale(norm: f64, max_norm: f64) -> Option<f64> {
    (max_norm > 0.0 && norm > max_norm).then(|| max_norm / (norm + 1e-6))
}

/// The global L2 norm of `grads`: per-tensor sums of squares on the device, copied to the host
/// in one transfer, summed there in name order. f32 gradients on CUDA are read once each
/// ([`crate::sum_squares`]); elsewhere `g.sqr().sum_all()`.
pub fn grad_norm(grads: &HashMap<String, Tensor>) -> Result<f64> {
    let mut names: Vec<&String> = grads.keys().collect();
    names.sort();
    if !names.is_empty()
        && names
            .iter()
            .all(|n| crate::sum_squares::fused_on(&grads[*n]))
    {
        let dev = grads[names[0]].device();
        let out = Tensor::zeros(names.len(), candle_core::DType::F64, dev)?;
        for (slot, name) in names.iter().enumerate() {
            crate::sum_squares::sum_squares_into(&out, slot, &grads[*name])?;
        }
        return Ok(out.to_vec1::<f64>()?.iter().sum::<f64>().sqrt());
    }
    // Per-tensor sums of squares on the device, copied to the host in one transfer (on a GPU,
    // one synchronization per step instead of one per tensor), then summed in name order.
    let parts = names
        .iter()
        .map(|name| {
            let g = &grads[*name];
            // 16-bit gradients (see [`crate::grad_sum::GradSum`]) squared and summed in f32, as their casts.
            let g = match g.dtype() {
                candle_core::DType::BF16 | candle_core::DType::F16 => {
                    g.to_dtype(candle_core::DType::F32)?
                }
                _ => g.clone(),
            };
            g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut sq = 0f64;
    if !parts.is_empty() {
        for part in Tensor::stack(&parts, 0)?.to_vec1::<f64>()? {
            sq += part;
        }
    }
    Ok(sq.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grad_sum::GradSum;
    use candle_core::backprop::GradStore;
    use candle_core::Device;

    /// One AdamW step from w = 1 with g = 0.5, lr 0.1: m̂ = g, v̂ = g², update = g/(|g|+eps) ≈ 1,
    /// so w → 1 - 0.1 = 0.9 (torch.optim.AdamW gives 0.9000000 for the same numbers).
    #[test]
    fn first_adamw_step_moves_by_lr() {
        let var = Var::new(&[1f32], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], AdamWConfig::default()).unwrap();
        let mut g = HashMap::new();
        g.insert(
            "w".to_string(),
            Tensor::new(&[0.5f32], &Device::Cpu).unwrap(),
        );
        opt.apply(&g, 0.1).unwrap();
        let w = var.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((w - 0.9).abs() < 1e-6, "{w}");
    }

    #[test]
    fn cosine_schedule_with_warmup() {
        let c = LrConfig {
            lr: 1.0,
            schedule: Schedule::Cosine,
            warmup_steps: 2,
            total_steps: 12,
            min_lr_ratio: 0.0,
        };
        assert_eq!(c.at(0), 0.5);
        assert_eq!(c.at(1), 1.0);
        assert!((c.at(2) - 1.0).abs() < 1e-12);
        assert!((c.at(7) - 0.5).abs() < 1e-12);
        assert!(c.at(12).abs() < 1e-12);
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let mut g = HashMap::new();
        g.insert("a".to_string(), Tensor::new(&[3f32], &Device::Cpu).unwrap());
        g.insert("b".to_string(), Tensor::new(&[4f32], &Device::Cpu).unwrap());
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        let a = g["a"].to_vec1::<f32>().unwrap()[0];
        assert!((a - 0.6).abs() < 1e-5);
    }

    /// Values with every rounding case of the update: zeros of both signs, tiny and huge
    /// magnitudes, and plain random ones.
    fn edge_values(n: usize, seed: u64) -> Vec<f64> {
        let mut state = seed;
        (0..n)
            .map(|i| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let r = ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0;
                match i % 8 {
                    0 => 0.0,
                    1 => -0.0,
                    2 => r * 1e-30,
                    3 => r * 3e7,
                    4 => r * 1e-7,
                    _ => r,
                }
            })
            .collect()
    }

    /// The in-place kernels (f32 and f64) give the composed ops' bits for the weights and both
    /// moments, step after step, with and without weight decay.
    #[test]
    fn fused_kernels_give_the_composed_ops_bits() -> Result<()> {
        let bits = |t: &Tensor| -> Result<Vec<u64>> {
            Ok(match t.dtype() {
                candle_core::DType::F32 => t
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .map(|x| u64::from(x.to_bits()))
                    .collect(),
                _ => t
                    .flatten_all()?
                    .to_vec1::<f64>()?
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
            })
        };
        for dtype in [candle_core::DType::F32, candle_core::DType::F64] {
            for weight_decay in [0.0, 0.1] {
                let w0 = Tensor::from_vec(edge_values(1000, 1), (40, 25), &Device::Cpu)?
                    .to_dtype(dtype)?;
                let make = |fused| -> Result<AdamW> {
                    let var = Var::from_tensor(&w0.copy()?)?;
                    let cfg = AdamWConfig {
                        weight_decay,
                        ..AdamWConfig::default()
                    };
                    let mut opt = AdamW::new(vec![("w".into(), var)], cfg)?;
                    opt.set_fused_kernels(fused);
                    Ok(opt)
                };
                let (mut fused, mut composed) = (make(true)?, make(false)?);
                for step in 0..6u64 {
                    let g = Tensor::from_vec(edge_values(1000, 10 + step), (40, 25), &Device::Cpu)?
                        .to_dtype(dtype)?;
                    let grads = HashMap::from([("w".to_string(), g)]);
                    let lr = 1e-3 * (step + 1) as f64;
                    // Odd steps scale the gradients (clipping), folded into the moment passes.
                    let scale = (step % 2 == 1).then_some(0.61 / (step + 1) as f64);
                    fused.apply_scaled(&grads, lr, scale)?;
                    composed.apply_scaled(&grads, lr, scale)?;
                    let what = format!("{dtype:?}, weight decay {weight_decay}, step {step}");
                    let (a, b) = (&fused.vars()[0].1, &composed.vars()[0].1);
                    assert_eq!(bits(a.as_tensor())?, bits(b.as_tensor())?, "w, {what}");
                    let (sa, sb) = (fused.state_tensors(), composed.state_tensors());
                    for key in ["m.w", "v.w"] {
                        assert_eq!(bits(&sa[key])?, bits(&sb[key])?, "{key}, {what}");
                    }
                }
            }
        }
        Ok(())
    }

    /// bf16 gradients of f32 weights (what the fake quantizer's backward leaves for bf16
    /// compute) give the bits of their exact f32 casts: accumulated with a scale and a sum
    /// (which cast first: no bf16 arithmetic), the gradient norm, and AdamW, fused and composed.
    #[test]
    fn bf16_gradients_give_their_f32_casts_bits() -> Result<()> {
        let dev = Device::Cpu;
        let bf16 = candle_core::DType::BF16;
        let vars: Vec<(String, Var)> = ["a", "b"]
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let w = Tensor::from_vec(edge_values(300, 1 + i as u64), 300, &dev)?
                    .to_dtype(candle_core::DType::F32)?;
                Ok((name.to_string(), Var::from_tensor(&w)?))
            })
            .collect::<Result<_>>()?;
        // Two parts' gradients, as two GradStores: a bf16 one for "a", f32 for "b".
        let store = |seed: u64, as_bf16: bool| -> Result<GradStore> {
            let (a, b) = (vars[0].1.as_tensor(), vars[1].1.as_tensor());
            let mut grads = (a.sum_all()? + b.sum_all()?)?.backward()?;
            let ga = Tensor::from_vec(edge_values(300, seed), 300, &dev)?.to_dtype(bf16)?;
            let f32 = candle_core::DType::F32;
            let ga = if as_bf16 { ga } else { ga.to_dtype(f32)? };
            grads.insert(a, ga);
            let gb = Tensor::from_vec(edge_values(300, seed + 1), 300, &dev)?.to_dtype(f32)?;
            grads.insert(b, gb);
            Ok(grads)
        };
        // AdamW fused and composed; the gradient sums in place and composed.
        for (fused, in_place) in [(true, true), (false, true), (true, false)] {
            let new_sum = || {
                if in_place {
                    GradSum::new()
                } else {
                    GradSum::composed()
                }
            };
            let run = |as_bf16: bool| -> Result<(f64, Vec<u64>)> {
                let mut sum = new_sum();
                sum.add(&vars, &store(10, as_bf16)?, 1.0)?;
                assert_eq!(
                    sum.sums()["a"].dtype(),
                    if as_bf16 {
                        bf16
                    } else {
                        candle_core::DType::F32
                    }
                );
                let norm_one = grad_norm(sum.sums())?;
                sum.add(&vars, &store(20, as_bf16)?, 0.37)?;
                assert_eq!(
                    sum.sums()["a"].dtype(),
                    candle_core::DType::F32,
                    "summed in f32"
                );
                let norm = grad_norm(sum.sums())?;
                let copies: Vec<(String, Var)> = vars
                    .iter()
                    .map(|(n, v)| Ok((n.clone(), Var::from_tensor(&v.as_tensor().copy()?)?)))
                    .collect::<Result<_>>()?;
                let mut opt = AdamW::new(copies.clone(), AdamWConfig::default())?;
                opt.set_fused_kernels(fused);
                let mut one = new_sum();
                one.add(&vars, &store(30, as_bf16)?, 1.0)?;
                opt.apply_scaled(one.sums(), 1e-3, Some(0.5))?;
                opt.apply_scaled(sum.sums(), 1e-3, None)?;
                let mut bits = vec![norm_one.to_bits(), norm.to_bits()];
                for (_, v) in &copies {
                    bits.extend(
                        qat_model::custom_op::f32_bits(v.as_tensor())?
                            .iter()
                            .map(|&b| u64::from(b)),
                    );
                }
                Ok((norm, bits))
            };
            let ((n16, b16), (n32, b32)) = (run(true)?, run(false)?);
            assert!(n16 > 0.0 && n16 == n32, "norms {n16} {n32}");
            assert_eq!(b16, b32, "fused {fused}, in place {in_place}");
        }
        Ok(())
    }

    /// The CUDA kernels (f32) against the composed ops on the CPU, bit for bit. Runs only in a
    /// `--features cuda` build on a machine with a GPU (skipped otherwise).
    #[test]
    fn cuda_kernels_give_the_composed_ops_bits() -> Result<()> {
        let Some(gpu) = qat_model::testing::cuda_or_skip() else {
            return Ok(());
        };
        // f32 gradients, and bf16 ones (an f32 weight cast to bf16 in the forward pass): the
        // CPU gets their exact f32 values.
        let cases = [
            (0.0, candle_core::DType::F32),
            (0.1, candle_core::DType::F32),
            (0.1, candle_core::DType::BF16),
        ];
        for (weight_decay, grad_dtype) in cases {
            let cfg = AdamWConfig {
                weight_decay,
                ..AdamWConfig::default()
            };
            let w0 = Tensor::from_vec(edge_values(5000, 1), 5000, &Device::Cpu)?
                .to_dtype(candle_core::DType::F32)?;
            let on = |dev: &Device| -> Result<AdamW> {
                let var = Var::from_tensor(&w0.to_device(dev)?)?;
                AdamW::new(vec![("w".into(), var)], cfg)
            };
            let (mut cuda, mut cpu) = (on(&gpu)?, on(&Device::Cpu)?);
            cpu.set_fused_kernels(false);
            for step in 0..4u64 {
                let g = Tensor::from_vec(edge_values(5000, 10 + step), 5000, &Device::Cpu)?
                    .to_dtype(grad_dtype)?;
                let lr = 1e-3 * (step + 1) as f64;
                // Odd steps scale the gradients (clipping).
                let scale = (step % 2 == 1).then_some(0.61 / (step + 1) as f64);
                let on_gpu = HashMap::from([("w".into(), g.to_device(&gpu)?)]);
                cuda.apply_scaled(&on_gpu, lr, scale)?;
                let g = g.to_dtype(candle_core::DType::F32)?;
                cpu.apply_scaled(&HashMap::from([("w".into(), g)]), lr, scale)?;
            }
            let bits = |t: &Tensor| qat_model::custom_op::f32_bits(&t.to_device(&Device::Cpu)?);
            let what = format!("weight decay {weight_decay}, {grad_dtype:?} gradients");
            let (a, b) = (cuda.vars()[0].1.as_tensor(), cpu.vars()[0].1.as_tensor());
            assert_eq!(bits(a)?, bits(b)?, "w, {what}");
            let (sa, sb) = (cuda.state_tensors(), cpu.state_tensors());
            for key in ["m.w", "v.w"] {
                assert_eq!(bits(&sa[key])?, bits(&sb[key])?, "{key}, {what}");
            }
        }
        Ok(())
    }
}
