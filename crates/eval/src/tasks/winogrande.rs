//! WinoGrande as lm-evaluation-harness formats it (`lm_eval/tasks/winogrande/default.yaml`,
//! `preprocess_winogrande.py`): partial evaluation with `multiple_inputs`. For each option the
//! context is the sentence up to the blank `_` with the option in its place; the continuation
//! is fixed: `" " + (the sentence after the blank).strip()`, and only it is scored. The
//! `doc_to_choice` strings are the two partial contexts. The harness lists `acc` only.
//!
//! The file is `dev.jsonl` (`{"qID","sentence","option1","option2","answer"}`); the gold
//! answers (1 or 2) are in `dev-labels.lst` beside it, and must agree with `answer` where a
//! record has one.

use super::io::{labels_path, line_error, read_jsonl, read_lines};
use super::{McItem, TARGET_DELIMITER};
use crate::error::Result;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
struct Record {
    sentence: String,
    option1: String,
    option2: String,
    answer: Option<String>,
}

/// The two `(context, continuation)` requests of a sentence with a blank, or None if it has none.
pub fn requests(sentence: &str, options: [&str; 2]) -> Option<Vec<(String, String)>> {
    let blank = sentence.find('_')?;
    let target = format!("{TARGET_DELIMITER}{}", sentence[blank + 1..].trim());
    Some(
        options
            .iter()
            .map(|o| (format!("{}{o}", &sentence[..blank]), target.clone()))
            .collect(),
    )
}

/// Items of `path` and the files read (records, labels).
pub fn load(path: &Path) -> Result<(Vec<McItem>, Vec<PathBuf>)> {
    let records = read_jsonl::<Record>(path)?;
    let labels_file = labels_path(path);
    let labels = read_lines(&labels_file)?;
    let labels: Vec<&(usize, String)> = labels
        .iter()
        .filter(|(_, l)| !l.trim().is_empty())
        .collect();
    if labels.len() != records.len() {
        return Err(super::io::file_error(
            &labels_file,
            format!(
                "{} labels for {} records in {}",
                labels.len(),
                records.len(),
                path.display()
            ),
        ));
    }
    let mut items = Vec::with_capacity(records.len());
    for ((line, r), (label_line, label)) in records.into_iter().zip(labels) {
        let label = label.trim();
        let gold = match label {
            "1" => 0,
            "2" => 1,
            _ => {
                return Err(line_error(
                    &labels_file,
                    *label_line,
                    format!("label {label:?} is not 1 or 2"),
                ))
            }
        };
        if let Some(a) = r.answer.as_deref().filter(|a| !a.is_empty()) {
            if a != label {
                return Err(line_error(
                    path,
                    line,
                    format!(
                        "answer {a:?} disagrees with {}:{label_line} ({label:?})",
                        labels_file.display()
                    ),
                ));
            }
        }
        let requests = requests(&r.sentence, [&r.option1, &r.option2])
            .ok_or_else(|| line_error(path, line, "sentence has no blank \"_\"".into()))?;
        let choices = requests.iter().map(|(c, _)| c.clone()).collect();
        items.push(McItem {
            requests,
            choices,
            gold,
            line,
        });
    }
    Ok((items, vec![path.to_path_buf(), labels_file]))
}

#[cfg(test)]
mod tests {
    use super::super::{real_file, Task};
    use super::*;

    #[test]
    fn first_dev_item_is_a_partial_evaluation() {
        let (items, _) = load(&real_file(Task::Winogrande)).unwrap();
        assert_eq!(items.len(), 1267);
        let it = &items[0];
        assert_eq!(
            it.requests[0],
            (
                "Sarah was a much better surgeon than Maria so Sarah".to_string(),
                " always got the easier cases.".to_string()
            )
        );
        assert_eq!(
            it.requests[1].0,
            "Sarah was a much better surgeon than Maria so Maria"
        );
        assert_eq!(it.requests[1].1, it.requests[0].1);
        assert_eq!(
            it.choices[1],
            "Sarah was a much better surgeon than Maria so Maria"
        );
        assert_eq!(it.gold, 1); // answer "2"
    }

    #[test]
    fn disagreeing_answer_names_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dev.jsonl");
        std::fs::write(&p, "{\"sentence\": \"A _ b.\", \"option1\": \"x\", \"option2\": \"y\", \"answer\": \"1\"}\n").unwrap();
        std::fs::write(dir.path().join("dev-labels.lst"), "2\n").unwrap();
        let err = load(&p).unwrap_err().to_string();
        assert!(
            err.contains("dev.jsonl:1: answer \"1\" disagrees with")
                && err.ends_with("dev-labels.lst:1 (\"2\")"),
            "{err}"
        );
    }
}
