//! CLI tests of `qat-sample` on stories260K: content, determinism, partitions, resume, errors.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use qat_model::ModelDir;
use qat_shards::ShardSet;
use std::path::Path;

const SMALL: &[&str] = &[
    "-n",
    "24",
    "--max-len",
    "40",
    "-K",
    "16",
    "--batch-size",
    "4",
    "--seqs-per-file",
    "8",
    "-q",
];

/// `qat-sample` of stories260K into `out` with [`SMALL`] settings and `extra` flags.
fn run_sample(out: &Path, extra: &[&str]) -> std::process::Output {
    let model = stories_dir();
    let mut args = vec![
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(extra);
    qat_sample(&args)
}

fn sample_into(out: &Path, extra: &[&str]) -> serde_json::Value {
    ok_json(&run_sample(out, extra))
}

#[test]
fn shards_hold_the_teachers_own_distributions() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s");
    let summary = sample_into(&out, &["--logprob-dtype", "f32"]);
    assert_eq!(summary["sequences"], 24);
    let set = ShardSet::open(&out).unwrap();
    set.verify().unwrap();
    let md = ModelDir::open(stories_dir()).unwrap();
    let model = md.load(&Device::Cpu, DType::F32).unwrap();
    let k = 16;
    let mut n = 0;
    for rec in set.records() {
        let rec = rec.unwrap();
        n += 1;
        let l = rec.tokens.len();
        assert_eq!(rec.prompt_len, 2, "BOS + start token");
        assert_eq!(rec.tokens[0], 1);
        assert_eq!(rec.topk_ids.len(), (l - 1) * k);
        // Start tokens cycle through the non-special vocabulary: ids 3, 4, ... by seq id.
        assert_eq!(rec.tokens[1], 3 + rec.seq_id as u32);
        // The greedy prefix (at least 3 tokens) is the argmax of the stored distribution.
        for i in 1..4 {
            assert_eq!(
                rec.tokens[i + 1],
                rec.topk_ids[i * k],
                "seq {} position {i}",
                rec.seq_id
            );
        }
        // Independent check: a full forward of the finished sequence gives the same top-K.
        let x = Tensor::from_vec(rec.tokens.clone(), (1, l), &Device::Cpu).unwrap();
        let logp =
            candle_nn::ops::log_softmax(&model.forward_full(&x).unwrap().squeeze(0).unwrap(), 1)
                .unwrap();
        let logp: Vec<Vec<f32>> = logp.to_vec2().unwrap();
        for (i, row) in logp.iter().take(l - 1).enumerate() {
            for j in 0..k {
                let id = rec.topk_ids[i * k + j] as usize;
                let diff = (row[id] - rec.topk_logprobs[i * k + j]).abs();
                assert!(
                    diff < 1e-4,
                    "seq {} pos {i} rank {j}: {} vs {}",
                    rec.seq_id,
                    row[id],
                    rec.topk_logprobs[i * k + j]
                );
            }
            assert!(rec.topk_logprobs[i * k..(i + 1) * k]
                .windows(2)
                .all(|w| w[0] >= w[1]));
        }
        assert!(l == 40 || rec.tokens[l - 1] == 2, "ends at max-len or EOS");
    }
    assert_eq!(n, 24);
}

