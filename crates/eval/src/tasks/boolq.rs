//! BoolQ as lm-evaluation-harness formats it (`lm_eval/tasks/super_glue/boolq/default.yaml`):
//! context `"{passage}\nQuestion: {question}?\nAnswer:"`, choices `["no", "yes"]`, gold the
//! label (`answer` true → 1), target delimiter `" "`. The harness lists `acc` only.
//!
//! The file is the official BoolQ `dev.jsonl` (`{"question","title","answer","passage"}`).

use super::io::read_jsonl;
use super::McItem;
use crate::error::Result;
use serde::Deserialize;
use std::path::Path;

#[derive(Deserialize)]
struct Record {
    question: String,
    passage: String,
    answer: bool,
}

/// The harness's `doc_to_text`.
pub fn context(passage: &str, question: &str) -> String {
    format!("{passage}\nQuestion: {question}?\nAnswer:")
}

pub fn load(path: &Path) -> Result<Vec<McItem>> {
    Ok(read_jsonl::<Record>(path)?
        .into_iter()
        .map(|(line, r)| {
            McItem::with_choices(
                context(&r.passage, &r.question),
                vec!["no".into(), "yes".into()],
                r.answer as usize,
                line,
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::super::{real_file, Task};
    use super::*;

    #[test]
    fn first_dev_item_is_formatted_as_the_harness_does() {
        let items = load(&real_file(Task::Boolq)).unwrap();
        assert_eq!(items.len(), 3270);
        let it = &items[0];
        assert!(it.requests[0]
            .0
            .starts_with("All biomass goes through at least some of these steps:"));
        assert!(
            it.requests[0].0.ends_with(
                "\nQuestion: does ethanol take more energy make that produces?\nAnswer:"
            ),
            "{}",
            it.requests[0].0
        );
        assert_eq!(
            (it.requests[0].1.as_str(), it.requests[1].1.as_str()),
            (" no", " yes")
        );
        assert_eq!(it.gold, 0); // "answer": false
    }
}
