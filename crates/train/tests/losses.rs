//! Numeric tests of the distillation losses (formats/distill-loss.md): every loss against an
//! independent f64 computation in plain Rust (full vocabulary and bucketed), hand-worked small
//! cases, the tail floor of the reverse KL, CAKLD's limits, and finite, correct gradients.

use candle_core::{Device, Tensor, Var};
use qat_train::loss::{student_buckets, TAIL_FLOOR};
use qat_train::{Loss, LossKind, TopKTargets};

/// splitmix64, for reproducible random logits.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Logits uniform in [-scale, scale).
    fn logits(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| (2.0 * self.next() - 1.0) * scale).collect()
    }
}

fn softmax(z: &[f64]) -> Vec<f64> {
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|x| (x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

/// KL(a || b) in f64 with 0 log 0 = 0.
fn kl(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .filter(|(x, _)| **x > 0.0)
        .map(|(x, y)| x * (x / y).ln())
        .sum()
}

/// The reference value of `loss` between distributions `p` (teacher) and `q` (student).
fn reference(loss: Loss, p: &[f64], q: &[f64]) -> f64 {
    match loss {
        Loss::Fkl => kl(p, q),
        Loss::Rkl => kl(q, p),
        Loss::Jsd => {
            let m: Vec<f64> = p.iter().zip(q).map(|(a, b)| 0.5 * (a + b)).collect();
            0.5 * kl(p, &m) + 0.5 * kl(q, &m)
        }
        Loss::Cakld { gamma } => gamma * kl(q, p) + (1.0 - gamma) * kl(p, q),
    }
}

const LOSSES: [Loss; 5] = [
    Loss::Fkl,
    Loss::Rkl,
    Loss::Jsd,
    Loss::Cakld { gamma: 0.3 },
    Loss::Cakld { gamma: 0.85 },
];

/// Teacher ids of one position sorted by descending probability (as the shards store them).
fn top_k(p: &[f64], k: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..p.len() as u32).collect();
    ids.sort_by(|&a, &b| p[b as usize].total_cmp(&p[a as usize]));
    ids.truncate(k);
    ids
}

/// N positions of random teacher/student logits over `vocab`: (teacher probs, student logits).
fn random_case(seed: u64, n: usize, vocab: usize) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let mut rng = Rng(seed);
    let p = (0..n).map(|_| softmax(&rng.logits(vocab, 4.0))).collect();
    let z = (0..n).map(|_| rng.logits(vocab, 3.0)).collect();
    (p, z)
}

fn targets(p: &[Vec<f64>], k: usize, dev: &Device) -> TopKTargets {
    let vocab = p[0].len();
    let (mut ids, mut logp) = (Vec::new(), Vec::new());
    for row in p {
        for id in top_k(row, k) {
            ids.push(id);
            logp.push(row[id as usize].ln() as f32);
        }
    }
    TopKTargets::new(ids, logp, p.len(), k, vocab, dev).unwrap()
}

fn logits_tensor(z: &[Vec<f64>], dev: &Device) -> Tensor {
    let flat: Vec<f32> = z.iter().flatten().map(|&x| x as f32).collect();
    Tensor::from_vec(flat, (z.len(), z[0].len()), dev).unwrap()
}

fn scalar(t: Tensor) -> f64 {
    t.to_scalar::<f32>().unwrap() as f64
}

/// With K = V the tail bucket is empty: each top-K loss, and the online full-vocabulary loss,
/// equals the exact full-vocabulary divergence computed in f64 (mean over 6 positions, V = 37).
#[test]
fn k_equal_vocab_equals_the_exact_full_vocabulary_value() {
    let dev = Device::Cpu;
    let (p, z) = random_case(7, 6, 37);
    let t = targets(&p, 37, &dev);
    let logits = logits_tensor(&z, &dev);
    let teacher_logp = logits_tensor(
        &p.iter()
            .map(|r| r.iter().map(|x| x.ln()).collect())
            .collect::<Vec<_>>(),
        &dev,
    );
    for loss in LOSSES {
        let want: f64 = p
            .iter()
            .zip(&z)
            .map(|(p, z)| reference(loss, p, &softmax(z)))
            .sum::<f64>()
            / p.len() as f64;
        let got = scalar(loss.mean(&logits, &t).unwrap());
        assert!(
            (got - want).abs() < 2e-6 * want.max(1.0),
            "{loss:?} top-K: {got} vs {want}"
        );
        let full = scalar(loss.full_vocab(&logits, &teacher_logp).unwrap());
        assert!(
            (full - want).abs() < 2e-6 * want.max(1.0),
            "{loss:?} full vocabulary: {full} vs {want}"
        );
        assert!(want > 1e-2, "{loss:?}: test case too easy ({want})");
    }
}

