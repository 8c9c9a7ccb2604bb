//! Prompt files for prompt mode: JSON lines with a `text` field, or one prompt per line.

use crate::error::{Result, SampleError};
use std::path::Path;

/// Reads prompts from `path`. A file whose first non-empty line starts with `{` is JSON lines
/// and every non-empty line must be an object with a string `text`; otherwise every non-empty
/// line is a prompt.
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(|source| SampleError::Io {
        path: path.to_path_buf(),
        what: "cannot read prompts file",
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|e| SampleError::Prompts {
        path: path.to_path_buf(),
        what: format!(
            "not UTF-8 (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ),
    })?;
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .collect();
    let jsonl = lines
        .first()
        .is_some_and(|(_, l)| l.trim_start().starts_with('{'));
    let mut prompts = Vec::with_capacity(lines.len());
    for (i, line) in lines {
        if !jsonl {
            prompts.push(line.to_string());
            continue;
        }
        let bad = |what: String| SampleError::Prompts {
            path: path.to_path_buf(),
            what: format!("line {}: {what}", i + 1),
        };
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        match v.get("text").and_then(|t| t.as_str()) {
            Some(t) => prompts.push(t.to_string()),
            None => return Err(bad("no string field \"text\"".into())),
        }
    }
    if prompts.is_empty() {
        return Err(SampleError::Prompts {
            path: path.to_path_buf(),
            what: "no prompts in file".into(),
        });
    }
    Ok(prompts)
}
