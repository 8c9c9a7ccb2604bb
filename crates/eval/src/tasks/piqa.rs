//! PIQA as lm-evaluation-harness formats it (`lm_eval/tasks/piqa/piqa.yaml`): context
//! `"Question: {goal}\nAnswer:"`, choices `[sol1, sol2]`, target delimiter `" "`.
//!
//! The file is the official `valid.jsonl` (`{"goal","sol1","sol2"}` per line); the gold labels
//! (0 or 1) are in `valid-labels.lst` beside it, line for line.

use super::io::{labels_path, read_jsonl, read_labels};
use super::McItem;
use crate::error::Result;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
struct Record {
    goal: String,
    sol1: String,
    sol2: String,
}

/// The harness's `doc_to_text`.
pub fn context(goal: &str) -> String {
    format!("Question: {goal}\nAnswer:")
}

/// Items of `path` and the files read (records, labels).
pub fn load(path: &Path) -> Result<(Vec<McItem>, Vec<PathBuf>)> {
    let records = read_jsonl::<Record>(path)?;
    let labels_file = labels_path(path);
    let labels = read_labels(&labels_file, records.len(), 2)?;
    let items = records
        .into_iter()
        .zip(labels)
        .map(|((line, r), gold)| {
            McItem::with_choices(context(&r.goal), vec![r.sol1, r.sol2], gold, line)
        })
        .collect();
    Ok((items, vec![path.to_path_buf(), labels_file]))
}

#[cfg(test)]
mod tests {
    use super::super::{real_file, Task};
    use super::*;

    #[test]
    fn first_validation_item_is_formatted_as_the_harness_does() {
        let (items, files) = load(&real_file(Task::Piqa)).unwrap();
        assert_eq!(items.len(), 1838);
        assert!(files[1].ends_with("piqa/valid-labels.lst"));
        let it = &items[0];
        assert_eq!(
            it.requests[0].0,
            "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
        );
        assert!(it.requests[0].1.starts_with(" Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips,"));
        assert!(it.choices[1].contains("ripped jeans material"));
        assert_eq!(it.gold, 0);
        assert_eq!(
            items[1].requests[1].1,
            " finish, woodgrain with  bobby pin "
        );
    }
}
