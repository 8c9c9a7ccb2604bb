//! Shared helpers of the CLI tests: data paths, running the real binaries, comparing outputs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `$QAT_DATA`, or `../shared/data` beside the repository.
pub fn data_dir() -> PathBuf {
    match std::env::var_os("QAT_DATA") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data"),
    }
}

pub fn stories_dir() -> PathBuf {
    data_dir().join("models/stories260K")
}

/// Runs `qat-sample` with `args`; returns the process output.
pub fn qat_sample(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qat-sample")).args(args).output().expect("spawn qat-sample")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts a successful run and parses its JSON summary.
pub fn ok_json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "failed: {}", stderr(out));
    serde_json::from_slice(&out.stdout).expect("JSON summary on stdout")
}

/// Asserts exit code 2 and a single `tool: ...` message containing `needle`.
pub fn assert_error(out: &Output, tool: &str, needle: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "expected exit 2, stderr: {err}");
    assert!(err.starts_with(&format!("{tool}: ")), "stderr not prefixed by {tool}: {err}");
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    assert!(out.stdout.is_empty(), "stdout not empty on error");
}

/// Sorted (name, bytes) of every file in `dir`.
pub fn dir_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

/// Names of the files in `dir` (empty if it does not exist).
pub fn names(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => {
            let mut v: Vec<String> = rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
            v.sort();
            v
        }
        Err(_) => Vec::new(),
    }
}

/// Runs `qat-eval` with `args`.
pub fn qat_eval(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qat-eval")).args(args).output().expect("spawn qat-eval")
}

pub fn tinystories() -> PathBuf {
    data_dir().join("corpora/tinystories/TinyStories-valid.first800.txt")
}

/// Runs `qat-distill` with `args`.
pub fn qat_distill(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qat-distill")).args(args).output().expect("spawn qat-distill")
}

/// Small data-free shards of stories260K in `dir` (32 sequences of up to 48 tokens, K = 16).
pub fn small_shards(dir: &Path) {
    let model = stories_dir();
    ok_json(&qat_sample(&[
        "--model", model.to_str().unwrap(), "--out", dir.to_str().unwrap(), "-n", "32", "--max-len", "48", "-K", "16",
        "--batch-size", "8", "--seqs-per-file", "8", "-q",
    ]));
}

/// Runs `qat-clip` with `args`.
pub fn qat_clip(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qat-clip")).args(args).output().expect("spawn qat-clip")
}

/// Writes a scheme JSON for stories260K: `kind` weights with `bits` in groups of 32, `down_proj`
/// (in_features 172 = 4 · 43) in groups of 43. Returns its path.
pub fn group_scheme(dir: &Path, kind: &str, bits: u8) -> PathBuf {
    let path = dir.join(format!("{kind}{bits}.json"));
    let json = format!(
        r#"{{"format_version": 1, "weight": {{"bits": {bits}, "format": {{"kind": "{kind}", "group_size": 32}}}},
            "overrides": [{{"pattern": "layers.*.mlp.down_proj", "weight": {{"bits": {bits}, "format": {{"kind": "{kind}", "group_size": 43}}}}}}]}}"#
    );
    std::fs::write(&path, json).unwrap();
    path
}
