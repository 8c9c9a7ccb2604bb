//! ARC-Easy and ARC-Challenge as lm-evaluation-harness formats them
//! (`lm_eval/tasks/arc/arc_easy.yaml`, `arc_challenge.yaml` includes it): context
//! `"Question: {question}\nAnswer:"`, choices the choice texts, gold
//! `choices.label.index(answerKey)`, target delimiter `" "`.
//!
//! The file is in the AI2 ARC JSON-lines schema (`question.stem`, `question.choices[{text,
//! label}]`, `answerKey`); labels are letters or digits, and items have 3 to 5 choices.

use super::io::{line_error, read_jsonl};
use super::McItem;
use crate::error::Result;
use serde::Deserialize;
use std::path::Path;

#[derive(Deserialize)]
struct Record {
    question: Question,
    #[serde(rename = "answerKey")]
    answer_key: String,
}

#[derive(Deserialize)]
struct Question {
    stem: String,
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    text: String,
    label: String,
}

/// The harness's `doc_to_text`.
pub fn context(question: &str) -> String {
    format!("Question: {question}\nAnswer:")
}

pub fn load(path: &Path) -> Result<Vec<McItem>> {
    read_jsonl::<Record>(path)?
        .into_iter()
        .map(|(line, r)| {
            let labels: Vec<&str> = r
                .question
                .choices
                .iter()
                .map(|c| c.label.as_str())
                .collect();
            let gold = labels
                .iter()
                .position(|&l| l == r.answer_key)
                .ok_or_else(|| {
                    line_error(
                        path,
                        line,
                        format!(
                            "answerKey {:?} is not one of the choice labels {labels:?}",
                            r.answer_key
                        ),
                    )
                })?;
            if labels.len() < 2 {
                return Err(line_error(
                    path,
                    line,
                    format!("{} choices, expected 2 or more", labels.len()),
                ));
            }
            let choices = r.question.choices.into_iter().map(|c| c.text).collect();
            Ok(McItem::with_choices(
                context(&r.question.stem),
                choices,
                gold,
                line,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::{real_file, Task};
    use super::*;

    #[test]
    fn first_test_items_are_formatted_as_the_harness_does() {
        let items = load(&real_file(Task::ArcEasy)).unwrap();
        assert_eq!(items.len(), 2376);
        let it = &items[0]; // Mercury_417466, answerKey A
        assert_eq!(it.requests[0].0, "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:");
        assert_eq!(
            it.requests[0].1,
            " Sunlight is the source of energy for nearly all ecosystems."
        );
        assert_eq!((it.gold, it.choices.len()), (0, 4));
        let items = load(&real_file(Task::ArcChallenge)).unwrap();
        assert_eq!(items.len(), 1170);
        assert_eq!(items[0].gold, 2); // Mercury_7175875, answerKey C
        assert_eq!(items[0].choices[2], "Planetary days will become shorter.");
    }

    #[test]
    fn unknown_answer_key_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("arc.jsonl");
        let ok = r#"{"question": {"stem": "Q?", "choices": [{"text": "a", "label": "1"}, {"text": "b", "label": "2"}]}, "answerKey": "2"}"#;
        let bad = ok.replace(r#""answerKey": "2""#, r#""answerKey": "E""#);
        std::fs::write(&p, format!("{ok}\n{bad}\n")).unwrap();
        let err = load(&p).unwrap_err().to_string();
        assert!(
            err.ends_with(
                r#"arc.jsonl:2: answerKey "E" is not one of the choice labels ["1", "2"]"#
            ),
            "{err}"
        );
        std::fs::write(&p, format!("{ok}\n{{\"question\": 3}}\n")).unwrap();
        assert!(load(&p)
            .unwrap_err()
            .to_string()
            .contains("arc.jsonl:2: not a valid record"));
    }
}
