//! Reading `train_log.jsonl` (qat-distill: one JSON object per optimizer step with `step`,
//! `loss`, `lr`, `grad_norm`, `tokens`, `tokens_per_s`) into series to plot.

use crate::error::{ReportError, Result};
use std::path::{Path, PathBuf};

/// One logged optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub step: f64,
    pub tokens: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
}

/// The y value of a chart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Loss,
    Lr,
    GradNorm,
    TokensPerS,
}

impl Metric {
    /// The log field.
    pub fn field(self) -> &'static str {
        match self {
            Metric::Loss => "loss",
            Metric::Lr => "lr",
            Metric::GradNorm => "grad_norm",
            Metric::TokensPerS => "tokens_per_s",
        }
    }

    /// The y-axis label.
    pub fn axis_label(self) -> &'static str {
        match self {
            Metric::Loss => "distillation loss",
            Metric::Lr => "learning rate",
            Metric::GradNorm => "gradient norm (before clipping)",
            Metric::TokensPerS => "tokens / s",
        }
    }

    pub fn of(self, p: &Point) -> f64 {
        match self {
            Metric::Loss => p.loss,
            Metric::Lr => p.lr,
            Metric::GradNorm => p.grad_norm,
            Metric::TokensPerS => p.tokens_per_s,
        }
    }
}

/// The x value of a chart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XAxis {
    Step,
    Tokens,
}

impl XAxis {
    pub fn axis_label(self) -> &'static str {
        match self {
            XAxis::Step => "optimizer step",
            XAxis::Tokens => "training tokens",
        }
    }

    pub fn of(self, p: &Point) -> f64 {
        match self {
            XAxis::Step => p.step,
            XAxis::Tokens => p.tokens,
        }
    }
}

/// One training run: its label and logged steps in file order.
#[derive(Debug, Clone)]
pub struct Run {
    pub path: PathBuf,
    pub label: String,
    pub points: Vec<Point>,
}

impl Run {
    /// (x, y) pairs of `metric` against `x`, smoothed by a trailing moving average over `smooth`
    /// points (1 = raw).
    pub fn series(&self, x: XAxis, metric: Metric, smooth: usize) -> Vec<(f64, f64)> {
        let ys: Vec<f64> = self.points.iter().map(|p| metric.of(p)).collect();
        let w = smooth.max(1);
        let mut out = Vec::with_capacity(ys.len());
        let mut sum = 0.0;
        for (i, p) in self.points.iter().enumerate() {
            sum += ys[i];
            if i >= w {
                sum -= ys[i - w];
            }
            let n = (i + 1).min(w) as f64;
            out.push((x.of(p), sum / n));
        }
        out
    }
}

/// The label of a log when none is given: the name of its directory for `DIR/train_log.jsonl`
/// (a student or its `.work` dir), else the file stem.
pub fn default_label(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if stem == "train_log" || stem == "log" {
        if let Some(dir) = path.parent().and_then(|d| d.file_name()) {
            let d = dir.to_string_lossy();
            return d.strip_suffix(".work").unwrap_or(&d).to_string();
        }
    }
    stem
}

/// Default labels of several logs: [`default_label`] each; where two would be equal (the same
/// student name under different recipe directories, e.g. `…-fkl-clip-e1/W3G32` and
/// `…-cakld-clip-e1/W3G32`), the part of the parent directory names that differs is appended
/// ("W3G32 fkl", "W3G32 cakld").
pub fn default_labels(paths: &[&Path]) -> Vec<String> {
    let labels: Vec<String> = paths.iter().map(|p| default_label(p)).collect();
    let unique = labels
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        == labels.len();
    if unique {
        return labels;
    }
    let parents: Vec<Vec<String>> = paths
        .iter()
        .map(|p| {
            let dir = p
                .parent()
                .and_then(Path::parent)
                .and_then(Path::file_name)
                .map(|d| d.to_string_lossy().into_owned())
                .unwrap_or_default();
            dir.split('-').map(str::to_string).collect()
        })
        .collect();
    let shortest = parents.iter().map(Vec::len).min().unwrap_or(0);
    let prefix = (0..shortest)
        .take_while(|&i| parents.iter().all(|t| t[i] == parents[0][i]))
        .count();
    let suffix = (0..shortest - prefix)
        .take_while(|&i| {
            parents
                .iter()
                .all(|t| t[t.len() - 1 - i] == parents[0][parents[0].len() - 1 - i])
        })
        .count();
    labels
        .into_iter()
        .zip(parents)
        .map(|(label, toks)| {
            let middle = toks[prefix..toks.len() - suffix].join("-");
            if middle.is_empty() {
                label
            } else {
                format!("{label} {middle}")
            }
        })
        .collect()
}