#[test]
fn same_inputs_give_identical_bytes_and_partitions_merge_into_the_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, merged) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("m"),
    );
    sample_into(&a, &[]);
    sample_into(&b, &[]);
    assert_eq!(dir_files(&a), dir_files(&b), "two identical runs differ");
    // Partitions 0/2 and 1/2 into one directory (as two machines would, then copied together).
    let s0 = sample_into(&merged, &["--shard", "0/2"]);
    let s1 = sample_into(&merged, &["--shard", "1/2"]);
    assert_eq!(
        s0["sequences"].as_u64().unwrap() + s1["sequences"].as_u64().unwrap(),
        24
    );
    assert_eq!(
        names(&merged),
        [
            "manifest.0-of-2.json",
            "manifest.1-of-2.json",
            "shard-00000.parquet",
            "shard-00001.parquet",
            "shard-00002.parquet"
        ]
    );
    let whole: Vec<_> = dir_files(&a)
        .into_iter()
        .filter(|(n, _)| n.ends_with(".parquet"))
        .collect();
    let parts: Vec<_> = dir_files(&merged)
        .into_iter()
        .filter(|(n, _)| n.ends_with(".parquet"))
        .collect();
    assert_eq!(
        whole, parts,
        "the union of the partitions is not the single-machine set"
    );
    let set = ShardSet::open(&merged).unwrap();
    set.verify().unwrap();
    let ids: Vec<u64> = set.records().map(|r| r.unwrap().seq_id).collect();
    assert_eq!(ids, (0..24).collect::<Vec<_>>());
    // A different seed gives different shards.
    let c = tmp.path().join("c");
    sample_into(&c, &["--seed", "1"]);
    assert_ne!(dir_files(&a)[1], dir_files(&c)[1]);
}

#[test]
fn rerun_resumes_after_a_killed_run_with_identical_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, killed) = (tmp.path().join("whole"), tmp.path().join("killed"));
    let model = stories_dir();
    let args = |out: &Path| -> Vec<String> {
        [
            "--model",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "-n",
            "192",
            "--max-len",
            "128",
            "-K",
            "8",
            "--batch-size",
            "8",
            "--seqs-per-file",
            "8",
            "-q",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    ok_json(&qat_sample(
        &args(&whole).iter().map(|s| s.as_str()).collect::<Vec<_>>(),
    ));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_qat-sample"))
        .args(args(&killed))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill -9 once the manifest lists at least two finished files.
    let manifest = killed.join("manifest.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let listed = std::fs::read_to_string(&manifest)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .map_or(0, |m| m["files"].as_array().map_or(0, |f| f.len()));
        if listed >= 2 || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    assert_eq!(
        m["complete"], false,
        "the run finished before it could be killed; the test needs a longer run"
    );
    assert!(
        ShardSet::open(&killed).is_err(),
        "an incomplete set must not open"
    );
    let summary = ok_json(&qat_sample(
        &args(&killed).iter().map(|s| s.as_str()).collect::<Vec<_>>(),
    ));
    assert!(summary["files_resumed"].as_u64().unwrap() >= 2);
    assert_documented("qat-sample", &summary);
    let keep = |d: &Path| {
        dir_files(d)
            .into_iter()
            .filter(|(n, _)| !n.ends_with(".tmp"))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        keep(&whole),
        keep(&killed),
        "resumed shards differ from an uninterrupted run"
    );
    assert!(
        !names(&killed).iter().any(|n| n.ends_with(".tmp")),
        "stale temporary files left: {:?}",
        names(&killed)
    );
}

#[test]
fn prompt_mode_stores_prompts_and_marks_them() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        "{\"text\": \"Once upon a time\"}\n\n{\"text\": \"The cat sat on the big red mat and\"}\n",
    )
    .unwrap();
    let out = tmp.path().join("s");
    let model = stories_dir();
    let s = ok_json(&qat_sample(&[
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--max-len",
        "32",
        "-K",
        "4",
        "-q",
    ]));
    assert_eq!(s["sequences"], 2);
    let tok = ModelDir::open(&model).unwrap().tokenizer().unwrap();
    let recs: Vec<_> = ShardSet::open(&out)
        .unwrap()
        .records()
        .map(|r| r.unwrap())
        .collect();
    for (rec, text) in recs
        .iter()
        .zip(["Once upon a time", "The cat sat on the big red mat and"])
    {
        let want = tok.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(rec.prompt_len as usize, want.len());
        assert_eq!(&rec.tokens[..want.len()], want.as_slice());
        assert!(rec.tokens.len() > want.len());
    }
}

