//! Zero-shot multiple-choice tasks: their files and their prompts, as lm-evaluation-harness
//! formats them (`lm_eval/tasks/*`, `output_type: multiple_choice`, `num_fewshot: 0`).
//!
//! Every item becomes one loglikelihood request per choice, `(context, continuation)`. For an
//! ordinary task the context is the task's `doc_to_text` and each continuation is
//! `target_delimiter + choice` with the harness's default delimiter `" "`; for a task with
//! `multiple_inputs` (WinoGrande) the choice is in the context and the continuation is fixed.
//! The `choices` strings are `doc_to_choice`'s: `acc_norm` divides by their character counts.

pub mod arc;
pub mod boolq;
pub mod hellaswag;
pub mod io;
pub mod piqa;
pub mod winogrande;

use crate::error::{EvalError, Result};
use qat_model::sha256_files;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The harness's `target_delimiter` default, put between context and choice.
pub const TARGET_DELIMITER: &str = " ";

/// A supported task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    Hellaswag,
    Piqa,
    ArcEasy,
    ArcChallenge,
    Boolq,
    Winogrande,
}

impl Task {
    pub const ALL: [Task; 6] = [
        Task::Hellaswag,
        Task::Piqa,
        Task::ArcEasy,
        Task::ArcChallenge,
        Task::Boolq,
        Task::Winogrande,
    ];

    /// The name on the command line and in the JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Task::Hellaswag => "hellaswag",
            Task::Piqa => "piqa",
            Task::ArcEasy => "arc-easy",
            Task::ArcChallenge => "arc-challenge",
            Task::Boolq => "boolq",
            Task::Winogrande => "winogrande",
        }
    }

    /// The task's name in lm-evaluation-harness.
    pub fn harness_name(self) -> &'static str {
        match self {
            Task::ArcEasy => "arc_easy",
            Task::ArcChallenge => "arc_challenge",
            t => t.name(),
        }
    }

    pub fn from_name(name: &str) -> Option<Task> {
        let n = name.trim().to_ascii_lowercase().replace('_', "-");
        Task::ALL.into_iter().find(|t| t.name() == n)
    }

    /// The file under the eval data dir (`$QAT_DATA/eval`) that the harness's split maps to.
    /// HellaSwag defaults to the uncompressed first 1000 validation items; the full set is
    /// `hellaswag/hellaswag_val_full.txt.bz2`, to be unpacked and given with `--task-file`.
    pub fn default_file(self) -> &'static str {
        match self {
            Task::Hellaswag => "hellaswag/hellaswag_val.first1000.txt",
            Task::Piqa => "piqa/valid.jsonl",
            Task::ArcEasy => "arc-easy/ARC-Easy-Test.jsonl",
            Task::ArcChallenge => "arc-challenge/ARC-Challenge-Test.jsonl",
            Task::Boolq => "boolq/dev.jsonl",
            Task::Winogrande => "winogrande/dev.jsonl",
        }
    }

    /// Whether the harness's task config lists `acc_norm` (BoolQ and WinoGrande list `acc` only).
    pub fn reports_acc_norm(self) -> bool {
        !matches!(self, Task::Boolq | Task::Winogrande)
    }

    /// Reads the task's items from `path` (and, for PIQA and WinoGrande, the labels file beside
    /// it). Every record is checked, also those past `limit`.
    pub fn load(self, path: &Path, limit: Option<usize>) -> Result<TaskData> {
        let (mut items, files) = match self {
            Task::Hellaswag => (hellaswag::load(path)?, vec![path.to_path_buf()]),
            Task::Piqa => piqa::load(path)?,
            Task::ArcEasy | Task::ArcChallenge => (arc::load(path)?, vec![path.to_path_buf()]),
            Task::Boolq => (boolq::load(path)?, vec![path.to_path_buf()]),
            Task::Winogrande => winogrande::load(path)?,
        };
        if let Some(n) = limit {
            items.truncate(n);
        }
        if items.is_empty() {
            return Err(EvalError::Config(format!(
                "--limit {} leaves no item of {}",
                limit.unwrap_or(0),
                self.name()
            )));
        }
        let sha256 = files
            .iter()
            .map(|f| sha256_files(std::slice::from_ref(f)))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(TaskData {
            task: self,
            files,
            sha256,
            items,
        })
    }
}

/// One multiple-choice item.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct McItem {
    /// `(context, continuation)` per choice, in choice order.
    pub requests: Vec<(String, String)>,
    /// The harness's `doc_to_choice` strings (for `acc_norm`, their lengths in characters).
    pub choices: Vec<String>,
    /// Index of the correct choice.
    pub gold: usize,
    /// Line of the item in its file (1-based; HellaSwag: the context line).
    pub line: usize,
}

impl McItem {
    /// An ordinary item: one context, continuation `" " + choice` for every choice.
    pub fn with_choices(context: String, choices: Vec<String>, gold: usize, line: usize) -> Self {
        let requests = choices
            .iter()
            .map(|c| (context.clone(), format!("{TARGET_DELIMITER}{c}")))
            .collect();
        Self {
            requests,
            choices,
            gold,
            line,
        }
    }
}

/// A task's items with the files they came from.
#[derive(Debug, Clone)]
pub struct TaskData {
    pub task: Task,
    pub files: Vec<PathBuf>,
    /// sha256 of each file in `files`.
    pub sha256: Vec<String>,
    pub items: Vec<McItem>,
}

/// The real data file of `task` (`$QAT_DATA/eval`, default `../shared/data/eval` beside the
/// repository), for tests that format real items.
#[cfg(test)]
pub(crate) fn real_file(task: Task) -> PathBuf {
    let data = match std::env::var_os("QAT_DATA") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"),
    };
    data.join("eval").join(task.default_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_accept_harness_spelling() {
        for t in Task::ALL {
            assert_eq!(Task::from_name(t.name()), Some(t));
            assert_eq!(Task::from_name(t.harness_name()), Some(t));
        }
        assert_eq!(Task::from_name("ARC_Easy"), Some(Task::ArcEasy));
        assert_eq!(Task::from_name("mmlu"), None);
    }

    #[test]
    fn ordinary_items_put_the_delimiter_before_each_choice() {
        let it = McItem::with_choices(
            "Q: x\nAnswer:".into(),
            vec!["no".into(), "yes".into()],
            1,
            7,
        );
        assert_eq!(
            it.requests,
            vec![
                ("Q: x\nAnswer:".to_string(), " no".to_string()),
                ("Q: x\nAnswer:".to_string(), " yes".to_string())
            ]
        );
    }
}
