//! CLI tests of `qat-distill`: it learns, resumes after kill -9 to identical bytes, stops on
//! NaN keeping the last good checkpoint, and refuses bad input with exit 2.

mod common;

use common::*;
use std::path::Path;

fn distill_args<'a>(
    model: &'a str,
    shards: &'a str,
    out: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut v = vec!["--model", model, "--shards", shards, "--out", out];
    v.extend_from_slice(SMALL_DISTILL_ARGS);
    v.extend_from_slice(&["--checkpoint-every", "3"]);
    if !extra.contains(&"--steps") {
        v.extend_from_slice(&["--steps", "12"]);
    }
    v.extend_from_slice(extra);
    v
}

fn log_losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn training_lowers_the_loss_and_writes_a_student_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    small_shards(&shards);
    let out = tmp.path().join("student");
    let model = stories_dir();
    let s = ok_json(&qat_distill(&distill_args(
        model.to_str().unwrap(),
        shards.to_str().unwrap(),
        out.to_str().unwrap(),
        &[],
    )));
    assert_eq!(s["steps"], 12);
    assert_documented("qat-distill", &s);
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    for (i, line) in log.lines().enumerate() {
        let line: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_documented_in("formats/provenance.md", "train_log.jsonl", &line);
        assert_eq!(line["step"], i + 1);
    }
    assert_eq!(log.lines().count(), 12);
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "quant_scheme.json",
        "train_log.jsonl",
        "provenance.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(
        !tmp.path().join("student.work").exists(),
        "work dir left behind"
    );
    let losses = log_losses(&out);
    assert_eq!(losses.len(), 12);
    let first: f64 = losses[..3].iter().sum::<f64>() / 3.0;
    let last: f64 = losses[9..].iter().sum::<f64>() / 3.0;
    assert!(last < first * 0.8, "loss did not fall: {losses:?}");
    let prov: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("provenance.json")).unwrap())
            .unwrap();
    assert_eq!(prov["steps"], 12);
    assert_eq!(
        prov["init_weights_sha256"],
        "407a7c581bdd66972383ce9ad24857713fb98786d06ea564a2fe9b34ebe77dfd"
    );
    // The student evaluates with its saved scheme.
    let e = ok_json(&qat_eval(&[
        "--model",
        out.to_str().unwrap(),
        "--corpus",
        tinystories().to_str().unwrap(),
        "--limit",
        "3",
        "-q",
    ]));
    assert_eq!(e["scheme"], "W4A8KV4");
}

#[test]
fn resume_after_kill_gives_the_identical_loss_curve_and_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    small_shards(&shards);
    let model = stories_dir();
    let (m, s) = (
        model.to_str().unwrap().to_string(),
        shards.to_str().unwrap().to_string(),
    );
    let whole = tmp.path().join("whole");
    ok_json(&qat_distill(&distill_args(
        &m,
        &s,
        whole.to_str().unwrap(),
        &[],
    )));
    let killed = tmp.path().join("killed");
    let k = killed.to_str().unwrap().to_string();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_qat-distill"))
        .args(distill_args(&m, &s, &k, &[]))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let state = tmp.path().join("killed.work/checkpoint/state.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !state.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!killed.exists(), "the run finished before it was killed");
    // Without --resume an existing checkpoint is refused; with it the run continues.
    assert_error(
        &qat_distill(&distill_args(&m, &s, &k, &[])),
        "qat-distill",
        "pass --resume",
    );
    let r = ok_json(&qat_distill(&distill_args(&m, &s, &k, &["--resume"])));
    assert!(r["resumed_from_step"].as_u64().unwrap() >= 3);
    assert_documented("qat-distill", &r);
    assert_eq!(log_losses(&whole), log_losses(&killed));
    assert_eq!(
        std::fs::read(whole.join("model.safetensors")).unwrap(),
        std::fs::read(killed.join("model.safetensors")).unwrap()
    );
}