fn number(
    path: &Path,
    line: usize,
    obj: &serde_json::Map<String, serde_json::Value>,
    field: &str,
) -> Result<f64> {
    let bad = |found: String| ReportError::BadField {
        path: path.to_path_buf(),
        line,
        field: field.into(),
        found,
    };
    match obj.get(field) {
        None => Err(bad("missing".into())),
        Some(serde_json::Value::Number(n)) => match n.as_f64() {
            Some(v) if v.is_finite() => Ok(v),
            _ => Err(bad(format!("{n}"))),
        },
        Some(other) => Err(bad(format!("{other}"))),
    }
}

/// Reads a training log. Blank lines are skipped; any other line must be a JSON object with
/// the six numeric fields. A log with no records is an error.
pub fn read_log(path: &Path, label: Option<String>) -> Result<Run> {
    let text = std::fs::read_to_string(path).map_err(|source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut points = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(raw).map_err(|e| ReportError::BadLine {
                path: path.to_path_buf(),
                line,
                what: e.to_string(),
            })?;
        let obj = value.as_object().ok_or_else(|| ReportError::BadLine {
            path: path.to_path_buf(),
            line,
            what: format!("found {value}"),
        })?;
        points.push(Point {
            step: number(path, line, obj, "step")?,
            tokens: number(path, line, obj, "tokens")?,
            loss: number(path, line, obj, "loss")?,
            lr: number(path, line, obj, "lr")?,
            grad_norm: number(path, line, obj, "grad_norm")?,
            tokens_per_s: number(path, line, obj, "tokens_per_s")?,
        });
    }
    if points.is_empty() {
        return Err(ReportError::EmptyLog {
            path: path.to_path_buf(),
        });
    }
    Ok(Run {
        path: path.to_path_buf(),
        label: label.unwrap_or_else(|| default_label(path)),
        points,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(losses: &[f64]) -> Run {
        let points = losses
            .iter()
            .enumerate()
            .map(|(i, &loss)| Point {
                step: (i + 1) as f64,
                tokens: 10.0 * (i + 1) as f64,
                loss,
                lr: 0.0,
                grad_norm: 0.0,
                tokens_per_s: 0.0,
            })
            .collect();
        Run {
            path: "x".into(),
            label: "x".into(),
            points,
        }
    }

    #[test]
    fn moving_average_is_trailing() {
        let s = run(&[4.0, 2.0, 6.0, 0.0]).series(XAxis::Tokens, Metric::Loss, 2);
        assert_eq!(s, vec![(10.0, 4.0), (20.0, 3.0), (30.0, 4.0), (40.0, 3.0)]);
        assert_eq!(
            run(&[1.0, 2.0]).series(XAxis::Step, Metric::Loss, 1),
            vec![(1.0, 1.0), (2.0, 2.0)]
        );
    }

    #[test]
    fn labels_come_from_the_student_dir() {
        assert_eq!(
            default_label(Path::new("out/students/w3-fkl/train_log.jsonl")),
            "w3-fkl"
        );
        assert_eq!(default_label(Path::new("out/w3.work/log.jsonl")), "w3");
        assert_eq!(default_label(Path::new("runs/cakld.jsonl")), "cakld");
        let a = Path::new("out/students/s260k-n4096-fkl-clip-e1-lr1e-3/W3G32/train_log.jsonl");
        let b = Path::new("out/students/s260k-n4096-cakld-clip-e1-lr1e-3/W3G32/train_log.jsonl");
        let c = Path::new("out/students/s260k-n4096-fkl-clip-e1-lr1e-3/W2G32/train_log.jsonl");
        assert_eq!(
            default_labels(&[a, b, c]),
            vec!["W3G32 fkl", "W3G32 cakld", "W2G32 fkl"]
        );
        assert_eq!(default_labels(&[a, c]), vec!["W3G32", "W2G32"]);
    }
}
