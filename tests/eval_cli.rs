//! CLI tests of `qat-eval`: perplexity against HF transformers' numbers, bad input, and the
//! checkpoint of a resumable evaluation.

mod common;

use common::*;

/// `reference_outputs.json` holds HF LlamaForCausalLM (fp32, CPU) perplexity of stories260K on
/// the first 10 TinyStories validation stories: each BOS + text, truncated to 512 tokens,
/// 3211 predicted tokens, mean NLL 1.20929.
#[test]
fn docs_perplexity_matches_hf_reference() {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(stories_dir().join("reference_outputs.json")).unwrap(),
    )
    .unwrap();
    let want = &reference["tinystories_first10"];
    let model = stories_dir();
    let out = eval_tinystories(&model, 10, &["--mode", "docs", "--seq-len", "512"]);
    let j = ok_json(&out);
    assert_documented("qat-eval", &j);
    assert_eq!(j["tokens"], want["pred_tokens"]);
    let nll = j["nll"].as_f64().unwrap();
    assert!(
        (nll - want["mean_nll"].as_f64().unwrap()).abs() < 1e-4,
        "nll {nll} vs {}",
        want["mean_nll"]
    );
    assert!((j["ppl"].as_f64().unwrap() - nll.exp()).abs() < 1e-9);
    assert_eq!(
        j["corpus_sha256"],
        "b1097f1cca750cb706160d9820bd4d6c4bbcca3e05c8dfc051d2b76b3cfca444"
    );
    // Batch composition must not change the result beyond float rounding.
    let one = ok_json(&eval_tinystories(&model, 10, &["-b", "1"]));
    assert!((one["nll"].as_f64().unwrap() - nll).abs() < 1e-5);
}

#[test]
fn stream_mode_cuts_non_overlapping_windows() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, "Once upon a time there was a cat. ".repeat(40)).unwrap();
    let model = stories_dir();
    let j = ok_json(&qat_eval(&[
        "--model",
        model.to_str().unwrap(),
        "--corpus",
        text.to_str().unwrap(),
        "--mode",
        "stream",
        "--seq-len",
        "64",
        "-q",
    ]));
    let windows = j["sequences"].as_u64().unwrap();
    // Every window predicts all but its first token.
    let total: u64 = j["tokens"].as_u64().unwrap() + windows;
    assert!(
        windows >= 2 && total > 64 * (windows - 1) && total <= 64 * windows,
        "{j}"
    );
}

#[test]
fn bad_corpus_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model = stories_dir();
    let bad = tmp.path().join("latin1.txt");
    std::fs::write(&bad, b"caf\xe9 au lait").unwrap();
    assert_error(
        &qat_eval(&[
            "--model",
            model.to_str().unwrap(),
            "--corpus",
            bad.to_str().unwrap(),
            "-q",
        ]),
        "qat-eval",
        "latin1.txt: not UTF-8: invalid byte at offset 3",
    );
    assert_error(
        &qat_eval(&[
            "--model",
            model.to_str().unwrap(),
            "--corpus",
            "/nonexistent.txt",
            "-q",
        ]),
        "qat-eval",
        "/nonexistent.txt: cannot read corpus",
    );
    assert_error(
        &qat_eval(&[
            "--model",
            "/nonexistent",
            "--corpus",
            bad.to_str().unwrap(),
            "-q",
        ]),
        "qat-eval",
        "not a model directory",
    );
}

/// A `--checkpoint` file of another evaluation (other sequences here) or not a checkpoint at
/// all is refused: exit 2, the file named, nothing on stdout, the file left as it was.
#[test]
fn a_checkpoint_of_another_evaluation_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, corpus) = (stories_dir(), tinystories());
    let ckpt = tmp.path().join("ppl.ckpt");
    let run = |limit: &str| {
        qat_eval(&[
            "--model",
            model.to_str().unwrap(),
            "--corpus",
            corpus.to_str().unwrap(),
            "--limit",
            limit,
            "-q",
            "--checkpoint",
            ckpt.to_str().unwrap(),
        ])
    };
    // A saved state of a 4-document run, as a killed run leaves it.
    let state = serde_json::json!({
        "format": "qat-eval-checkpoint/1",
        "key": "0".repeat(64),
        "batches": 1,
        "nll_sum_bits": 4607182418800017408u64,
        "tokens": 10,
        "sequences": 4,
    });
    std::fs::write(&ckpt, state.to_string()).unwrap();
    let out = run("4");
    assert_error(&out, "qat-eval", "ppl.ckpt: made by an evaluation of other sequences, weights or settings (key differs); delete it to start over");
    assert!(out.stdout.is_empty());
    assert_eq!(std::fs::read_to_string(&ckpt).unwrap(), state.to_string());
    std::fs::write(&ckpt, "not json").unwrap();
    assert_error(&run("4"), "qat-eval", "ppl.ckpt: not a qat-eval checkpoint");
    // Removed, the run starts over and cleans up after itself.
    std::fs::remove_file(&ckpt).unwrap();
    let j = ok_json(&run("4"));
    assert_eq!(j["resumed_sequences"], 0);
    assert!(!ckpt.exists());
}

/// `--profile` times every batch after the first (formats/summaries.md), prints the shares on
/// stderr, and changes no result: the same NLL to the last bit as without it.
#[test]
fn profile_times_the_batches_and_changes_no_result() {
    let model = stories_dir();
    let run = |extra: &[&str]| eval_tinystories(&model, 12, &[&["-b", "4"], extra].concat());
    let plain = ok_json(&run(&[]));
    assert!(plain.get("profile").is_none(), "{plain}");
    let o = run(&["--profile"]);
    let j = ok_json(&o);
    assert_documented("qat-eval", &j);
    assert_eq!(j["nll"], plain["nll"]);
    assert_eq!(j["tokens"], plain["tokens"]);
    let p = &j["profile"];
    assert_eq!(p["steps"], 12 / 4 - 1, "batches after the first: {p}");
    for phase in ["forward", "logits_nll"] {
        assert!(p["phases"][phase].as_f64().unwrap() > 0.0, "{phase}: {p}");
    }
    assert_eq!(p["phases"]["checkpoint"], 0.0, "no --checkpoint: {p}");
    assert!(
        stderr(&o).contains("qat-eval: profile of 2 batches: "),
        "{}",
        stderr(&o)
    );
    // Perplexity only: a usage error (clap's, exit 2).
    let o = qat_eval(&[
        "--model",
        model.to_str().unwrap(),
        "--task",
        "piqa",
        "--profile",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("'--task <TASK>' cannot be used with '--profile'"),
        "{}",
        stderr(&o)
    );
}
