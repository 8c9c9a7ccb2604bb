//! Reading task files: UTF-8 lines and JSON lines with errors that name the file and line.

use crate::error::{EvalError, Result};
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// The lines of a UTF-8 text file, numbered from 1, without their line endings.
pub fn read_lines(path: &Path) -> Result<Vec<(usize, String)>> {
    let bytes =
        std::fs::read(path).map_err(|e| file_error(path, format!("cannot read task file: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        file_error(
            path,
            format!(
                "not UTF-8: invalid byte at offset {}",
                e.utf8_error().valid_up_to()
            ),
        )
    })?;
    Ok(text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.strip_suffix('\r').unwrap_or(l).to_string()))
        .collect())
}

/// Parses every non-blank line of `path` as one JSON record of type `T`.
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<(usize, T)>> {
    let lines = read_lines(path)?;
    let mut out = Vec::with_capacity(lines.len());
    for (line, text) in lines {
        if text.trim().is_empty() {
            continue;
        }
        let rec = serde_json::from_str(&text)
            .map_err(|e| line_error(path, line, format!("not a valid record: {e}")))?;
        out.push((line, rec));
    }
    if out.is_empty() {
        return Err(file_error(path, "no records".into()));
    }
    Ok(out)
}

/// A labels file (`valid-labels.lst`): one integer per line, each in `0..choices`, and exactly
/// as many labels as `records`.
pub fn read_labels(path: &Path, records: usize, choices: usize) -> Result<Vec<usize>> {
    let lines = read_lines(path)?;
    let mut labels = Vec::with_capacity(lines.len());
    for (line, text) in &lines {
        let t = text.trim();
        if t.is_empty() {
            continue;
        }
        let v: usize = t.parse().ok().filter(|&v| v < choices).ok_or_else(|| {
            line_error(
                path,
                *line,
                format!("label {t:?} is not an integer in 0..{choices}"),
            )
        })?;
        labels.push(v);
    }
    if labels.len() != records {
        return Err(file_error(
            path,
            format!("{} labels for {records} records", labels.len()),
        ));
    }
    Ok(labels)
}

/// The labels file beside a JSON-lines file: `valid.jsonl` → `valid-labels.lst`.
pub fn labels_path(jsonl: &Path) -> PathBuf {
    let stem = jsonl
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    jsonl.with_file_name(format!("{stem}-labels.lst"))
}

pub fn file_error(path: &Path, what: String) -> EvalError {
    EvalError::TaskFile {
        path: path.to_path_buf(),
        what,
    }
}

pub fn line_error(path: &Path, line: usize, what: String) -> EvalError {
    EvalError::TaskLine {
        path: path.to_path_buf(),
        line,
        what,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_path_sits_beside_the_records() {
        assert_eq!(
            labels_path(Path::new("/d/piqa/valid.jsonl")),
            Path::new("/d/piqa/valid-labels.lst")
        );
        assert_eq!(
            labels_path(Path::new("dev.jsonl")),
            Path::new("dev-labels.lst")
        );
    }

    #[test]
    fn bad_label_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.lst");
        std::fs::write(&p, "0\n1\n2\n").unwrap();
        let err = read_labels(&p, 3, 2).unwrap_err().to_string();
        assert!(
            err.ends_with("l.lst:3: label \"2\" is not an integer in 0..2"),
            "{err}"
        );
        std::fs::write(&p, "0\n1\n").unwrap();
        let err = read_labels(&p, 3, 2).unwrap_err().to_string();
        assert!(err.ends_with("l.lst: 2 labels for 3 records"), "{err}");
    }
}
