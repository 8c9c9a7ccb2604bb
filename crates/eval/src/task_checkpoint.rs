//! The zero-shot checkpoint (`qat-eval --task ... --checkpoint FILE`): every scored batch of
//! log-likelihood requests is appended to FILE as one JSON line, so that an interrupted
//! evaluation continues after its last complete line and ends with the scores, to the bit, of
//! an uninterrupted run.
//!
//! Line 1 is a header with the format and a key: the sha256 of the settings that change the
//! scores (weights, scheme, dtype, device, batch size, context length). Every other line is one
//! batch of one task: the task's name, the sha256 of its requests' tokens, the batch's index
//! (batches run in a fixed order, so they are saved in order) and each request's score, `ll`
//! as its f64 bits. A line cut short by a kill is dropped on resume. Gold labels are not in the
//! file: they are applied to the scores afterwards.

use crate::error::{EvalError, Result};
use crate::loglikelihood::{EncodedPair, Loglikelihood};
use qat_shards::fsutil::write_atomic;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const FORMAT: &str = "qat-eval-tasks-checkpoint/1";

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: String,
    key: String,
}

/// One request's score, as saved.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct SavedScore {
    /// Index of the request in the task's list.
    i: usize,
    ll_bits: u64,
    tokens: usize,
    continuation_tokens: usize,
    greedy: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct BatchLine {
    task: String,
    requests_sha256: String,
    batch: usize,
    scores: Vec<SavedScore>,
}

/// The saved batches of a task, in order: `(request index, score)` pairs.
type Batches = Vec<Vec<(usize, Loglikelihood)>>;

/// An open checkpoint: the batches saved so far, and the file to append to.
#[derive(Debug)]
pub struct TaskCheckpoint {
    pub path: PathBuf,
    /// Per task: its requests' sha256 and the scores of its saved batches, in order.
    saved: Mutex<HashMap<String, (String, Batches)>>,
    file: Mutex<std::fs::File>,
}

/// sha256 (hex) of a task's requests: every request's context and continuation tokens.
pub fn requests_sha256(requests: &[EncodedPair]) -> String {
    let mut h = Sha256::new();
    h.update((requests.len() as u64).to_le_bytes());
    for r in requests {
        for part in [&r.context, &r.continuation] {
            h.update((part.len() as u64).to_le_bytes());
            for t in part {
                h.update(t.to_le_bytes());
            }
        }
    }
    hex::encode(h.finalize())
}

