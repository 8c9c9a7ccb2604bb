//! CLI tests of `qat-report`: PNG loss curves of real qat-distill logs (decoded: size, a line in
//! every run's colour, identical bytes on a rerun), Markdown tables of real qat-eval JSONs, and
//! exit 2 naming the file (and line) on bad input.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn qat_report(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qat-report"))
        .args(args)
        .output()
        .expect("spawn qat-report")
}

/// Colours of the first runs, as qat_report::PALETTE (kept literal: the test checks the output).
const BLUE: [u8; 3] = [31, 119, 180];
const RED: [u8; 3] = [214, 39, 40];

/// Two real 3-step students of stories260K (forward KL and CAKLD); returns their logs.
fn two_real_logs(dir: &Path) -> (PathBuf, PathBuf) {
    let shards = dir.join("shards");
    small_shards(&shards);
    let model = stories_dir();
    let mut logs = Vec::new();
    for loss in ["fkl", "cakld"] {
        let out = dir.join(format!("w4-{loss}"));
        ok_json(&qat_distill(&[
            "--model",
            model.to_str().unwrap(),
            "--shards",
            shards.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--scheme",
            "W4",
            "--loss",
            loss,
            "-b",
            "4",
            "--steps",
            "3",
            "--warmup-steps",
            "1",
            "--lr",
            "1e-3",
            "-q",
        ]));
        logs.push(out.join("train_log.jsonl"));
    }
    (logs[0].clone(), logs[1].clone())
}

/// (width, height, RGB pixels) of a PNG file.
fn decode(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    let px = buf[..info.buffer_size()]
        .chunks(3)
        .map(|c| [c[0], c[1], c[2]])
        .collect();
    (info.width, info.height, px)
}

fn count(px: &[[u8; 3]], c: [u8; 3]) -> usize {
    px.iter().filter(|p| **p == c).count()
}