#[test]
fn bad_inputs_fail_with_exit_2_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let model = stories_dir();
    let m = model.to_str().unwrap();
    let out = tmp.path().join("out");
    let o = out.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["-q", "-n", "4", "--max-len", "16"];
        args.extend_from_slice(extra);
        qat_sample(&args)
    };
    // Missing and invalid model directories.
    assert_error(
        &run(&["--model", "/nonexistent/model", "--out", o]),
        "qat-sample",
        "/nonexistent/model: not a model directory: no such directory",
    );
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_error(
        &run(&["--model", empty.to_str().unwrap(), "--out", o]),
        "qat-sample",
        "config.json is missing",
    );
    // A model whose tokenizer has more tokens than config.json's vocab_size.
    let mixed = tmp.path().join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(model.join(f), mixed.join(f)).unwrap();
    }
    std::fs::copy(
        data_dir().join("models/llama2-tokenizer/tokenizer.json"),
        mixed.join("tokenizer.json"),
    )
    .unwrap();
    assert_error(
        &run(&["--model", mixed.to_str().unwrap(), "--out", o]),
        "qat-sample",
        "vocabulary of 32000 tokens does not fit config.json vocab_size 512",
    );
    // K larger than the vocabulary, bad partitions.
    assert_error(
        &run(&["--model", m, "--out", o, "-K", "513"]),
        "qat-sample",
        "--top-k-logprobs 513 must be in 1..=512",
    );
    for bad in ["3/2", "a/b", "0/0", "1"] {
        let r = run(&["--model", m, "--out", o, "--shard", bad]);
        assert_eq!(r.status.code(), Some(2), "--shard {bad}: {}", stderr(&r));
        assert!(stderr(&r).contains("--shard"), "{}", stderr(&r));
    }
    // Unwritable output (a path below a regular file).
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let below = file.join("sub");
    assert_error(
        &run(&["--model", m, "--out", below.to_str().unwrap()]),
        "qat-sample",
        "cannot create output directory",
    );
    // Unreadable and malformed prompt files.
    assert_error(
        &run(&[
            "--model",
            m,
            "--out",
            o,
            "--prompts",
            "/nonexistent/p.jsonl",
        ]),
        "qat-sample",
        "/nonexistent/p.jsonl: cannot read prompts file",
    );
    let bad_jsonl = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad_jsonl,
        "{\"text\": \"ok\"}\n{\"prompt\": \"no text field\"}\n",
    )
    .unwrap();
    assert_error(
        &run(&[
            "--model",
            m,
            "--out",
            o,
            "--prompts",
            bad_jsonl.to_str().unwrap(),
        ]),
        "qat-sample",
        "bad.jsonl: line 2: no string field \"text\"",
    );
    assert!(
        names(&out).is_empty(),
        "files were written on error: {:?}",
        names(&out)
    );
}

#[test]
fn a_rerun_with_other_settings_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s");
    sample_into(&out, &[]);
    let before = dir_files(&out);
    let r = run_sample(&out, &["--temperature", "0.7"]);
    assert_error(&r, "qat-sample", "different settings");
    assert_eq!(
        before,
        dir_files(&out),
        "a refused run changed the shard directory"
    );
}

/// `--profile` times every batch after the first (formats/summaries.md), prints the shares on
/// stderr, and changes no byte of the shards or the manifest.
#[test]
fn profile_times_the_batches_and_changes_no_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let (plain, profiled) = (tmp.path().join("plain"), tmp.path().join("profiled"));
    let s = sample_into(&plain, &[]);
    assert!(s.get("profile").is_none(), "{s}");
    let o = run_sample(&profiled, &["--profile"]);
    let s = ok_json(&o);
    assert_documented("qat-sample", &s);
    let p = &s["profile"];
    assert_eq!(p["steps"], 24 / 4 - 1, "batches after the first: {p}");
    for phase in [
        "prefill",
        "decode_forward",
        "logits_to_host",
        "log_softmax_topk_sample",
        "write",
    ] {
        assert!(p["phases"][phase].as_f64().unwrap() > 0.0, "{phase}: {p}");
    }
    assert!(
        stderr(&o).contains("qat-sample: profile of 5 batches: "),
        "{}",
        stderr(&o)
    );
    assert_eq!(dir_files(&plain), dir_files(&profiled));
}
