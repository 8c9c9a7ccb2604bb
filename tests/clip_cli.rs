//! CLI tests of `qat-clip`: the clipping search lowers every layer's output error, the clipped
//! model is better than round-to-nearest, runs are deterministic, and bad input exits 2.

mod common;

use common::*;

fn clip_args<'a>(shards: &'a str, scheme: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "--shards",
        shards,
        "--scheme",
        scheme,
        "--out",
        out,
        "--calib-sequences",
        "8",
        "--calib-len",
        "48",
        "-q",
    ]
}

#[test]
fn clipping_lowers_every_layer_error_and_beats_round_to_nearest() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    small_shards(&shards);
    let scheme = group_scheme(tmp.path(), "asym_group", 2);
    let out = tmp.path().join("clipped");
    let model = stories_dir();
    let (s, sc, o) = (
        shards.to_str().unwrap(),
        scheme.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let mut args = vec!["--model", model.to_str().unwrap()];
    args.extend(clip_args(s, sc, o));
    let report = ok_json(&qat_clip(&args));
    assert_documented("qat-clip", &report);
    let layers = report["layers"].as_array().unwrap();
    // q_proj and k_proj are skipped by default: v, o, gate, up, down of 5 blocks.
    assert_eq!(layers.len(), 25);
    assert!(layers
        .iter()
        .all(|l| !l["layer"].as_str().unwrap().contains("q_proj")
            && !l["layer"].as_str().unwrap().contains("k_proj")));
    for l in layers {
        assert!(
            l["mse_after"].as_f64().unwrap() <= l["mse_before"].as_f64().unwrap(),
            "{l}"
        );
    }
    assert!(report["mean_reduction"].as_f64().unwrap() > 0.2, "{report}");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "quant_scheme.json",
        "provenance.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(!tmp.path().join("clipped.partial").exists());
    let provenance: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("provenance.json")).unwrap())
            .unwrap();
    assert_documented_in("formats/provenance.md", "qat-clip", &provenance);
    assert_eq!(provenance["report"]["layers"], report["layers"]);
    // 2-bit round-to-nearest of the teacher vs the clipped teacher, same scheme, no training.
    let corpus = tinystories();
    let eval = |m: &str, extra: &[&str]| {
        let mut a = vec![
            "--model",
            m,
            "--corpus",
            corpus.to_str().unwrap(),
            "--limit",
            "16",
            "-q",
        ];
        a.extend_from_slice(extra);
        ok_json(&qat_eval(&a))["ppl"].as_f64().unwrap()
    };
    let rtn = eval(model.to_str().unwrap(), &["--scheme", sc]);
    let clipped = eval(o, &[]);
    assert!(
        clipped < 0.7 * rtn,
        "clipped {clipped} vs round-to-nearest {rtn}"
    );
    // Same inputs, same bytes.
    let again = tmp.path().join("again");
    let mut args2 = vec!["--model", model.to_str().unwrap()];
    args2.extend(clip_args(s, sc, again.to_str().unwrap()));
    ok_json(&qat_clip(&args2));
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(again.join("model.safetensors")).unwrap()
    );
}

#[test]
fn a_group_size_that_does_not_divide_a_layer_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    small_shards(&shards);
    let out = tmp.path().join("clipped");
    let model = stories_dir();
    let mut args = vec!["--model", model.to_str().unwrap()];
    args.extend(clip_args(
        shards.to_str().unwrap(),
        "W3G32",
        out.to_str().unwrap(),
    ));
    let r = qat_clip(&args);
    assert_error(
        &r,
        "qat-clip",
        "group size 32 does not divide in_features 172",
    );
    assert!(!out.exists() && !tmp.path().join("clipped.partial").exists());
}

/// `--device`: a bad name, or CUDA in a build without it, exits 2 before any work.
#[test]
fn a_device_this_build_cannot_use_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    small_shards(&shards);
    let out = tmp.path().join("clipped");
    let model = stories_dir();
    let mut cases = vec![(
        "gpu",
        "invalid device \"gpu\": expected cpu, cuda or cuda:N",
    )];
    if !cfg!(feature = "cuda") {
        cases.push(("cuda:0", "this build has no CUDA support"));
    }
    for (device, want) in cases {
        let mut args = vec!["--model", model.to_str().unwrap(), "--device", device];
        args.extend(clip_args(
            shards.to_str().unwrap(),
            "W2CH",
            out.to_str().unwrap(),
        ));
        assert_error(&qat_clip(&args), "qat-clip", want);
        assert!(!out.exists() && !tmp.path().join("clipped.partial").exists());
    }
}

#[test]
fn missing_shards_are_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("clipped");
    let missing = tmp.path().join("no-such-shards");
    let model = stories_dir();
    let mut args = vec!["--model", model.to_str().unwrap()];
    args.extend(clip_args(
        missing.to_str().unwrap(),
        "W2CH",
        out.to_str().unwrap(),
    ));
    let r = qat_clip(&args);
    assert_eq!(r.status.code(), Some(2), "{}", stderr(&r));
    assert!(stderr(&r).contains("no-such-shards"), "{}", stderr(&r));
    assert!(!out.exists());
}

#[test]
fn a_full_disk_leaves_no_partial_output() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    small_shards(&shards);
    let out = tmp.path().join("clipped");
    let model = stories_dir();
    let mut args = vec!["--model", model.to_str().unwrap()];
    args.extend(clip_args(
        shards.to_str().unwrap(),
        "W2CH",
        out.to_str().unwrap(),
    ));
    // model.safetensors (~1 MB) does not fit under a 200 kB per-file limit.
    let r = run_with_file_size_limit(env!("CARGO_BIN_EXE_qat-clip"), &args, 200_000);
    assert_eq!(r.status.code(), Some(2), "{}", stderr(&r));
    assert!(stderr(&r).contains("File too large"), "{}", stderr(&r));
    assert!(
        !out.exists() && !tmp.path().join("clipped.partial").exists(),
        "{:?}",
        names(tmp.path())
    );
}
