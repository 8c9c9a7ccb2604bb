//! Evaluation corpora: a UTF-8 text file read whole, split into documents or kept as a stream.

use crate::error::{EvalError, Result};
use qat_model::sha256_files;
use std::path::{Path, PathBuf};

/// A text corpus and its identity.
#[derive(Debug, Clone)]
pub struct Corpus {
    pub path: PathBuf,
    pub sha256: String,
    pub text: String,
}

impl Corpus {
    /// Reads `path`; a file that is not valid UTF-8 is an error naming the byte offset.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| EvalError::Corpus {
            path: path.to_path_buf(),
            what: format!("cannot read corpus: {e}"),
        })?;
        let text = String::from_utf8(bytes).map_err(|e| EvalError::Corpus {
            path: path.to_path_buf(),
            what: format!(
                "not UTF-8: invalid byte at offset {}",
                e.utf8_error().valid_up_to()
            ),
        })?;
        let sha256 = sha256_files(&[path.to_path_buf()])?;
        Ok(Self {
            path: path.to_path_buf(),
            sha256,
            text,
        })
    }

    /// Documents separated by `delimiter`, whitespace-trimmed, empty ones dropped.
    pub fn documents(&self, delimiter: &str) -> Vec<&str> {
        self.text
            .split(delimiter)
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_split_trimmed_and_non_empty() {
        let c = Corpus {
            path: "x".into(),
            sha256: String::new(),
            text: "a b\n<|endoftext|>\n  c\n<|endoftext|>\n\n".into(),
        };
        assert_eq!(c.documents("<|endoftext|>"), vec!["a b", "c"]);
    }
}