#[test]
fn nan_loss_stops_and_keeps_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    small_shards(&shards);
    let model = stories_dir();
    let out = tmp.path().join("s");
    let (m, s, o) = (
        model.to_str().unwrap(),
        shards.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let r = qat_distill(&distill_args(m, s, o, &["--inject-nan-at", "7"]));
    assert_error(&r, "qat-distill", "non-finite loss NaN at step 7");
    assert!(
        stderr(&r).contains("last good checkpoint: step 6"),
        "{}",
        stderr(&r)
    );
    assert!(!out.exists());
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("s.work/checkpoint/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["step"], 6);
    // The checkpoint is intact: resuming (without the NaN) matches an uninterrupted run.
    ok_json(&qat_distill(&distill_args(m, s, o, &["--resume"])));
    let whole = tmp.path().join("whole");
    ok_json(&qat_distill(&distill_args(
        m,
        s,
        whole.to_str().unwrap(),
        &[],
    )));
    assert_eq!(log_losses(&whole), log_losses(&out));
}

#[test]
fn bad_inputs_fail_with_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    small_shards(&shards);
    let model = stories_dir();
    let (m, s) = (model.to_str().unwrap(), shards.to_str().unwrap());
    let out = tmp.path().join("out");
    let o = out.to_str().unwrap();
    // A student whose tokenizer differs from the shards' teacher.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(model.join(f), other.join(f)).unwrap();
    }
    let mut tok = std::fs::read_to_string(model.join("tokenizer.json")).unwrap();
    tok.push('\n');
    std::fs::write(other.join("tokenizer.json"), tok).unwrap();
    assert_error(
        &qat_distill(&distill_args(other.to_str().unwrap(), s, o, &[])),
        "qat-distill",
        "shards do not match the student model",
    );
    // Schemes that do not parse or do not fit the model.
    let mut a = distill_args(m, s, o, &[]);
    a[7] = "W9A8";
    assert_error(
        &qat_distill(&a),
        "qat-distill",
        "weight bits 9 out of range",
    );
    let scheme = tmp.path().join("s.json");
    std::fs::write(&scheme, r#"{"format_version":1,"weight":{"bits":4,"format":{"kind":"sym_per_channel"}},"act":null,"kv":null,"overrides":[{"pattern":"layers.9.*","weight":null}]}"#).unwrap();
    a[7] = scheme.to_str().unwrap();
    let r = qat_distill(&a);
    assert_eq!(r.status.code(), Some(2), "{}", stderr(&r));
    assert!(stderr(&r).contains("layers.9.*"), "{}", stderr(&r));
    // A corrupted shard file (one flipped byte) is caught before training.
    let corrupt = tmp.path().join("corrupt");
    std::fs::create_dir(&corrupt).unwrap();
    for e in std::fs::read_dir(&shards).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, corrupt.join(p.file_name().unwrap())).unwrap();
    }
    let f = corrupt.join("shard-00001.parquet");
    let mut bytes = std::fs::read(&f).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&f, bytes).unwrap();
    assert_error(
        &qat_distill(&distill_args(m, corrupt.to_str().unwrap(), o, &[])),
        "qat-distill",
        "shard-00001.parquet",
    );
    assert!(!out.exists() && !tmp.path().join("out.work").exists());
}

/// With `--teacher` the loss is the exact full-vocabulary KL. Bucketing the vocabulary into the
/// top-K ids plus one tail can only lose information, so on the same first batch (same initial
/// weights) the online loss is >= the cached top-K loss (data-processing inequality), and close
/// to it when K = 16 covers most of the mass.
#[test]
fn online_teacher_loss_bounds_the_cached_top_k_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    small_shards(&shards);
    let model = stories_dir();
    let (m, s) = (model.to_str().unwrap(), shards.to_str().unwrap());
    let cached = tmp.path().join("cached");
    let online = tmp.path().join("online");
    ok_json(&qat_distill(&distill_args(
        m,
        s,
        cached.to_str().unwrap(),
        &["--steps", "2"],
    )));
    let a = distill_args(
        m,
        s,
        online.to_str().unwrap(),
        &["--teacher", m, "--steps", "2"],
    );
    let j = ok_json(&qat_distill(&a));
    assert_eq!(j["steps"], 2);
    let (c, o) = (log_losses(&cached)[0], log_losses(&online)[0]);
    assert!(o >= c - 1e-6 && o < c * 1.5, "online {o} vs cached {c}");
}

