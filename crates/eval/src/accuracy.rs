//! Multiple-choice metrics as lm-evaluation-harness defines them (`lm_eval/api/task.py`,
//! `ConfigurableTask.process_results`; `lm_eval/api/metrics.py`, `mean_stderr`).
//!
//! `acc`: the prediction is `argmax` of the choices' summed log-likelihoods. `acc_norm`: the
//! argmax of each log-likelihood divided by the length of its `doc_to_choice` string in
//! characters (Python's `len`, Unicode code points; not tokens, not bytes, and without the
//! target delimiter). Ties go to the first choice, as `numpy.argmax`. The standard error of a
//! mean of 0/1 scores is the sample standard deviation (n − 1) over √n.

use serde::Serialize;

/// Predictions for one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ItemPrediction {
    pub pred: usize,
    pub pred_norm: usize,
    pub gold: usize,
}

impl ItemPrediction {
    pub fn acc(&self) -> f64 {
        (self.pred == self.gold) as u8 as f64
    }

    pub fn acc_norm(&self) -> f64 {
        (self.pred_norm == self.gold) as u8 as f64
    }
}

/// Index of the largest value, the first one on ties; a NaN wins, as in `numpy.argmax`.
pub fn argmax(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x.is_nan() {
            return i;
        }
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// `acc` and `acc_norm` predictions from per-choice log-likelihoods and choice strings.
pub fn predict(lls: &[f64], choices: &[String], gold: usize) -> ItemPrediction {
    let normed: Vec<f64> = lls
        .iter()
        .zip(choices)
        .map(|(&ll, c)| ll / c.chars().count() as f64)
        .collect();
    ItemPrediction {
        pred: argmax(lls),
        pred_norm: argmax(&normed),
        gold,
    }
}

/// Mean and standard error of per-item scores; the error is None for fewer than 2 items.
pub fn mean_stderr(scores: &[f64]) -> (f64, Option<f64>) {
    let n = scores.len() as f64;
    let mean = scores.iter().sum::<f64>() / n;
    if scores.len() < 2 {
        return (mean, None);
    }
    let var = scores.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, Some(var.sqrt() / n.sqrt()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    /// A short choice with the higher total log-likelihood wins `acc`; per character the long
    /// one is likelier, so it wins `acc_norm`: -6/3 = -2.0 < -10/20 = -0.5.
    #[test]
    fn acc_and_acc_norm_differ_on_a_constructed_item() {
        let choices = s(&["yes", "a much longer answer"]);
        assert_eq!(choices[1].chars().count(), 20);
        let p = predict(&[-6.0, -10.0], &choices, 1);
        assert_eq!((p.pred, p.pred_norm), (0, 1));
        assert_eq!((p.acc(), p.acc_norm()), (0.0, 1.0));
    }

    /// Characters, not bytes: "éé" is 2 characters but 4 bytes. Per character -3/2 = -1.5 loses
    /// to "abc"'s -4/3 = -1.33; per byte -3/4 = -0.75 would win.
    #[test]
    fn acc_norm_counts_characters_not_bytes() {
        let p = predict(&[-3.0, -4.0], &s(&["éé", "abc"]), 1);
        assert_eq!(p.pred_norm, 1);
        assert_eq!(p.pred, 0);
    }

    #[test]
    fn argmax_takes_the_first_of_ties_and_nan_like_numpy() {
        assert_eq!(argmax(&[-1.0, -1.0, -2.0]), 0);
        assert_eq!(argmax(&[-3.0, -1.0, -1.0]), 1);
        assert_eq!(argmax(&[-1.0, f64::NAN, 0.0]), 1);
    }

    /// Harness: sample_stddev([1, 0, 0, 1]) = sqrt(1/3); / sqrt(4) = 0.288675...
    #[test]
    fn stderr_uses_the_sample_deviation() {
        let (m, se) = mean_stderr(&[1.0, 0.0, 0.0, 1.0]);
        assert_eq!(m, 0.5);
        assert!((se.unwrap() - 0.28867513459481287).abs() < 1e-15);
        assert_eq!(mean_stderr(&[1.0]), (1.0, None));
    }
}