/// K = 8 of V = 37: each loss equals the f64 divergence between the 9-bucket distributions
/// (top-8 ids + one tail bucket holding the other 29 ids) built independently here.
#[test]
fn k_below_vocab_equals_the_bucketed_f64_value() {
    let dev = Device::Cpu;
    let (p, z) = random_case(11, 5, 37);
    let t = targets(&p, 8, &dev);
    let logits = logits_tensor(&z, &dev);
    let bucket = |dist: &[f64], ids: &[u32]| -> Vec<f64> {
        let mut b: Vec<f64> = ids.iter().map(|&i| dist[i as usize]).collect();
        b.push(
            (0..dist.len())
                .filter(|i| !ids.contains(&(*i as u32)))
                .map(|i| dist[i])
                .sum(),
        );
        b
    };
    for loss in LOSSES {
        let per: Vec<f64> = p
            .iter()
            .zip(&z)
            .map(|(p, z)| {
                let ids = top_k(p, 8);
                reference(loss, &bucket(p, &ids), &bucket(&softmax(z), &ids))
            })
            .collect();
        let got = loss
            .per_position(&logits, &t)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (g, w) in got.iter().zip(&per) {
            assert!(
                (*g as f64 - w).abs() < 2e-6 * w.max(1.0),
                "{loss:?}: {g} vs {w}"
            );
        }
    }
}

/// Hand-worked, V = 3: teacher p = (0.5, 0.3, 0.2), student q = (0.25, 0.25, 0.5) from logits
/// ln q. With K = 2 the tail bucket is token 2 alone (r_p = 0.2, r_q = 0.5):
///   FKL = 0.5 ln(0.5/0.25) + 0.3 ln(0.3/0.25) + 0.2 ln(0.2/0.5)
///       = 0.346574 + 0.054697 - 0.183258 = 0.218012
///   RKL = 0.25 ln(0.25/0.5) + 0.25 ln(0.25/0.3) + 0.5 ln(0.5/0.2)
///       = -0.173287 - 0.045580 + 0.458145 = 0.239278
///   JSD: m = (0.375, 0.275, 0.35); KL(p||m) = 0.143841 + 0.026103 - 0.111923 = 0.058021,
///        KL(q||m) = -0.101366 - 0.023828 + 0.178337 = 0.053143; JSD = 0.055582
///   CAKLD(gamma 0.8) = 0.8 * 0.239278 + 0.2 * 0.218012 = 0.235025
/// With K = 1 the tail merges tokens 1 and 2: buckets p = (0.5, 0.5), q = (0.25, 0.75):
///   FKL = 0.5 ln 2 + 0.5 ln(0.5/0.75) = 0.346574 - 0.202733 = 0.143841
///   RKL = 0.25 ln 0.5 + 0.75 ln 1.5 = -0.173287 + 0.304099 = 0.130812
///   JSD: m = (0.375, 0.625); ½(0.143841 - 0.111572) + ½(-0.101366 + 0.136741) = 0.033822
#[test]
fn three_token_vocabulary_by_hand() {
    let dev = Device::Cpu;
    let logits = Tensor::new(&[[0.25f32.ln(), 0.25f32.ln(), 0.5f32.ln()]], &dev).unwrap();
    let k2 = TopKTargets::new(vec![0, 1], vec![0.5f32.ln(), 0.3f32.ln()], 1, 2, 3, &dev).unwrap();
    let k1 = TopKTargets::new(vec![0], vec![0.5f32.ln()], 1, 1, 3, &dev).unwrap();
    let cases = [
        (Loss::Fkl, &k2, 0.218012),
        (Loss::Rkl, &k2, 0.239278),
        (Loss::Jsd, &k2, 0.055582),
        (Loss::Cakld { gamma: 0.8 }, &k2, 0.235025),
        (Loss::Fkl, &k1, 0.143841),
        (Loss::Rkl, &k1, 0.130812),
        (Loss::Jsd, &k1, 0.033822),
    ];
    for (loss, t, want) in cases {
        let got = scalar(loss.mean(&logits, t).unwrap());
        assert!(
            (got - want).abs() < 2e-6,
            "{loss:?} K={}: {got} vs {want}",
            t.k
        );
    }
}

