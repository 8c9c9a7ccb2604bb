//! CLI tests of `qat-eval --task`: per-choice log-likelihoods of the first items of every task
//! against HF transformers, acc / acc_norm decisions, schemes and packed dirs, bad task files.

mod common;

use common::*;
use qat_quant::Scheme;
use std::path::Path;
use std::process::Command;

/// Per task, per item: gold, pred (acc), pred_norm (acc_norm), per-choice loglikelihoods and
/// [context tokens, continuation tokens] of each choice.
type Reference = (
    &'static str,
    &'static [(usize, usize, usize, &'static [f64], &'static [[usize; 2]])],
);

/// `bench/zeroshot_reference.py --model ../shared/data/models/stories260K --eval-dir
/// ../shared/data/eval -n 3` (HF transformers 5.23 LlamaForCausalLM, fp32, CPU; prompts,
/// `_encode_pair` and acc_norm as lm-evaluation-harness, BOS first). BoolQ's first two
/// passages are longer than the 512-token context (930 and 821 tokens): cut from the left.
const REFERENCE: &[Reference] = &[
    (
        "hellaswag",
        &[
            (
                3,
                3,
                3,
                &[
                    -64.77803143668511,
                    -67.42976420698164,
                    -64.03379908473059,
                    -52.14416243261605,
                ],
                &[[33, 23], [33, 16], [33, 19], [33, 19]],
            ),
            (
                3,
                0,
                0,
                &[
                    -27.78565244059808,
                    -44.98897453982347,
                    -63.76301923859198,
                    -44.05681802915811,
                ],
                &[[50, 16], [50, 15], [50, 24], [50, 20]],
            ),
            (
                2,
                2,
                1,
                &[
                    -114.60124526326878,
                    -99.36699734125567,
                    -61.909858828046936,
                    -163.33484404788,
                ],
                &[[108, 39], [108, 34], [108, 21], [108, 56]],
            ),
        ],
    ),
    (
        "piqa",
        &[
            (
                0,
                0,
                0,
                &[-270.16366633986496, -284.25613939437915],
                &[[51, 90], [51, 93]],
            ),
            (
                1,
                0,
                0,
                &[-51.60617087365482, -82.48068203748595],
                &[[21, 19], [21, 20]],
            ),
            (
                1,
                0,
                0,
                &[-110.31169850995364, -130.62252290649468],
                &[[52, 42], [52, 36]],
            ),
        ],
    ),
    (
        "arc-easy",
        &[
            (
                0,
                2,
                2,
                &[
                    -141.0730624403951,
                    -115.98476259907889,
                    -101.94875799153823,
                    -115.7765744097384,
                ],
                &[[68, 36], [68, 31], [68, 33], [68, 28]],
            ),
            (
                1,
                3,
                1,
                &[
                    -45.71530051133195,
                    -27.43684242612498,
                    -25.747928195540293,
                    -25.499968698627526,
                ],
                &[[77, 10], [77, 9], [77, 10], [77, 7]],
            ),
            (
                3,
                1,
                0,
                &[
                    -28.091084041181915,
                    -25.89409120503223,
                    -31.403662600168566,
                    -40.1632206797753,
                ],
                &[[91, 8], [91, 7], [91, 9], [91, 8]],
            ),
        ],
    ),
    (
        "arc-challenge",
        &[
            (
                2,
                1,
                1,
                &[
                    -90.36019664441565,
                    -68.22595066616702,
                    -68.59226687532848,
                    -89.93177891533355,
                ],
                &[[98, 22], [98, 23], [98, 22], [98, 26]],
            ),
            (
                1,
                0,
                0,
                &[
                    -40.51349160309583,
                    -43.68765447975112,
                    -47.75859322179092,
                    -47.23682531393236,
                ],
                &[[183, 18], [183, 16], [183, 20], [183, 21]],
            ),
            (
                2,
                0,
                0,
                &[
                    -96.73521839385172,
                    -104.98435621358036,
                    -105.00689591541723,
                    -114.79192409528798,
                ],
                &[[100, 32], [100, 30], [100, 33], [100, 26]],
            ),
        ],
    ),
    (
        "boolq",
        &[
            (
                0,
                0,
                1,
                &[-7.721972034842667, -10.579995631212789],
                &[[930, 2], [930, 2]],
            ),
            (
                1,
                0,
                1,
                &[-7.995896371523585, -10.886815079200163],
                &[[821, 2], [821, 2]],
            ),
            (
                1,
                0,
                1,
                &[-7.6609790475255375, -10.489311986475094],
                &[[269, 2], [269, 2]],
            ),
        ],
    ),
    (
        "winogrande",
        &[
            (
                1,
                0,
                0,
                &[-41.200688448075226, -41.39762049558268],
                &[[31, 18], [31, 18]],
            ),
            (
                0,
                0,
                0,
                &[-42.7902268045835, -42.858397588528135],
                &[[31, 17], [31, 17]],
            ),
            (
                1,
                1,
                0,
                &[-19.330229139458588, -19.275247718553164],
                &[[35, 8], [32, 8]],
            ),
        ],
    ),
];