/// BitDistiller's CAKLD (formats/distill-loss.md): gamma, the mean teacher top-1 probability
/// over the trained positions, is measured from the shards before training and recorded in
/// provenance.json and the summary; `--cakld-gamma` overrides it and is validated. The other
/// BitDistiller losses train too.
#[test]
fn cakld_measures_gamma_from_the_shards_and_records_it() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    small_shards(&shards);
    let model = stories_dir();
    let (m, s) = (model.to_str().unwrap(), shards.to_str().unwrap());
    let out = tmp.path().join("cakld");
    let j = ok_json(&qat_distill(&distill_args(
        m,
        s,
        out.to_str().unwrap(),
        &["--loss", "cakld", "--steps", "2"],
    )));
    assert_eq!(j["loss"], "cakld");
    assert_documented("qat-distill", &j);
    let gamma = j["cakld_gamma"].as_f64().unwrap();
    assert!(gamma > 0.2 && gamma < 1.0, "gamma {gamma}");
    let prov: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("provenance.json")).unwrap())
            .unwrap();
    assert_eq!(prov["settings"]["loss"], "cakld");
    assert_eq!(prov["settings"]["cakld_gamma"], serde_json::Value::Null);
    assert_eq!(prov["cakld_gamma"]["source"], "shards");
    assert_documented_in("formats/provenance.md", "qat-distill", &prov);
    assert_eq!(prov["cakld_gamma"]["gamma"].as_f64(), Some(gamma));
    // Data-free shards: prompt = BOS + start token, so every sequence of L tokens has L - 2
    // trained positions; the manifest's token count gives their total independently.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(shards.join("manifest.json")).unwrap())
            .unwrap();
    let tokens: u64 = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(
        prov["cakld_gamma"]["measured"]["positions"].as_u64(),
        Some(tokens - 2 * 32)
    );
    assert!(log_losses(&out).iter().all(|l| l.is_finite() && *l > 0.0));

    // A given gamma is used as is; out-of-range or misplaced values are refused.
    let fixed = tmp.path().join("fixed");
    let j = ok_json(&qat_distill(&distill_args(
        m,
        s,
        fixed.to_str().unwrap(),
        &["--loss", "cakld", "--cakld-gamma", "0.25", "--steps", "1"],
    )));
    assert_eq!(j["cakld_gamma"].as_f64(), Some(0.25));
    let prov: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixed.join("provenance.json")).unwrap())
            .unwrap();
    assert_eq!(
        (
            prov["cakld_gamma"]["source"].as_str(),
            prov["settings"]["cakld_gamma"].as_f64()
        ),
        (Some("--cakld-gamma"), Some(0.25))
    );
    let bad = tmp.path().join("bad");
    let b = bad.to_str().unwrap();
    assert_error(
        &qat_distill(&distill_args(
            m,
            s,
            b,
            &["--loss", "cakld", "--cakld-gamma", "1.5"],
        )),
        "qat-distill",
        "--cakld-gamma must be in 0..=1, got 1.5",
    );
    assert_error(
        &qat_distill(&distill_args(
            m,
            s,
            b,
            &["--loss", "jsd", "--cakld-gamma", "0.5"],
        )),
        "qat-distill",
        "--cakld-gamma applies only to --loss cakld",
    );
    for loss in ["rkl", "jsd"] {
        let o = tmp.path().join(loss);
        let j = ok_json(&qat_distill(&distill_args(
            m,
            s,
            o.to_str().unwrap(),
            &["--loss", loss, "--steps", "2"],
        )));
        assert_eq!(j["loss"], loss);
        assert!(j.get("cakld_gamma").is_none());
        assert!(
            log_losses(&o).iter().all(|l| l.is_finite() && *l > 0.0),
            "{loss}"
        );
    }
}

/// Regression: `--resume` with `--balance-kv` must not rebalance again (the checkpoint holds the
/// balanced weights); the resumed run equals an uninterrupted one and keeps the balance report.
#[test]
fn resume_with_balance_kv_keeps_the_first_balancing() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    small_shards(&shards);
    let model = stories_dir();
    let (m, s) = (model.to_str().unwrap(), shards.to_str().unwrap());
    let out = tmp.path().join("s");
    let o = out.to_str().unwrap();
    let r = qat_distill(&distill_args(
        m,
        s,
        o,
        &["--balance-kv", "4", "--inject-nan-at", "7"],
    ));
    assert_eq!(r.status.code(), Some(2));
    ok_json(&qat_distill(&distill_args(
        m,
        s,
        o,
        &["--balance-kv", "4", "--resume"],
    )));
    let whole = tmp.path().join("whole");
    ok_json(&qat_distill(&distill_args(
        m,
        s,
        whole.to_str().unwrap(),
        &["--balance-kv", "4"],
    )));
    assert_eq!(log_losses(&whole), log_losses(&out));
    assert_eq!(
        std::fs::read(whole.join("model.safetensors")).unwrap(),
        std::fs::read(out.join("model.safetensors")).unwrap()
    );
    let prov = |d: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("provenance.json")).unwrap()).unwrap()
    };
    assert!(
        prov(&out)["balance_kv"]["calibration_sequences"] == 4,
        "{}",
        prov(&out)
    );
    assert_eq!(prov(&out)["balance_kv"], prov(&whole)["balance_kv"]);
    assert_documented_in("formats/provenance.md", "qat-distill", &prov(&out));
}