/// K = 2 of V = 3 with stored teacher probabilities (0.6, 0.41) summing above 1 (as f16
/// rounding can): r_p clamps to 0. FKL and JSD have no teacher tail term (0 log 0 = 0); RKL
/// uses r_p = TAIL_FLOOR = 1e-6 and stays finite:
///   RKL = 0.25 ln(0.25/0.6) + 0.25 ln(0.25/0.41) + 0.5 ln(0.5/1e-6) = 6.21864
///   FKL = 0.6 ln(0.6/0.25) + 0.41 ln(0.41/0.25)
///   JSD = ½[0.6 ln(0.6/0.425) + 0.41 ln(0.41/0.33)] + ½[0.25 ln(0.25/0.425) + 0.25 ln(0.25/0.33) + 0.5 ln 2]
#[test]
fn empty_teacher_tail_uses_the_floor_in_the_reverse_kl() {
    let dev = Device::Cpu;
    let logits = Tensor::new(&[[0.25f32.ln(), 0.25f32.ln(), 0.5f32.ln()]], &dev).unwrap();
    let t = TopKTargets::new(vec![0, 1], vec![0.6f32.ln(), 0.41f32.ln()], 1, 2, 3, &dev).unwrap();
    assert_eq!(t.tail.to_vec1::<f32>().unwrap(), [0.0]);
    let ln = f64::ln;
    let rkl = 0.25 * ln(0.25 / 0.6) + 0.25 * ln(0.25 / 0.41) + 0.5 * ln(0.5 / TAIL_FLOOR);
    let fkl = 0.6 * ln(0.6 / 0.25) + 0.41 * ln(0.41 / 0.25);
    let (m0, m1) = (0.425, 0.33);
    let jsd = 0.5 * (0.6 * ln(0.6 / m0) + 0.41 * ln(0.41 / m1))
        + 0.5 * (0.25 * ln(0.25 / m0) + 0.25 * ln(0.25 / m1) + 0.5 * ln(2.0));
    assert!((rkl - 6.21864).abs() < 1e-5, "{rkl}");
    for (loss, want) in [
        (Loss::Rkl, rkl),
        (Loss::Fkl, fkl),
        (Loss::Jsd, jsd),
        (Loss::Cakld { gamma: 0.5 }, 0.5 * rkl + 0.5 * fkl),
    ] {
        let got = scalar(loss.mean(&logits, &t).unwrap());
        assert!(
            got.is_finite() && (got - want).abs() < 1e-5 * want.max(1.0),
            "{loss:?}: {got} vs {want}"
        );
    }
}

/// CAKLD's limits: gamma = 1 is the reverse KL, gamma = 0 the forward KL (exactly, value and
/// gradient), on a K < V case with tails and on one with an empty teacher tail.
#[test]
fn cakld_limits_are_rkl_and_fkl() {
    let dev = Device::Cpu;
    let (p, z) = random_case(3, 4, 21);
    let empty_tail =
        TopKTargets::new(vec![0, 1], vec![0.6f32.ln(), 0.41f32.ln()], 1, 2, 3, &dev).unwrap();
    for (t, z) in [
        (targets(&p, 5, &dev), z),
        (empty_tail, vec![vec![1.0, 0.5, 3.0]]),
    ] {
        let logits = Var::from_tensor(&logits_tensor(&z, &dev)).unwrap();
        for (gamma, plain) in [(1.0, Loss::Rkl), (0.0, Loss::Fkl)] {
            let a = Loss::Cakld { gamma }.mean(&logits, &t).unwrap();
            let b = plain.mean(&logits, &t).unwrap();
            assert_eq!(scalar(a.clone()), scalar(b.clone()), "gamma {gamma}");
            let ga = a
                .backward()
                .unwrap()
                .get(&logits)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let gb = b
                .backward()
                .unwrap()
                .get(&logits)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (x, y) in ga.iter().zip(&gb) {
                assert!((x - y).abs() <= 1e-7, "gamma {gamma}: gradient {x} vs {y}");
            }
        }
    }
}