fn read_items(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Runs `qat-eval --task ALL --limit 3 --per-item` on `model` (+ `extra` flags, default batch
/// size 5); returns the summary and the per-item records.
fn run_all(
    model: &Path,
    extra: &[&str],
    dir: &Path,
) -> (serde_json::Value, Vec<serde_json::Value>) {
    let items = dir.join(format!("items{}.jsonl", extra.join("")));
    let tasks = REFERENCE
        .iter()
        .map(|(t, _)| *t)
        .collect::<Vec<_>>()
        .join(",");
    let mut args = vec![
        "--model",
        model.to_str().unwrap(),
        "--task",
        &tasks,
        "--limit",
        "3",
        "--per-item",
        items.to_str().unwrap(),
        "-q",
    ];
    if !extra.contains(&"-b") {
        args.extend(["-b", "5"]);
    }
    args.extend(extra);
    let j = ok_json(&qat_eval(&args));
    assert_documented("qat-eval --task", &j);
    (j, read_items(&items))
}

#[test]
fn loglikelihoods_match_hf_transformers_on_every_task() {
    let tmp = tempfile::tempdir().unwrap();
    let (j, items) = run_all(&stories_dir(), &[], tmp.path());
    assert_eq!(j["quantization"], "none");
    assert_eq!(items.len(), 18);
    let mut worst: f64 = 0.0;
    for (task, refs) in REFERENCE {
        let got: Vec<&serde_json::Value> = items.iter().filter(|i| i["task"] == *task).collect();
        assert_eq!(got.len(), refs.len(), "{task}");
        for (k, (it, (gold, pred, pred_norm, lls, tokens))) in
            got.iter().zip(refs.iter()).enumerate()
        {
            assert_eq!(it["index"], k);
            assert_eq!(
                (
                    it["gold"].as_u64().unwrap() as usize,
                    it["pred"].as_u64().unwrap() as usize
                ),
                (*gold, *pred),
                "{task} item {k}"
            );
            assert_eq!(
                it["pred_norm"].as_u64().unwrap() as usize,
                *pred_norm,
                "{task} item {k} acc_norm"
            );
            let reqs = it["requests"].as_array().unwrap();
            for (c, (want, toks)) in lls.iter().zip(tokens.iter()).enumerate() {
                let ll = it["lls"][c].as_f64().unwrap();
                worst = worst.max((ll - want).abs());
                assert!(
                    (ll - want).abs() < 2e-4,
                    "{task} item {k} choice {c}: {ll} vs HF {want}"
                );
                assert_eq!(
                    [
                        reqs[c]["context_tokens"].as_u64().unwrap() as usize,
                        reqs[c]["tokens"].as_u64().unwrap() as usize
                    ],
                    *toks,
                    "{task} item {k} choice {c}"
                );
            }
        }
        // The summary is the mean of the per-item decisions.
        let s = &j["tasks"][*task];
        let acc = refs.iter().filter(|r| r.0 == r.1).count() as f64 / 3.0;
        assert!(
            (s["acc"].as_f64().unwrap() - acc).abs() < 1e-12,
            "{task}: {s}"
        );
        assert_eq!(s["items"], 3);
        if *task == "boolq" || *task == "winogrande" {
            assert!(
                s["acc_norm"].is_null(),
                "{task}: the harness reports acc only"
            );
        } else {
            let acc_norm = refs.iter().filter(|r| r.0 == r.2).count() as f64 / 3.0;
            assert!(
                (s["acc_norm"].as_f64().unwrap() - acc_norm).abs() < 1e-12,
                "{task}: {s}"
            );
        }
        assert_eq!(
            s["sha256"].as_array().unwrap().len(),
            if *task == "piqa" || *task == "winogrande" {
                2
            } else {
                1
            }
        );
    }
    eprintln!("largest |ll - HF| = {worst:.2e}");
    // Standard error as the harness: sqrt(p (1 - p) / (n - 1)) for 0/1 scores.
    let piqa = &j["tasks"]["piqa"];
    assert!(
        (piqa["acc_stderr"].as_f64().unwrap() - (2.0f64 / 9.0 / 2.0).sqrt()).abs() < 1e-12,
        "{piqa}"
    );
    // Batch composition does not change the scores beyond float rounding.
    let (_, one) = run_all(&stories_dir(), &["-b", "1"], tmp.path());
    for (a, b) in items.iter().zip(&one) {
        for (x, y) in a["lls"]
            .as_array()
            .unwrap()
            .iter()
            .zip(b["lls"].as_array().unwrap())
        {
            assert!((x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-4);
        }
    }
}

/// A student dir evaluates under its quant_scheme.json exactly as `--scheme` on the teacher,
/// and its packed dir gives the same log-likelihoods again.
#[test]
fn schemes_and_packed_dirs_run_as_for_perplexity() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tmp.path().join("student");
    std::fs::create_dir_all(&student).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(stories_dir().join(f), student.join(f)).unwrap();
    }
    std::fs::write(
        student.join("quant_scheme.json"),
        Scheme::from_arg("W4A8KV4").unwrap().to_json_pretty(),
    )
    .unwrap();
    let (fp, fp_items) = run_all(&stories_dir(), &[], tmp.path());
    let (rtn, rtn_items) = run_all(&stories_dir(), &["--scheme", "W4A8KV4"], tmp.path());
    let (st, st_items) = run_all(&student, &[], tmp.path());
    assert_eq!(
        (rtn["quantization"].as_str(), st["quantization"].as_str()),
        (Some("fake_quant"), Some("fake_quant"))
    );
    assert_eq!(rtn["scheme"], st["scheme"]);
    let lls = |items: &[serde_json::Value]| -> Vec<f64> {
        items
            .iter()
            .flat_map(|i| {
                i["lls"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    assert_eq!(lls(&rtn_items), lls(&st_items));
    let moved = lls(&fp_items)
        .iter()
        .zip(lls(&rtn_items))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(moved > 0.1, "W4A8KV4 should move the scores: {moved}");
    let (back, back_items) = run_all(&student, &["--scheme", "FP"], tmp.path());
    assert_eq!(back["quantization"], "none");
    assert_eq!(lls(&back_items), lls(&fp_items));
    assert_eq!(back["tasks"]["piqa"]["acc"], fp["tasks"]["piqa"]["acc"]);
    let packed = tmp.path().join("packed");
    let out = Command::new(env!("CARGO_BIN_EXE_qat-pack"))
        .args([
            "--model",
            student.to_str().unwrap(),
            "--out",
            packed.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (pk, pk_items) = run_all(&packed, &[], tmp.path());
    assert_eq!(pk["quantization"], "packed");
    let diff = lls(&pk_items)
        .iter()
        .zip(lls(&st_items))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(diff < 1e-4, "packed vs fake-quant: {diff}");
}

#[test]
fn bad_task_files_name_the_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = stories_dir();
    let m = model.to_str().unwrap();
    let hs = tmp.path().join("hs.txt");
    std::fs::write(
        &hs,
        "A: b. c\n0\ne1\ne2\ne3\ne4\nA: b. c\nx\ne1\ne2\ne3\ne4\n",
    )
    .unwrap();
    assert_error(
        &qat_eval(&[
            "-m",
            m,
            "--task",
            "hellaswag",
            "--task-file",
            hs.to_str().unwrap(),
        ]),
        "qat-eval",
        "hs.txt:8: label \"x\" is not an integer in 0..4",
    );
    let piqa = tmp.path().join("valid.jsonl");
    std::fs::write(
        &piqa,
        "{\"goal\": \"g\", \"sol1\": \"a\", \"sol2\": \"b\"}\n{\"goal\": \"g\", \"sol1\": \"a\"}\n",
    )
    .unwrap();
    assert_error(
        &qat_eval(&[
            "-m",
            m,
            "--task",
            "piqa",
            "--task-file",
            piqa.to_str().unwrap(),
        ]),
        "qat-eval",
        "valid.jsonl:2: not a valid record: missing field `sol2`",
    );
    std::fs::write(
        &piqa,
        "{\"goal\": \"g\", \"sol1\": \"a\", \"sol2\": \"b\"}\n",
    )
    .unwrap();
    assert_error(
        &qat_eval(&[
            "-m",
            m,
            "--task",
            "piqa",
            "--task-file",
            piqa.to_str().unwrap(),
        ]),
        "qat-eval",
        "valid-labels.lst: cannot read task file",
    );
    assert_error(
        &qat_eval(&[
            "-m",
            m,
            "--task",
            "boolq",
            "--task-file",
            "/nonexistent/dev.jsonl",
        ]),
        "qat-eval",
        "/nonexistent/dev.jsonl: cannot read task file",
    );
    assert_error(
        &qat_eval(&[
            "-m",
            m,
            "--task",
            "boolq,piqa",
            "--task-file",
            piqa.to_str().unwrap(),
        ]),
        "qat-eval",
        "--task-file needs exactly one --task, got 2",
    );
    let out = qat_eval(&["-m", m, "--task", "mmlu"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unknown task \"mmlu\""),
        "{}",
        stderr(&out)
    );
    // Nothing half-written is left behind on error.
    let per_item = tmp.path().join("items.jsonl");
    assert_error(
        &qat_eval(&[
            "-m",
            m,
            "--task",
            "hellaswag",
            "--task-file",
            hs.to_str().unwrap(),
            "--per-item",
            per_item.to_str().unwrap(),
        ]),
        "qat-eval",
        "hs.txt:8",
    );
    assert!(!per_item.exists());
}

/// A PIQA solution longer than stories260K's 512-token context: lm-evaluation-harness refuses
/// it; qat-eval scores its last 512 tokens, counts it and warns.
#[test]
fn continuation_longer_than_the_context_is_scored_in_part_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let piqa = tmp.path().join("valid.jsonl");
    let long = "and then the dog ran to the park ".repeat(80);
    std::fs::write(
        &piqa,
        format!(
            "{{\"goal\": \"Walk a dog.\", \"sol1\": \"{long}\", \"sol2\": \"Use a leash.\"}}\n"
        ),
    )
    .unwrap();
    std::fs::write(tmp.path().join("valid-labels.lst"), "1\n").unwrap();
    let items = tmp.path().join("items.jsonl");
    let out = qat_eval(&[
        "-m",
        stories_dir().to_str().unwrap(),
        "--task",
        "piqa",
        "--task-file",
        piqa.to_str().unwrap(),
        "--per-item",
        items.to_str().unwrap(),
    ]);
    let j = ok_json(&out);
    assert!(
        stderr(&out)
            .contains("piqa: 1 continuations are longer than the model's 512-token context"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        (
            j["tasks"]["piqa"]["truncated_continuations"].as_u64(),
            j["tasks"]["piqa"]["truncated_contexts"].as_u64()
        ),
        (Some(1), Some(0))
    );
    let it = &read_items(&items)[0];
    let r = &it["requests"][0];
    assert_eq!(r["tokens"], 512);
    assert!(r["continuation_tokens"].as_u64().unwrap() > 512, "{r}");
    assert_eq!(
        it["requests"][1]["tokens"],
        it["requests"][1]["continuation_tokens"]
    );
}

#[test]
fn help_has_task_examples() {
    let out = qat_eval(&["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("Examples:")
            && help.contains("--task hellaswag,piqa")
            && help.contains("--per-item"),
        "{help}"
    );
}