/// Issue 7: a batch split into parts that train on their own threads gives the loss curve of the
/// unsplit batch up to rounding; the resolved part count is recorded, and a resumed run keeps
/// its checkpoint's count when none is given.
#[test]
fn issue7_data_parallel_parts_match_one_part_and_resume_keeps_the_count() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    small_shards(&shards);
    let model = stories_dir();
    let (m, s) = (model.to_str().unwrap(), shards.to_str().unwrap());
    let run = |name: &str, extra: &[&str], threads: &str| {
        let out = tmp.path().join(name);
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_qat-distill"))
            .args(distill_args(m, s, out.to_str().unwrap(), extra))
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap();
        (out, o)
    };
    let (one, o) = run("one", &["--steps", "8", "--data-parallel", "1"], "2");
    ok_json(&o);
    let (three, o) = run("three", &["--steps", "8", "--data-parallel", "3"], "2");
    ok_json(&o);
    let (a, b) = (log_losses(&one), log_losses(&three));
    assert_eq!(a.len(), 8);
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-4 * x.abs(),
            "one part {a:?} vs three parts {b:?}"
        );
    }
    let settings = |dir: &Path| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(
            &std::fs::read_to_string(dir.join("provenance.json")).unwrap(),
        )
        .unwrap()["settings"]
            .clone()
    };
    assert_eq!(settings(&three)["data_parallel"], 3);
    // Auto: one part per rayon thread, at most one per sequence (-b 4).
    let (auto, o) = run("auto", &["--steps", "1"], "2");
    ok_json(&o);
    assert_eq!(settings(&auto)["data_parallel"], 2);
    let (wide, o) = run("wide", &["--steps", "1"], "9");
    ok_json(&o);
    assert_eq!(settings(&wide)["data_parallel"], 4);
    // Stopped at step 5 (checkpoint at 3) with 3 parts, resumed without --data-parallel on a
    // "machine" with 2 threads: it goes on with 3 parts and ends where the uninterrupted run does.
    let (stopped, o) = run(
        "stopped",
        &[
            "--steps",
            "8",
            "--data-parallel",
            "3",
            "--inject-nan-at",
            "5",
        ],
        "2",
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let (_, o) = run("stopped", &["--steps", "8", "--resume"], "2");
    ok_json(&o);
    assert_eq!(settings(&stopped)["data_parallel"], 3);
    assert_eq!(log_losses(&stopped), b);
    assert_eq!(
        std::fs::read(three.join("model.safetensors")).unwrap(),
        std::fs::read(stopped.join("model.safetensors")).unwrap()
    );
}

#[test]
fn parallel_shard_check_reports_the_first_bad_file_in_order() {
    // The up-front check of every shard file runs in parallel; with two damaged files the error
    // must still name the first one in file order, whichever thread finds its damage first.
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    small_shards(&shards);
    let mut files: Vec<_> = std::fs::read_dir(&shards)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 4, "small_shards writes 4 files: {files:?}");
    for f in [&files[1], &files[3]] {
        let mut bytes = std::fs::read(f).unwrap();
        bytes.push(0); // a trailing byte: the sha256 no longer matches the manifest
        std::fs::write(f, bytes).unwrap();
    }
    let model = stories_dir();
    let out = tmp.path().join("out");
    let r = qat_distill(&distill_args(
        model.to_str().unwrap(),
        shards.to_str().unwrap(),
        out.to_str().unwrap(),
        &[],
    ));
    let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
    assert_error(&r, "qat-distill", &name(&files[1]));
    assert!(
        !stderr(&r).contains(&name(&files[3])),
        "names the later file: {}",
        stderr(&r)
    );
    assert!(!out.exists(), "output written despite the error");
}

