//! Markdown tables of eval JSONs: qat-eval's perplexity summaries (one row each, `x FP` against
//! a full-precision reference) and zero-shot task results (`task` + accuracy fields).

use crate::error::{ReportError, Result};
use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// A qat-eval perplexity summary (unknown fields are ignored).
#[derive(Debug, Clone)]
pub struct PplRecord {
    pub path: PathBuf,
    pub model: String,
    pub scheme: String,
    pub quantization: String,
    pub ppl: f64,
    pub nll: f64,
    pub tokens: u64,
    pub corpus_sha256: String,
}

/// A zero-shot task result: a task name and its accuracy fields.
#[derive(Debug, Clone)]
pub struct ZeroShotRecord {
    pub path: PathBuf,
    pub model: String,
    pub scheme: String,
    pub quantization: String,
    pub task: String,
    /// (name, value) of every `acc*` field, in name order.
    pub metrics: Vec<(String, f64)>,
    pub examples: Option<u64>,
}

#[derive(Debug, Clone)]
pub enum EvalRecord {
    Ppl(PplRecord),
    ZeroShot(Vec<ZeroShotRecord>),
}

fn bad(path: &Path, what: impl Into<String>) -> ReportError {
    ReportError::BadEval {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

/// A short name for a scheme: the `scheme` field when it is one (W4A8KV4, FP, ...), else built
/// from `scheme_json` (W3G32 asym, NF3G32, + overrides).
fn scheme_name(v: &Value) -> String {
    let s = v.get("scheme").and_then(Value::as_str).unwrap_or("");
    if !s.is_empty() && !s.trim_start().starts_with('{') {
        return s.to_string();
    }
    let Some(j) = v
        .get("scheme_json")
        .filter(|j| j.is_object())
        .or_else(|| v.get("scheme").filter(|j| j.is_object()))
    else {
        return if s.is_empty() {
            "?".into()
        } else {
            s.chars().take(40).collect()
        };
    };
    let bits = |k: &str| j.get(k).and_then(|a| a.get("bits")).and_then(Value::as_u64);
    let mut name = String::new();
    match j.get("weight").filter(|w| !w.is_null()) {
        None => name.push_str("W16"),
        Some(w) => {
            let b = w.get("bits").and_then(Value::as_u64).unwrap_or(0);
            let f = w.get("format").cloned().unwrap_or(Value::Null);
            let kind = f
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or("sym_per_channel");
            let g = f.get("group_size").and_then(Value::as_u64);
            let gs = g.map(|g| format!("G{g}")).unwrap_or_default();
            match kind {
                "nf3" | "nf4" => write!(name, "{}{gs}", kind.to_uppercase()),
                "asym_group" => write!(
                    name,
                    "W{b}{} asym",
                    if gs.is_empty() { "CH".to_string() } else { gs }
                ),
                _ => write!(name, "W{b}{gs}"),
            }
            .expect("string");
        }
    }
    if let Some(a) = bits("act") {
        write!(name, " A{a}").expect("string");
    }
    if let Some(k) = bits("kv") {
        write!(name, " KV{k}").expect("string");
    }
    match j
        .get("overrides")
        .and_then(Value::as_array)
        .map(Vec::len)
        .unwrap_or(0)
    {
        0 => {}
        1 => name.push_str(" +1 override"),
        n => write!(name, " +{n} overrides").expect("string"),
    }
    name
}

fn quantization(v: &Value, scheme: &str) -> String {
    match v.get("quantization").and_then(Value::as_str) {
        Some(q) => q.to_string(),
        // Summaries written before the field existed: no packed models yet.
        None if scheme == "FP" || scheme == "W16" => "none".into(),
        None => "fake_quant".into(),
    }
}

fn model_name(v: &Value) -> String {
    v.get("model")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string()
}

fn zero_shot_one(
    path: &Path,
    v: &Value,
    model: &str,
    scheme: &str,
    quant: &str,
) -> Option<ZeroShotRecord> {
    let task = v.get("task").and_then(Value::as_str)?;
    let obj = v.as_object()?;
    let mut metrics: Vec<(String, f64)> = obj
        .iter()
        .filter(|(k, _)| k.starts_with("acc") && !k.ends_with("stderr"))
        .filter_map(|(k, x)| x.as_f64().map(|x| (k.clone(), x)))
        .collect();
    metrics.sort_by(|a, b| a.0.cmp(&b.0));
    if metrics.is_empty() {
        return None;
    }
    let examples = ["examples", "n", "count", "num_examples"]
        .iter()
        .find_map(|k| obj.get(*k).and_then(Value::as_u64));
    Some(ZeroShotRecord {
        path: path.to_path_buf(),
        model: model.into(),
        scheme: scheme.into(),
        quantization: quant.into(),
        task: task.into(),
        metrics,
        examples,
    })
}

/// Parses one eval JSON: a perplexity summary (`ppl`, `nll`, `tokens`, ...), or a zero-shot
/// result (`task` with `acc*` fields, or `tasks`: a list or map of those).
pub fn parse_eval(path: &Path, text: &str) -> Result<EvalRecord> {
    let v: Value =
        serde_json::from_str(text.trim()).map_err(|e| bad(path, format!("invalid JSON: {e}")))?;
    if !v.is_object() {
        return Err(bad(path, "expected a JSON object"));
    }
    let scheme = scheme_name(&v);
    let quant = quantization(&v, &scheme);
    let model = model_name(&v);
    if v.get("ppl").is_some() {
        let num = |k: &str| {
            v.get(k)
                .and_then(Value::as_f64)
                .ok_or_else(|| bad(path, format!("\"{k}\" is missing or not a number")))
        };
        return Ok(EvalRecord::Ppl(PplRecord {
            path: path.to_path_buf(),
            model,
            scheme,
            quantization: quant,
            ppl: num("ppl")?,
            nll: num("nll")?,
            tokens: v
                .get("tokens")
                .and_then(Value::as_u64)
                .ok_or_else(|| bad(path, "\"tokens\" is missing or not an integer"))?,
            corpus_sha256: v
                .get("corpus_sha256")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        }));
    }
    let mut rows = Vec::new();
    if let Some(r) = zero_shot_one(path, &v, &model, &scheme, &quant) {
        rows.push(r);
    }
    match v.get("tasks") {
        Some(Value::Array(items)) => rows.extend(
            items
                .iter()
                .filter_map(|t| zero_shot_one(path, t, &model, &scheme, &quant)),
        ),
        Some(Value::Object(map)) => {
            for (name, t) in map {
                let mut t = t.clone();
                if let Some(o) = t.as_object_mut() {
                    o.entry("task")
                        .or_insert_with(|| Value::String(name.clone()));
                }
                rows.extend(zero_shot_one(path, &t, &model, &scheme, &quant));
            }
        }
        _ => {}
    }
    if rows.is_empty() {
        return Err(bad(path, "expected a qat-eval perplexity summary (\"ppl\", \"nll\", \"tokens\") or a zero-shot result (\"task\" with \"acc\" fields)"));
    }
    Ok(EvalRecord::ZeroShot(rows))
}

/// Reads and parses one eval JSON file.
pub fn read_eval(path: &Path) -> Result<EvalRecord> {
    let text = std::fs::read_to_string(path).map_err(|source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_eval(path, &text)
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

/// The Markdown report: a perplexity table (with `x FP` when `fp` is given; rows on another
/// corpus than the reference get `n/a`) and a zero-shot table when there are such results.
pub fn markdown_table(records: &[EvalRecord], fp: Option<&PplRecord>) -> String {
    let mut out = String::new();
    let ppl: Vec<&PplRecord> = records
        .iter()
        .filter_map(|r| {
            if let EvalRecord::Ppl(p) = r {
                Some(p)
            } else {
                None
            }
        })
        .collect();
    if !ppl.is_empty() {
        let xfp = if fp.is_some() { " x FP |" } else { "" };
        let sep = if fp.is_some() { "---:|" } else { "" };
        writeln!(
            out,
            "| model | scheme | quantization | ppl |{xfp} nll | tokens | corpus |"
        )
        .expect("string");
        writeln!(out, "|---|---|---|---:|{sep}---:|---:|---|").expect("string");
        for p in &ppl {
            let ratio = match fp {
                Some(f) if f.corpus_sha256 == p.corpus_sha256 => {
                    format!(" {:.3}x |", p.ppl / f.ppl)
                }
                Some(_) => " n/a (other corpus) |".to_string(),
                None => String::new(),
            };
            let corpus: String = p.corpus_sha256.chars().take(12).collect();
            writeln!(
                out,
                "| {} | {} | {} | {:.4} |{ratio} {:.5} | {} | `{}` |",
                cell(&p.model),
                cell(&p.scheme),
                p.quantization,
                p.ppl,
                p.nll,
                p.tokens,
                if corpus.is_empty() {
                    "?".into()
                } else {
                    corpus
                }
            )
            .expect("string");
        }
    }
    let zs: Vec<&ZeroShotRecord> = records
        .iter()
        .filter_map(|r| {
            if let EvalRecord::ZeroShot(z) = r {
                Some(z)
            } else {
                None
            }
        })
        .flatten()
        .collect();
    if !zs.is_empty() {
        if !out.is_empty() {
            out.push('\n');
        }
        writeln!(
            out,
            "| model | scheme | quantization | task | accuracy | examples |"
        )
        .expect("string");
        writeln!(out, "|---|---|---|---|---|---:|").expect("string");
        for z in zs {
            let acc: Vec<String> = z
                .metrics
                .iter()
                .map(|(k, v)| format!("{k} {v:.4}"))
                .collect();
            let n = z
                .examples
                .map(|n| n.to_string())
                .unwrap_or_else(|| "?".into());
            writeln!(
                out,
                "| {} | {} | {} | {} | {} | {n} |",
                cell(&z.model),
                cell(&z.scheme),
                z.quantization,
                cell(&z.task),
                acc.join(", ")
            )
            .expect("string");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_names_are_short() {
        let v: Value = serde_json::from_str(
            r#"{"scheme": "{...}", "scheme_json": {"weight": {"bits": 3, "format": {"kind": "asym_group", "group_size": 32}},
                "act": null, "kv": null, "overrides": [{"pattern": "x"}]}}"#,
        )
        .unwrap();
        assert_eq!(scheme_name(&v), "W3G32 asym +1 override");
        let v: Value = serde_json::from_str(r#"{"scheme": "W4A8KV4"}"#).unwrap();
        assert_eq!(scheme_name(&v), "W4A8KV4");
        let v: Value = serde_json::from_str(r#"{"scheme_json": {"weight": {"bits": 3, "format": {"kind": "nf3", "group_size": 32}}, "kv": {"bits": 4}}}"#).unwrap();
        assert_eq!(scheme_name(&v), "NF3G32 KV4");
    }

    #[test]
    fn zero_shot_shapes_are_read_and_unknown_ones_refused() {
        let p = Path::new("z.json");
        let r = parse_eval(p, r#"{"model": "m", "task": "hellaswag", "acc": 0.25, "acc_norm": 0.3, "acc_stderr": 0.01, "examples": 100, "extra": [1]}"#).unwrap();
        let EvalRecord::ZeroShot(rows) = r else {
            panic!("not zero-shot")
        };
        assert_eq!(
            rows[0].metrics,
            vec![("acc".to_string(), 0.25), ("acc_norm".to_string(), 0.3)]
        );
        let r = parse_eval(
            p,
            r#"{"model": "m", "tasks": {"piqa": {"acc": 0.5}, "arc_easy": {"accuracy": 0.4}}}"#,
        )
        .unwrap();
        let EvalRecord::ZeroShot(rows) = r else {
            panic!("not zero-shot")
        };
        assert_eq!(rows.len(), 2);
        let e = parse_eval(p, r#"{"model": "m", "loss": 1.0}"#)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("z.json: not an eval JSON"), "{e}");
        assert!(parse_eval(p, "[1, 2]").is_err());
    }
}