#[test]
fn plot_draws_every_run_in_its_colour_and_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let (fkl, cakld) = two_real_logs(tmp.path());
    let png1 = tmp.path().join("loss.png");
    let args = |out: &Path| {
        vec![
            "plot".to_string(),
            fkl.display().to_string(),
            cakld.display().to_string(),
            "-o".into(),
            out.display().to_string(),
            "--label".into(),
            "FKL".into(),
            "--label".into(),
            "CAKLD".into(),
        ]
    };
    let a1 = args(&png1);
    let s = ok_json(&qat_report(
        &a1.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    assert_eq!(s["runs"][0]["label"], "FKL");
    assert_eq!(s["runs"][1]["points"], 3);
    let (w, h, px) = decode(&png1);
    assert_eq!((w, h), (1000, 600));
    let white = count(&px, [255, 255, 255]);
    assert!(
        white > px.len() / 2,
        "background is not mostly white: {white} of {}",
        px.len()
    );
    // Lines 2 px wide over most of the plot width, plus the legend swatch.
    assert!(
        count(&px, BLUE) > 300,
        "FKL line missing: {} blue pixels",
        count(&px, BLUE)
    );
    assert!(
        count(&px, RED) > 300,
        "CAKLD line missing: {} red pixels",
        count(&px, RED)
    );
    // Text (title, ticks, legend) is drawn: dark anti-aliased pixels exist.
    assert!(
        px.iter().filter(|p| p.iter().all(|&c| c < 80)).count() > 500,
        "no text drawn"
    );
    assert!(std::fs::read_dir(tmp.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".tmp")));

    let png2 = tmp.path().join("again.png");
    ok_json(&qat_report(
        &args(&png2).iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    assert_eq!(
        std::fs::read(&png1).unwrap(),
        std::fs::read(&png2).unwrap(),
        "same input, different bytes"
    );

    // The other axes and options render too; one run has one colour only.
    let other = tmp.path().join("lr.png");
    let (f, o) = (fkl.to_str().unwrap(), other.to_str().unwrap());
    ok_json(&qat_report(&[
        "plot", f, "-o", o, "--metric", "lr", "--x", "tokens", "--log-y", "--smooth", "2",
        "--width", "640", "--height", "400",
    ]));
    let (w, h, px) = decode(&other);
    assert_eq!((w, h), (640, 400));
    assert!(count(&px, BLUE) > 100 && count(&px, RED) == 0);
    for metric in ["grad_norm", "tokens_per_s"] {
        ok_json(&qat_report(&["plot", f, "-o", o, "--metric", metric]));
    }
}

#[test]
fn plot_refuses_bad_logs_naming_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.png");
    let o = out.to_str().unwrap();
    let good =
        r#"{"step":1,"loss":1.5,"lr":0.001,"grad_norm":2.0,"tokens":4096,"tokens_per_s":900.0}"#;

    let missing = tmp.path().join("nope/train_log.jsonl");
    assert_error(
        &qat_report(&["plot", missing.to_str().unwrap(), "-o", o]),
        "qat-report",
        "nope/train_log.jsonl: cannot read",
    );

    let garbled = tmp.path().join("garbled.jsonl");
    std::fs::write(&garbled, format!("{good}\n{{\"step\": 2, \"loss\n")).unwrap();
    assert_error(
        &qat_report(&["plot", garbled.to_str().unwrap(), "-o", o]),
        "qat-report",
        "garbled.jsonl:2: not a JSON object",
    );

    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    assert_error(
        &qat_report(&["plot", empty.to_str().unwrap(), "-o", o]),
        "qat-report",
        "empty.jsonl: empty training log",
    );

    let nan = tmp.path().join("nan.jsonl");
    std::fs::write(
        &nan,
        format!("{good}\n{good}\n{}\n", good.replace("1.5", "null")),
    )
    .unwrap();
    assert_error(
        &qat_report(&["plot", nan.to_str().unwrap(), "-o", o]),
        "qat-report",
        "nan.jsonl:3: field \"loss\" is null",
    );

    let g = tmp.path().join("good.jsonl");
    std::fs::write(&g, format!("{good}\n")).unwrap();
    let gs = g.to_str().unwrap();
    assert_error(
        &qat_report(&["plot", gs, gs, "-o", o, "--label", "one"]),
        "qat-report",
        "1 --label values for 2 logs",
    );
    assert!(!out.exists(), "an output was written on error");
    // Zero learning rate only: nothing to show on a log axis.
    let zero = tmp.path().join("zero.jsonl");
    std::fs::write(&zero, format!("{}\n", good.replace("0.001", "0.0"))).unwrap();
    assert_error(
        &qat_report(&[
            "plot",
            zero.to_str().unwrap(),
            "-o",
            o,
            "--metric",
            "lr",
            "--log-y",
        ]),
        "qat-report",
        "zero.jsonl: no points left",
    );
}

#[test]
fn table_compares_real_eval_jsons_with_fp() {
    let tmp = tempfile::tempdir().unwrap();
    let model = stories_dir();
    let corpus = tinystories();
    let mut files = Vec::new();
    for (name, scheme) in [("fp", "FP"), ("rtn-w4", "W4")] {
        let out = qat_eval(&[
            "--model",
            model.to_str().unwrap(),
            "--corpus",
            corpus.to_str().unwrap(),
            "--limit",
            "4",
            "--scheme",
            scheme,
            "-q",
        ]);
        let json = ok_json(&out);
        let path = tmp.path().join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
        files.push((path, json));
    }
    let zs = tmp.path().join("zs.json");
    std::fs::write(&zs, r#"{"model": "m", "scheme": "W4", "quantization": "fake_quant", "task": "hellaswag", "acc": 0.25, "examples": 40, "future_field": {"x": 1}}"#).unwrap();
    let (fp, rtn) = (files[0].0.to_str().unwrap(), files[1].0.to_str().unwrap());
    let out = qat_report(&["table", rtn, zs.to_str().unwrap(), "--fp", fp]);
    assert!(out.status.success(), "{}", stderr(&out));
    let md = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = md.lines().collect();
    assert_eq!(
        lines[0], "| model | scheme | quantization | ppl | x FP | nll | tokens | corpus |",
        "{md}"
    );
    // The FP reference is listed first, at 1.000x.
    assert!(
        lines[2].contains("| FP | none |") && lines[2].contains("| 1.000x |"),
        "{md}"
    );
    let rtn_json = &files[1].1;
    let ratio = rtn_json["ppl"].as_f64().unwrap() / files[0].1["ppl"].as_f64().unwrap();
    assert!(
        lines[3].contains(&format!(
            "| W4 | fake_quant | {:.4} | {ratio:.3}x |",
            rtn_json["ppl"].as_f64().unwrap()
        )),
        "{md}"
    );
    assert!(
        lines[3].contains(&format!("| {} |", rtn_json["tokens"])),
        "{md}"
    );
    assert!(
        lines[3].contains(&rtn_json["corpus_sha256"].as_str().unwrap()[..12]),
        "{md}"
    );
    assert!(
        md.contains("| m | W4 | fake_quant | hellaswag | acc 0.2500 | 40 |"),
        "{md}"
    );

    // Written atomically with -o, same text.
    let o = tmp.path().join("t.md");
    let out2 = qat_report(&[
        "table",
        rtn,
        zs.to_str().unwrap(),
        "--fp",
        fp,
        "-o",
        o.to_str().unwrap(),
    ]);
    assert!(out2.status.success());
    assert_eq!(std::fs::read_to_string(&o).unwrap(), md);

    // An unknown JSON shape or a missing file: exit 2 naming the file.
    let odd = tmp.path().join("odd.json");
    std::fs::write(&odd, r#"{"loss": 1.0}"#).unwrap();
    assert_error(
        &qat_report(&["table", rtn, odd.to_str().unwrap()]),
        "qat-report",
        "odd.json: not an eval JSON",
    );
    let log = tmp.path().join("log.jsonl");
    std::fs::write(&log, "{\"step\":1}\n{\"step\":2}\n").unwrap();
    assert_error(
        &qat_report(&["table", log.to_str().unwrap()]),
        "qat-report",
        "log.jsonl: not an eval JSON: invalid JSON",
    );
    assert_error(
        &qat_report(&["table", rtn, "--fp", "missing.json"]),
        "qat-report",
        "missing.json: cannot read",
    );
}