impl TaskCheckpoint {
    /// Opens the checkpoint at `path` for an evaluation under `settings`: reads the batches an
    /// interrupted run saved (refusing another evaluation's file), or starts a new file.
    pub fn open(path: &Path, settings: &serde_json::Value) -> Result<Self> {
        let key = hex::encode(Sha256::digest(settings.to_string().as_bytes()));
        let error = |what: String| EvalError::Checkpoint {
            path: path.to_path_buf(),
            what,
        };
        let mut saved: HashMap<String, (String, Batches)> = HashMap::new();
        let text = match std::fs::read_to_string(path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(error(format!("cannot read: {e}"))),
        };
        let mut kept = String::new();
        match &text {
            Some(text) => {
                // Complete lines only: a kill can cut the last one short.
                let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
                let mut lines = complete.lines();
                let header: Header = lines
                    .next()
                    .and_then(|l| serde_json::from_str(l).ok())
                    .ok_or_else(|| error("not a qat-eval checkpoint (no header line)".into()))?;
                if header.format != FORMAT {
                    return Err(error(format!(
                        "format {:?}, expected {FORMAT:?}",
                        header.format
                    )));
                }
                if header.key != key {
                    return Err(error("made by an evaluation with other weights or settings (key differs); delete it to start over".into()));
                }
                kept.push_str(&serde_json::to_string(&header).expect("json"));
                kept.push('\n');
                for (n, line) in lines.enumerate() {
                    let b: BatchLine = serde_json::from_str(line)
                        .map_err(|e| error(format!("line {}: {e}", n + 2)))?;
                    let entry = saved
                        .entry(b.task.clone())
                        .or_insert_with(|| (b.requests_sha256.clone(), Vec::new()));
                    if entry.0 != b.requests_sha256 || b.batch != entry.1.len() {
                        return Err(error(format!(
                            "line {}: batch {} of {} does not follow the saved ones",
                            n + 2,
                            b.batch,
                            b.task
                        )));
                    }
                    entry
                        .1
                        .push(b.scores.iter().map(|s| (s.i, s.score())).collect());
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
            None => {
                let header = Header {
                    format: FORMAT.into(),
                    key,
                };
                kept.push_str(&serde_json::to_string(&header).expect("json"));
                kept.push('\n');
            }
        }
        // (Re)write the complete lines atomically, then append from there.
        if text.as_deref() != Some(kept.as_str()) {
            write_atomic(path, kept.as_bytes())?;
        }
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| error(format!("cannot open for appending: {e}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            saved: Mutex::new(saved),
            file: Mutex::new(file),
        })
    }

    /// The saved batches of `task`, whose requests hash to `requests_sha256`; an error if the
    /// file holds that task with other requests.
    pub(crate) fn saved(&self, task: &str, requests_sha256: &str) -> Result<Batches> {
        match self.saved.lock().expect("checkpoint lock").get(task) {
            Some((sha, _)) if sha != requests_sha256 => Err(EvalError::Checkpoint {
                path: self.path.clone(),
                what: format!("holds task {task} with other requests (other items, --limit or tokenizer); delete it to start over"),
            }),
            Some((_, batches)) => Ok(batches.clone()),
            None => Ok(Vec::new()),
        }
    }

    /// Appends batch `batch` of `task`: `(request index, score)` pairs.
    pub(crate) fn append(
        &self,
        task: &str,
        requests_sha256: &str,
        batch: usize,
        scores: &[(usize, Loglikelihood)],
    ) -> Result<()> {
        let line = BatchLine {
            task: task.into(),
            requests_sha256: requests_sha256.into(),
            batch,
            scores: scores
                .iter()
                .map(|&(i, s)| SavedScore {
                    i,
                    ll_bits: s.ll.to_bits(),
                    tokens: s.tokens,
                    continuation_tokens: s.continuation_tokens,
                    greedy: s.greedy,
                })
                .collect(),
        };
        let mut text = serde_json::to_string(&line).expect("json");
        text.push('\n');
        let mut file = self.file.lock().expect("checkpoint lock");
        file.write_all(text.as_bytes())
            .and_then(|()| file.flush())
            .map_err(|e| EvalError::Checkpoint {
                path: self.path.clone(),
                what: format!("cannot append: {e}"),
            })
    }
}

impl SavedScore {
    fn score(&self) -> Loglikelihood {
        Loglikelihood {
            ll: f64::from_bits(self.ll_bits),
            tokens: self.tokens,
            continuation_tokens: self.continuation_tokens,
            greedy: self.greedy,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(ll: f64) -> Loglikelihood {
        Loglikelihood {
            ll,
            tokens: 2,
            continuation_tokens: 3,
            greedy: true,
        }
    }

    #[test]
    fn batches_survive_a_reopen_and_a_torn_last_line_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.ckpt");
        let settings = serde_json::json!({"batch_size": 2});
        let pair = |cont: u32| EncodedPair {
            context: vec![1, 2],
            continuation: vec![cont],
        };
        let sha = requests_sha256(&[pair(3)]);
        let ck = TaskCheckpoint::open(&path, &settings).unwrap();
        assert!(ck.saved("piqa", &sha).unwrap().is_empty());
        let ll = 0.1f64 + 0.2;
        ck.append("piqa", &sha, 0, &[(0, score(ll))]).unwrap();
        ck.append("piqa", &sha, 1, &[(1, score(-2.5))]).unwrap();
        drop(ck);
        // A kill in the middle of a third line.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"task\":\"piqa\",\"requ").unwrap();
        drop(f);
        let ck = TaskCheckpoint::open(&path, &settings).unwrap();
        let saved = ck.saved("piqa", &sha).unwrap();
        assert_eq!(saved.len(), 2);
        assert_eq!(saved[0][0].1.ll.to_bits(), ll.to_bits());
        assert_eq!(saved[1][0], (1, score(-2.5)));
        assert!(!std::fs::read_to_string(&path).unwrap().contains("requ\""));
        // The same task with other requests, or other settings: refused.
        let other = requests_sha256(&[pair(4)]);
        let err = ck.saved("piqa", &other).unwrap_err().to_string();
        assert!(err.contains("other requests"), "{err}");
        let err = TaskCheckpoint::open(&path, &serde_json::json!({"batch_size": 4}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("key differs"), "{err}");
        crate::checkpoint::remove(&path).unwrap();
        assert!(!path.exists());
    }
}
