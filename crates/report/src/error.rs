//! Typed errors of qat-report; every message names the file (and line) and what was expected.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: not a JSON object: {what}")]
    BadLine {
        path: PathBuf,
        line: usize,
        what: String,
    },
    #[error("{path}:{line}: field \"{field}\" is {found}, expected a finite number")]
    BadField {
        path: PathBuf,
        line: usize,
        field: String,
        found: String,
    },
    #[error("{path}: empty training log (no records; expected one JSON object per line, as qat-distill writes)")]
    EmptyLog { path: PathBuf },
    #[error("{path}: no points left to plot ({why})")]
    NothingToPlot { path: PathBuf, why: String },
    #[error("{path}: not an eval JSON: {what}")]
    BadEval { path: PathBuf, what: String },
    #[error("{labels} --label values for {logs} logs (expected none or one per log)")]
    LabelCount { labels: usize, logs: usize },
    #[error("{0} runs to plot, at most {max} are supported", max = crate::plot::PALETTE.len())]
    TooManyRuns(usize),
    #[error("image size {width}x{height} out of range (expected 200..=8000 pixels each)")]
    ImageSize { width: u32, height: u32 },
    #[error("drawing the chart failed: {0}")]
    Draw(String),
}

pub type Result<T> = std::result::Result<T, ReportError>;