/// `--master-weights bf16` stores the trained weights rounded to bf16 after every update (the
/// measurement behind f32 master weights, README "CUDA"): every weight of the student is a
/// bf16 value, they moved from the teacher's, the setting is recorded; the default f32 run's
/// weights are not all bf16 values; an unknown dtype is refused before training.
#[test]
fn master_weights_bf16_rounds_every_update_to_bf16() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    small_shards(&shards);
    let model = stories_dir();
    let (m, s) = (model.to_str().unwrap(), shards.to_str().unwrap());
    let weights = |dir: &Path| -> Vec<f32> {
        let t = candle_core::safetensors::load(
            dir.join("model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        t["model.layers.0.mlp.down_proj.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let is_bf16 = |v: &f32| half::bf16::from_f32(*v).to_f32() == *v;
    let bf16 = tmp.path().join("bf16");
    ok_json(&qat_distill(&distill_args(
        m,
        s,
        bf16.to_str().unwrap(),
        &["--steps", "3", "--master-weights", "bf16"],
    )));
    let (trained, teacher) = (weights(&bf16), weights(&model));
    assert!(trained.iter().all(is_bf16), "a weight is not a bf16 value");
    assert!(trained.iter().zip(&teacher).any(|(a, b)| a != b));
    let prov: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bf16.join("provenance.json")).unwrap())
            .unwrap();
    assert_eq!(prov["settings"]["master_weights"], "bf16");
    assert_documented_in("formats/provenance.md", "qat-distill", &prov);
    let f32_run = tmp.path().join("f32");
    ok_json(&qat_distill(&distill_args(
        m,
        s,
        f32_run.to_str().unwrap(),
        &["--steps", "3"],
    )));
    assert!(!weights(&f32_run).iter().all(is_bf16));
    let bad = tmp.path().join("bad");
    assert_error(
        &qat_distill(&distill_args(
            m,
            s,
            bad.to_str().unwrap(),
            &["--master-weights", "int8"],
        )),
        "qat-distill",
        "--master-weights: invalid dtype \"int8\"",
    );
    assert!(!bad.exists());
}

/// `--profile` times every phase of the steps after the first (formats/summaries.md), prints
/// the shares on stderr, and changes nothing that is trained: the same weights and training log
/// as a run without it, from shards and with an online teacher (whose forward is its own phase).
#[test]
fn profile_times_the_phases_and_leaves_the_weights_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    small_shards(&shards);
    let model = stories_dir();
    let (m, s) = (model.to_str().unwrap(), shards.to_str().unwrap());
    for teacher in [false, true] {
        let mut extra = vec!["--steps", "4", "--data-parallel", "2"];
        if teacher {
            extra.extend_from_slice(&["--teacher", m]);
        }
        let plain = tmp.path().join(format!("plain-{teacher}"));
        let j = ok_json(&qat_distill(&distill_args(
            m,
            s,
            plain.to_str().unwrap(),
            &extra,
        )));
        assert!(j.get("profile").is_none(), "{j}");
        let profiled = tmp.path().join(format!("profiled-{teacher}"));
        extra.push("--profile");
        let o = qat_distill(&distill_args(m, s, profiled.to_str().unwrap(), &extra));
        let j = ok_json(&o);
        assert_documented("qat-distill", &j);
        let p = &j["profile"];
        assert_eq!(p["steps"], 3, "the first of 4 steps is not counted: {p}");
        let phase = |name: &str| p["phases"][name].as_f64().unwrap();
        for name in [
            "data",
            "batch_to_device",
            "student_forward",
            "loss",
            "backward",
            "optimizer",
        ] {
            assert!(phase(name) > 0.0, "{name}: {p}");
        }
        assert_eq!(phase("teacher_forward") > 0.0, teacher, "{p}");
        assert!(phase("backward") > phase("optimizer"), "{p}");
        assert!(
            stderr(&o).contains("qat-distill: profile of 3 steps: "),
            "{}",
            stderr(&o)
        );
        assert_eq!(log_losses(&plain), log_losses(&profiled));
        let weights = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
        assert!(weights(&plain) == weights(&profiled), "the weights differ");
    }
}
