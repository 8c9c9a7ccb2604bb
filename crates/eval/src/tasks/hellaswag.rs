//! HellaSwag as lm-evaluation-harness formats it (`lm_eval/tasks/hellaswag/hellaswag.yaml`,
//! `utils.py`): the query is `preprocess(activity_label + ": " + ctx_a + " " +
//! ctx_b.capitalize())`, the choices are the preprocessed endings, `target_delimiter` `" "`.
//!
//! The file is llama.cpp's `--hellaswag` text format (six lines per item: `activity_label:
//! ctx`, the gold index 0-3, four endings), where `ctx` is the dataset's `ctx` field, i.e.
//! `ctx_a + " " + ctx_b` with `ctx_b` not capitalized. [`harness_query`] restores the
//! capitalization: `ctx_b` is the fragment after the context's last sentence end (". ", "? ",
//! "! "), and when that fragment begins with a lowercase letter (ActivityNet items, where
//! `ctx_b` begins the unfinished sentence) it is capitalized as Python's `str.capitalize` does.
//! A fragment that begins in upper case is left alone (WikiHow items, whose `ctx_b` is empty).

use super::io::{file_error, line_error, read_lines};
use super::McItem;
use crate::error::Result;
use std::path::Path;

/// Lines per item: context, label, four endings.
pub const LINES_PER_ITEM: usize = 6;

pub fn load(path: &Path) -> Result<Vec<McItem>> {
    let mut lines = read_lines(path)?;
    while lines.last().is_some_and(|(_, l)| l.trim().is_empty()) {
        lines.pop();
    }
    if lines.is_empty() || lines.len() % LINES_PER_ITEM != 0 {
        return Err(file_error(
            path,
            format!("{} lines, expected a multiple of {LINES_PER_ITEM} (context, label, 4 endings per item)", lines.len()),
        ));
    }
    lines
        .chunks(LINES_PER_ITEM)
        .map(|chunk| {
            let (ctx_line, ctx) = &chunk[0];
            let (label_line, label) = &chunk[1];
            if ctx.trim().is_empty() {
                return Err(line_error(path, *ctx_line, "empty context line".into()));
            }
            let gold: usize = label
                .trim()
                .parse()
                .ok()
                .filter(|&g| g < 4)
                .ok_or_else(|| {
                    line_error(
                        path,
                        *label_line,
                        format!("label {label:?} is not an integer in 0..4"),
                    )
                })?;
            let choices = chunk[2..].iter().map(|(_, e)| preprocess(e)).collect();
            Ok(McItem::with_choices(
                harness_query(ctx),
                choices,
                gold,
                *ctx_line,
            ))
        })
        .collect()
}

/// The harness's query from a `activity_label: ctx` line (see the module doc).
pub fn harness_query(line: &str) -> String {
    preprocess(&capitalize_ctx_b(line))
}

/// Capitalizes the fragment after the last sentence end if it begins in lower case.
pub fn capitalize_ctx_b(line: &str) -> String {
    let start = [". ", "? ", "! "]
        .iter()
        .filter_map(|sep| line.rfind(sep).map(|i| i + sep.len()))
        .max();
    let Some(start) = start else {
        return line.to_string();
    };
    let fragment = &line[start..];
    if !fragment.chars().next().is_some_and(char::is_lowercase) {
        return line.to_string();
    }
    format!("{}{}", &line[..start], py_capitalize(fragment))
}

/// Python's `str.capitalize`: first character upper case, the rest lower case.
pub fn py_capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        None => String::new(),
        Some(first) => first
            .to_uppercase()
            .chain(chars.flat_map(char::to_lowercase))
            .collect(),
    }
}

/// The harness's `preprocess`: strip, `" [title]"` → `". "`, drop `[...]` (non-greedy, within
/// a line), then replace double spaces by single ones (one pass, as Python's `str.replace`).
pub fn preprocess(text: &str) -> String {
    let t = text.trim().replace(" [title]", ". ");
    let mut out = String::with_capacity(t.len());
    let mut rest = t.as_str();
    while let Some(open) = rest.find('[') {
        match rest[open..].find(']') {
            Some(close) => {
                out.push_str(&rest[..open]);
                rest = &rest[open + close + 1..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out.replace("  ", " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first validation item (ind 24), whose dataset record has ctx_a "A man is sitting on a
    /// roof." and ctx_b "he": the harness's query is "...on a roof. He".
    #[test]
    fn first_validation_item_is_formatted_as_the_harness_does() {
        let items = load(&super::super::real_file(super::super::Task::Hellaswag)).unwrap();
        assert_eq!(items.len(), 1000);
        let it = &items[0];
        assert_eq!(it.gold, 3);
        assert_eq!(
            it.requests[0].0,
            "Roof shingle removal: A man is sitting on a roof. He"
        );
        assert_eq!(it.requests[3].1, " starts pulling up roofing on a roof.");
        assert_eq!(it.choices[1], "is ripping level tiles off.");
    }

    #[test]
    fn ctx_b_is_capitalized_like_python() {
        assert_eq!(
            capitalize_ctx_b("Clean and jerk: A lady walks. She bends down. the lady"),
            "Clean and jerk: A lady walks. She bends down. The lady"
        );
        // capitalize() lowercases the rest of ctx_b.
        assert_eq!(
            capitalize_ctx_b("X: A man. the man in Red"),
            "X: A man. The man in red"
        );
        // An upper-case fragment belongs to ctx_a: untouched (ctx_b empty).
        assert_eq!(
            capitalize_ctx_b("Family Life: How to play. Choose small games like Candy Land and"),
            "Family Life: How to play. Choose small games like Candy Land and"
        );
        assert_eq!(
            capitalize_ctx_b("no sentence end here"),
            "no sentence end here"
        );
    }

    #[test]
    fn preprocess_follows_the_harness() {
        assert_eq!(
            preprocess(" How to x [title] Do y. [step] Go  on "),
            "How to x. Do y. Go on"
        );
        assert_eq!(preprocess("Visit [www.kiddio.org] now"), "Visit now");
        assert_eq!(preprocess("tap the \" [\" button"), "tap the \" [\" button");
        assert_eq!(preprocess("a   b"), "a  b");
    }

    #[test]
    fn bad_label_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hs.txt");
        std::fs::write(
            &p,
            "A: b. c\n0\ne1\ne2\ne3\ne4\nA: b. c\n4\ne1\ne2\ne3\ne4\n",
        )
        .unwrap();
        let err = load(&p).unwrap_err().to_string();
        assert!(
            err.ends_with("hs.txt:8: label \"4\" is not an integer in 0..4"),
            "{err}"
        );
        std::fs::write(&p, "A: b. c\n0\ne1\ne2\n").unwrap();
        let err = load(&p).unwrap_err().to_string();
        assert!(err.contains("4 lines, expected a multiple of 6"), "{err}");
    }
}