/// Gradients are finite for every loss, including an empty teacher tail (floor), a student
/// with a top logit of 60 (tail mass e^-60) and K = V; and they match a central finite
/// difference along a random direction.
#[test]
fn gradients_are_finite_and_match_finite_differences() {
    let dev = Device::Cpu;
    let (p, z) = random_case(5, 4, 16);
    let confident = TopKTargets::new(vec![0], vec![0.5f32.ln()], 1, 1, 3, &dev).unwrap();
    let empty_tail =
        TopKTargets::new(vec![0, 1], vec![0.6f32.ln(), 0.41f32.ln()], 1, 2, 3, &dev).unwrap();
    let cases: Vec<(TopKTargets, Vec<Vec<f64>>)> = vec![
        (targets(&p, 4, &dev), z.clone()),
        (targets(&p, 16, &dev), z.clone()),
        (confident, vec![vec![60.0, 0.0, 0.0]]),
        (empty_tail, vec![vec![1.0, 0.5, 3.0]]),
    ];
    let mut rng = Rng(99);
    for (t, z) in &cases {
        let base = logits_tensor(z, &dev);
        let var = Var::from_tensor(&base).unwrap();
        let dir = logits_tensor(
            &z.iter()
                .map(|r| rng.logits(r.len(), 1.0))
                .collect::<Vec<_>>(),
            &dev,
        );
        for loss in LOSSES {
            let l = loss.mean(&var, t).unwrap();
            let g = l.backward().unwrap().get(&var).unwrap().clone();
            let gv = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(
                gv.iter().all(|x| x.is_finite()),
                "{loss:?} K={}: {gv:?}",
                t.k
            );
            assert!(
                gv.iter().any(|x| *x != 0.0),
                "{loss:?} K={}: zero gradient",
                t.k
            );
            let eps = 1e-2;
            let at = |s: f64| {
                scalar(
                    loss.mean(&(&base + (&dir * s).unwrap()).unwrap(), t)
                        .unwrap(),
                )
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            let analytic = scalar((g * &dir).unwrap().sum_all().unwrap());
            assert!(
                (numeric - analytic).abs() < 2e-3 * analytic.abs().max(0.1),
                "{loss:?} K={}: {numeric} vs {analytic}",
                t.k
            );
        }
    }
}

/// The student buckets sum to 1 with a confident student (the masked tail does not cancel).
#[test]
fn student_buckets_sum_to_one() {
    let dev = Device::Cpu;
    let t = TopKTargets::new(vec![2, 0], vec![0.7f32.ln(), 0.2f32.ln()], 1, 2, 4, &dev).unwrap();
    let logits = Tensor::new(&[[30f32, -2.0, 1.0, 0.5]], &dev).unwrap();
    let (lq, lr) = student_buckets(&logits, &t).unwrap();
    let s: f32 = lq
        .exp()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .sum::<f32>()
        + lr.unwrap().exp().unwrap().to_vec1::<f32>().unwrap()[0];
    assert!((s - 1.0).abs() < 1e-6, "{s}");
}

/// Loss names round-trip and gamma is validated.
#[test]
fn loss_kinds_parse_and_gamma_is_validated() {
    for k in LossKind::ALL {
        assert_eq!(k.name().parse::<LossKind>().unwrap(), k);
        assert_eq!(
            serde_json::to_string(&k).unwrap(),
            format!("\"{}\"", k.name())
        );
    }
    assert!("kl"
        .parse::<LossKind>()
        .unwrap_err()
        .to_string()
        .contains("fkl, rkl, jsd, cakld"));
    assert_eq!(
        Loss::new(LossKind::Cakld, Some(0.25)).unwrap(),
        Loss::Cakld { gamma: 0.25 }
    );
    assert_eq!(Loss::new(LossKind::Jsd, None).unwrap(), Loss::Jsd);
    for g in [1.5, -0.1, f64::NAN] {
        let e = Loss::new(LossKind::Cakld, Some(g)).unwrap_err().to_string();
        assert!(e.contains("0..=1"), "{e}");
    }
    assert!(Loss::new(LossKind::Fkl, Some(0.5))
        .unwrap_err()
        .to_string()
        .contains("only to the cakld loss"));
    assert!(Loss::new(LossKind::Cakld, None).is_err());
}
