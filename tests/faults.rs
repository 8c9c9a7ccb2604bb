//! Fault injection (issue 5): `kill -9` of `qat-sample` and `qat-distill` at seeded points,
//! NaN steps, and a full disk while writing. After every fault the on-disk state must be
//! consistent (nothing under a final name is partial, nothing listed is wrong), and rerunning
//! the same command (`--resume` for `qat-distill`) must give the bytes of an uninterrupted run.
//!
//! Kill points come from a seeded generator (see `Rng`); each test prints the points it used.

mod common;

use common::*;
use qat_shards::{Manifest, ShardSet};
use std::path::Path;
use std::time::{Duration, Instant};

const SAMPLE: &str = env!("CARGO_BIN_EXE_qat-sample");
const DISTILL: &str = env!("CARGO_BIN_EXE_qat-distill");
const PACK: &str = env!("CARGO_BIN_EXE_qat-pack");

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Files of `manifest.json` listed so far (0 if it does not exist or is being replaced).
fn listed(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("manifest.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .map_or(0, |m| m["files"].as_array().map_or(0, |f| f.len() as u64))
}

/// The state a killed `qat-sample` leaves: every shard under its final name is complete (the
/// reference's bytes), the manifest parses and lists only files that verify, and the set does
/// not open while a partition is incomplete.
fn check_killed_sample_state(out: &Path, reference: &[(String, Vec<u8>)]) {
    for (name, bytes) in dir_files(out) {
        if name.starts_with("shard-") && name.ends_with(".parquet") {
            let want = reference.iter().find(|(n, _)| *n == name).map(|(_, b)| b);
            assert_eq!(
                Some(&bytes),
                want,
                "{name} is under its final name but differs from the uninterrupted run"
            );
        }
    }
    let path = out.join("manifest.json");
    if path.exists() {
        let m = Manifest::load(&path).expect("a manifest under its final name is complete");
        for e in &m.files {
            assert!(
                qat_shards::verify_entry(out, e).unwrap(),
                "{} is listed but does not verify",
                e.name
            );
        }
        assert_eq!(
            ShardSet::open(out).is_ok(),
            m.complete,
            "only a complete set opens"
        );
    }
}

#[test]
fn qat_sample_killed_at_seeded_points_resumes_to_identical_bytes() {
    let tmp = fast_tempdir();
    let model = stories_dir();
    let args = |out: &Path| {
        strings(&[
            "--model",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "-n",
            "48",
            "--max-len",
            "48",
            "-K",
            "8",
            "--batch-size",
            "4",
            "--seqs-per-file",
            "4",
            "-q",
        ])
    };
    let whole = tmp.path().join("whole");
    let t0 = Instant::now();
    ok_json(&qat_sample(&strs(&args(&whole))));
    let full_ms = t0.elapsed().as_millis() as u64;
    let reference = dir_files(&whole);
    let num_files = 12;

    let out = tmp.path().join("killed");
    let mut rng = Rng(0x1550_0005);
    let (mut kills, mut restarts) = (Vec::new(), 0);
    while kills.len() < 10 {
        assert!(
            restarts < 10,
            "the runs keep finishing before their kill points: {kills:?}"
        );
        let (label, landed) = match rng.below(3) {
            0 => {
                let ms = rng.below(full_ms / 4 + 1);
                (
                    format!("after {ms} ms"),
                    kill_when(SAMPLE, &args(&out), |t| t >= Duration::from_millis(ms)),
                )
            }
            1 => {
                // Mid-file: a shard's .tmp exists (rows generated, file not yet renamed).
                let tmp_exists = |d: &Path| {
                    names(d)
                        .iter()
                        .any(|n| n.starts_with("shard-") && n.ends_with(".tmp"))
                };
                (
                    "while a shard .tmp exists".to_string(),
                    kill_when(SAMPLE, &args(&out), |_| tmp_exists(&out)),
                )
            }
            _ => {
                let (n, extra) = (1 + rng.below(num_files - 1), rng.below(3));
                let mut seen: Option<Instant> = None;
                let fire = |_| {
                    if seen.is_none() && listed(&out) >= n {
                        seen = Some(Instant::now());
                    }
                    seen.is_some_and(|s| s.elapsed() >= Duration::from_millis(extra))
                };
                (
                    format!("{extra} ms after the manifest lists {n} files"),
                    kill_when(SAMPLE, &args(&out), fire),
                )
            }
        };
        if landed {
            check_killed_sample_state(&out, &reference);
            kills.push(label);
        } else {
            // The run finished before its kill point: it must be the whole set; start a new job.
            assert_eq!(
                dir_files(&out),
                reference,
                "a resumed run finished with other bytes"
            );
            std::fs::remove_dir_all(&out).unwrap();
            restarts += 1;
        }
    }
    eprintln!("qat-sample kill points ({restarts} fresh restarts): {kills:#?}");
    ok_json(&qat_sample(&strs(&args(&out))));
    let got = dir_files(&out);
    assert_eq!(
        got.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        reference.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        "other files (leftovers?) after resuming"
    );
    assert_eq!(
        got, reference,
        "resumed shards or manifest differ from an uninterrupted run"
    );
}

/// Kills `bin args` at `kills` seeded points, each run continuing what the last one left: at a
/// random moment within `window_ms`, or (seeded, alternately) as soon as `progress()` (what the
/// run has saved: batches, lines, blocks) exceeds its value at the start. Progress must never go
/// back (but to 0, when a kill lands after the run removed it at its very end). A run that
/// finishes before its kill point is passed to `finished` (which checks it and clears its
/// output, so the next run starts over). Returns the kill points, for the log.
fn kill_at_seeded_points(
    bin: &str,
    args: &[String],
    seed: u64,
    window_ms: u64,
    kills: usize,
    progress: impl Fn() -> u64,
    mut finished: impl FnMut(),
) -> Vec<String> {
    let mut rng = Rng(seed);
    let (mut points, mut restarts) = (Vec::new(), 0);
    while points.len() < kills {
        assert!(restarts < 10, "the runs keep finishing first: {points:?}");
        let before = progress();
        let (label, landed) = if rng.below(2) == 0 {
            let ms = rng.below(window_ms + 1);
            let fire = |t: Duration| t >= Duration::from_millis(ms);
            (format!("after {ms} ms"), kill_when(bin, args, fire))
        } else {
            let fire = |_| progress() > before;
            (
                format!("after progress {}", before + 1),
                kill_when(bin, args, fire),
            )
        };
        if landed {
            // 0: killed after the run removed its progress at the very end.
            let after = progress();
            assert!(
                after >= before || after == 0,
                "{label}: the saved progress went back"
            );
            points.push(label);
        } else {
            finished();
            restarts += 1;
        }
    }
    eprintln!("{bin}: kill points ({restarts} fresh restarts): {points:#?}");
    points
}

/// `qat-eval --checkpoint`: killed at seeded points, each rerun continuing from the file the
/// last one left, the evaluation ends with the NLL bits of an uninterrupted run and removes
/// its checkpoint.
#[test]
fn qat_eval_killed_at_seeded_points_resumes_to_the_identical_nll() {
    let tmp = fast_tempdir();
    let (model, corpus) = (stories_dir(), tinystories());
    let ckpt = tmp.path().join("ppl.ckpt");
    let args = |checkpoint: bool| {
        let mut v = strings(&[
            "--model",
            model.to_str().unwrap(),
            "--corpus",
            corpus.to_str().unwrap(),
            "--limit",
            "200",
            "-b",
            "2",
            "-q",
        ]);
        if checkpoint {
            v.extend(strings(&["--checkpoint", ckpt.to_str().unwrap()]));
        }
        v
    };
    let eval = env!("CARGO_BIN_EXE_qat-eval");
    let t0 = Instant::now();
    let whole = ok_json(&qat_eval(&strs(&args(false))));
    let full_ms = t0.elapsed().as_millis() as u64;
    // The file is absent (before the first batch, after the end) or complete; never torn.
    let batches_done = || -> u64 {
        std::fs::read_to_string(&ckpt).map_or(0, |text| {
            let state: serde_json::Value = serde_json::from_str(&text).unwrap();
            state["batches"].as_u64().unwrap()
        })
    };
    let finished = || assert!(!ckpt.exists(), "a finished run left its checkpoint");
    let window = full_ms / 3;
    kill_at_seeded_points(
        eval,
        &args(true),
        0x1550_0e7a,
        window,
        6,
        batches_done,
        finished,
    );
    let resumed_from = batches_done();
    // The checkpoint is keyed by the resolved dtype, not by how the flag spells it.
    let mut last = args(true);
    last.extend(strings(&["--dtype", "fp32"]));
    let done = ok_json(&qat_eval(&strs(&last)));
    let all = whole["sequences"].as_u64().unwrap();
    assert_eq!(done["resumed_sequences"], (2 * resumed_from).min(all));
    for field in ["nll", "ppl", "tokens", "sequences"] {
        assert_eq!(
            done[field], whole[field],
            "{field} differs from an uninterrupted run"
        );
    }
    assert!(
        !ckpt.exists(),
        "the checkpoint is removed after the result is printed"
    );
}

/// `qat-eval --task ... --checkpoint`: killed at seeded points (two tasks, so kills land in
/// either), the rerun ends with the per-item scores of an uninterrupted run, bit for bit, and
/// removes its checkpoint.
#[test]
fn qat_eval_tasks_killed_at_seeded_points_resume_to_identical_scores() {
    let tmp = fast_tempdir();
    let model = stories_dir();
    let ckpt = tmp.path().join("tasks.ckpt");
    let args = |items: &Path, checkpoint: bool| {
        let mut v = strings(&[
            "--model",
            model.to_str().unwrap(),
            "--task",
            "piqa,arc-easy",
            "--limit",
            "60",
            "-b",
            "2",
            "-q",
            "--per-item",
            items.to_str().unwrap(),
        ]);
        if checkpoint {
            v.extend(strings(&["--checkpoint", ckpt.to_str().unwrap()]));
        }
        v
    };
    let eval = env!("CARGO_BIN_EXE_qat-eval");
    let (whole_items, items) = (
        tmp.path().join("whole.jsonl"),
        tmp.path().join("items.jsonl"),
    );
    let t0 = Instant::now();
    let whole = ok_json(&qat_eval(&strs(&args(&whole_items, false))));
    let full_ms = t0.elapsed().as_millis() as u64;
    let lines = || std::fs::read_to_string(&ckpt).map_or(0, |t| t.lines().count() as u64);
    let finished = || assert!(!ckpt.exists(), "a finished run left its checkpoint");
    let run = args(&items, true);
    kill_at_seeded_points(eval, &run, 0x1550_7a5c, full_ms, 6, lines, finished);
    // On a loaded machine the seeded points may all land before the first saved batch (after a
    // run that finished and removed its file): then one more kill, once a batch is saved, so
    // that the last run below has something to resume.
    let newlines = || std::fs::read_to_string(&ckpt).map_or(0, |t| t.matches('\n').count());
    if newlines() < 2 {
        assert!(
            kill_when(eval, &run, |_| newlines() >= 2),
            "the run finished before saving a batch"
        );
    }
    // The requests the file holds (complete lines after the header) are not scored again.
    let text = std::fs::read_to_string(&ckpt).unwrap();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    let saved: usize = complete
        .lines()
        .skip(1)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["scores"].as_array().unwrap().len()
        })
        .sum();
    assert!(saved > 0, "no batch was saved before the last kill");
    let done = ok_json(&qat_eval(&strs(&args(&items, true))));
    let resumed = |t: &str| done["tasks"][t]["resumed_requests"].as_u64().unwrap() as usize;
    assert_eq!(resumed("piqa") + resumed("arc-easy"), saved);
    for task in ["piqa", "arc-easy"] {
        for field in ["acc", "acc_norm", "items", "requests", "tokens"] {
            assert_eq!(
                done["tasks"][task][field], whole["tasks"][task][field],
                "{task} {field}"
            );
        }
    }
    assert_eq!(
        std::fs::read(&items).unwrap(),
        std::fs::read(&whole_items).unwrap(),
        "per-item scores differ from an uninterrupted run"
    );
    assert!(
        !ckpt.exists(),
        "the checkpoint is removed after the result is printed"
    );
}

/// `qat-clip` killed at seeded points (between blocks, while writing one, while writing the
/// output) continues from `<out>.work/` and ends with the weights and per-layer report of an
/// uninterrupted run; another search's progress directory is refused.
#[test]
fn qat_clip_killed_at_seeded_points_resumes_to_identical_weights() {
    let tmp = fast_tempdir();
    let shards = tmp.path().join("shards");
    small_shards(&shards);
    let model = stories_dir();
    let args = |out: &Path, calib: &str| {
        strings(&[
            "--model",
            model.to_str().unwrap(),
            "--shards",
            shards.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--scheme",
            "W4A8KV4",
            "--include-qk",
            "--calib-sequences",
            calib,
            "--calib-len",
            "48",
            "-q",
        ])
    };
    let clip = env!("CARGO_BIN_EXE_qat-clip");
    let whole = tmp.path().join("whole");
    let t0 = Instant::now();
    let reference = ok_json(&qat_clip(&strs(&args(&whole, "16"))));
    let full_ms = t0.elapsed().as_millis() as u64;
    let out = tmp.path().join("killed");
    let work = tmp.path().join("killed.work");
    let blocks_done = || -> u64 {
        std::fs::read_to_string(work.join("state.json")).map_or(0, |t| {
            serde_json::from_str::<serde_json::Value>(&t).unwrap()["blocks_done"]
                .as_u64()
                .unwrap()
        })
    };
    let finished = || {
        assert!(!work.exists(), "a finished run left its progress directory");
        assert_eq!(
            std::fs::read(out.join("model.safetensors")).unwrap(),
            std::fs::read(whole.join("model.safetensors")).unwrap()
        );
        std::fs::remove_dir_all(&out).unwrap();
    };
    let run = args(&out, "16");
    kill_at_seeded_points(clip, &run, 0x1550_c11b, full_ms, 6, blocks_done, finished);
    if work.join("state.json").exists() {
        // Other settings: the progress of this search is not used for that one.
        assert_error(
            &qat_clip(&strs(&args(&out, "8"))),
            "qat-clip",
            "made by another search",
        );
    }
    let done = ok_json(&qat_clip(&strs(&args(&out, "16"))));
    assert_eq!(
        done["layers"], reference["layers"],
        "per-layer report differs"
    );
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(whole.join("model.safetensors")).unwrap(),
        "clipped weights differ from an uninterrupted run"
    );
    assert!(
        !work.exists(),
        "the progress directory is removed at the end"
    );
}

/// A student directory compared across runs: every file's bytes, with the wall-clock field of
/// `train_log.jsonl` (tokens_per_s) dropped.
fn student_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    tree_files(dir)
        .into_iter()
        .map(|(name, bytes)| {
            if name != "train_log.jsonl" {
                return (name, bytes);
            }
            let text = String::from_utf8(bytes).unwrap();
            let lines: Vec<String> = text
                .lines()
                .map(|l| {
                    let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                    v.as_object_mut().unwrap().remove("tokens_per_s");
                    v.to_string()
                })
                .collect();
            (name, lines.join("\n").into_bytes())
        })
        .collect()
}

fn distill_args(model: &Path, shards: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = strings(&[
        "--model",
        model.to_str().unwrap(),
        "--shards",
        shards.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    v.extend(strings(SMALL_DISTILL_ARGS));
    v.extend(strings(extra));
    v
}

fn work_dir(out: &Path) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("{}.work", out.display()))
}

/// The state a killed `qat-distill` leaves: no output directory (it appears only when
/// complete), and a checkpoint, if any, that parses and is from a checkpoint step.
fn check_killed_distill_state(out: &Path) {
    assert!(!out.exists(), "a killed run left {}", out.display());
    let ckpt = work_dir(out).join("checkpoint");
    if ckpt.exists() {
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(ckpt.join("state.json")).unwrap())
                .expect("state.json parses");
        assert_eq!(
            state["step"].as_u64().unwrap() % 2,
            0,
            "checkpoints are every 2 steps: {state}"
        );
        for f in ["weights.safetensors", "optimizer.safetensors"] {
            candle_core::safetensors::load(ckpt.join(f), &candle_core::Device::Cpu)
                .unwrap_or_else(|e| panic!("{f}: {e}"));
        }
    }
}

#[test]
fn qat_distill_killed_at_seeded_points_resumes_to_the_identical_loss_curve_and_weights() {
    let tmp = fast_tempdir();
    let shards = tmp.path().join("shards");
    small_shards(&shards);
    let model = stories_dir();
    let steps = 24;
    let args = |out: &Path| {
        distill_args(
            &model,
            &shards,
            out,
            &["--steps", "24", "--checkpoint-every", "2", "--resume"],
        )
    };
    let whole = tmp.path().join("whole");
    let t0 = Instant::now();
    ok_json(&qat_distill(&strs(&args(&whole))));
    let full_ms = t0.elapsed().as_millis() as u64;
    let reference = student_files(&whole);

    let out = tmp.path().join("killed");
    let work = work_dir(&out);
    let log_lines = |w: &Path| {
        std::fs::read_to_string(w.join("train_log.jsonl")).map_or(0, |t| t.lines().count() as u64)
    };
    let ckpt_step = |w: &Path| {
        std::fs::read(w.join("checkpoint/state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .map_or(0, |s| s["step"].as_u64().unwrap_or(0))
    };
    let mut rng = Rng(0x1550_0005 ^ 0xD15);
    let (mut kills, mut restarts) = (Vec::new(), 0);
    while kills.len() < 10 {
        assert!(
            restarts < 10,
            "the runs keep finishing before their kill points: {kills:?}"
        );
        let bound = Duration::from_millis(full_ms / 3);
        let (label, landed) = match rng.below(4) {
            0 => {
                let ms = rng.below(full_ms / 3 + 1);
                (
                    format!("after {ms} ms"),
                    kill_when(DISTILL, &args(&out), |t| t >= Duration::from_millis(ms)),
                )
            }
            1 => {
                // Mid-checkpoint: checkpoint.tmp is being written (or, if the poll misses it, a delay).
                let mut how = "after the fallback delay";
                let landed = kill_when(DISTILL, &args(&out), |t| {
                    if work.join("checkpoint.tmp").exists() {
                        how = "while checkpoint.tmp exists";
                        return true;
                    }
                    t >= bound
                });
                (how.to_string(), landed)
            }
            2 => {
                let (n, extra) = (2 * (1 + rng.below(steps / 2 - 1)), rng.below(20));
                let mut seen: Option<Instant> = None;
                let fire = |t| {
                    if seen.is_none() && ckpt_step(&work) >= n {
                        seen = Some(Instant::now());
                    }
                    seen.is_some_and(|s| s.elapsed() >= Duration::from_millis(extra))
                        || t >= 2 * bound
                };
                (
                    format!(
                        "{extra} ms after checkpoint step >= {n} (or {} ms)",
                        2 * bound.as_millis()
                    ),
                    kill_when(DISTILL, &args(&out), fire),
                )
            }
            _ => {
                // Mid-step: right after a log line was appended.
                let n = 1 + rng.below(steps - 1);
                (
                    format!("once the log has {n} lines (or {} ms)", bound.as_millis()),
                    kill_when(DISTILL, &args(&out), |t| {
                        log_lines(&work) >= n || t >= bound
                    }),
                )
            }
        };
        if landed && out.exists() {
            // Killed after the student was moved into place, while the work dir was removed:
            // the output is complete, and a rerun says the work dir is a leftover.
            assert_eq!(
                student_files(&out),
                reference,
                "a resumed run finished with other results"
            );
            assert_error(
                &qat_distill(&strs(&args(&out))),
                "qat-distill",
                "its .work directory is left over from a run stopped after it had finished",
            );
            std::fs::remove_dir_all(&out).unwrap();
            let _ = std::fs::remove_dir_all(&work);
            kills.push(format!("{label}, during the final clean-up"));
        } else if landed {
            check_killed_distill_state(&out);
            kills.push(label);
        } else {
            assert_eq!(
                student_files(&out),
                reference,
                "a resumed run finished with other results"
            );
            assert!(!work.exists(), "work dir left after a finished run");
            std::fs::remove_dir_all(&out).unwrap();
            restarts += 1;
        }
    }
    eprintln!("qat-distill kill points ({restarts} fresh restarts): {kills:#?}");
    let r = ok_json(&qat_distill(&strs(&args(&out))));
    assert_eq!(r["steps"], steps);
    assert_eq!(
        student_files(&out),
        reference,
        "loss curve, weights or provenance differ from an uninterrupted run"
    );
    assert!(!work.exists(), "work dir left after a finished run");
}

/// A kill between the two renames that swap a new checkpoint in leaves only `checkpoint.old`;
/// `--resume` must continue from it, not silently start again from step 0.
#[test]
fn resume_recovers_a_checkpoint_swap_interrupted_between_its_renames() {
    let tmp = fast_tempdir();
    let shards = tmp.path().join("shards");
    small_shards(&shards);
    let model = stories_dir();
    let out = tmp.path().join("s");
    let work = work_dir(&out);
    let args = |extra: &[&str]| {
        let mut e = vec!["--steps", "12", "--checkpoint-every", "3"];
        e.extend_from_slice(extra);
        distill_args(&model, &shards, &out, &e)
    };
    // Stop at step 7 (checkpoint at 6), then recreate what a kill inside the next swap leaves.
    assert_error(
        &qat_distill(&strs(&args(&["--inject-nan-at", "7"]))),
        "qat-distill",
        "last good checkpoint: step 6",
    );
    std::fs::rename(work.join("checkpoint"), work.join("checkpoint.old")).unwrap();
    copy_dir(&work.join("checkpoint.old"), &work.join("checkpoint.tmp"));
    let r = ok_json(&qat_distill(&strs(&args(&["--resume"]))));
    assert_eq!(r["resumed_from_step"], 6, "{r}");
    let whole = tmp.path().join("whole");
    ok_json(&qat_distill(&strs(&distill_args(
        &model,
        &shards,
        &whole,
        &["--steps", "12", "--checkpoint-every", "3"],
    ))));
    assert_eq!(student_files(&out), student_files(&whole));
    // Killed after the student was moved into place, before its work dir was removed.
    std::fs::create_dir_all(work.join("checkpoint")).unwrap();
    assert_error(&qat_distill(&strs(&args(&["--resume"]))), "qat-distill", "output already exists (remove it to train again); its .work directory is left over from a run stopped after it had finished, and can be removed");
}

/// Regression: with `--data-parallel` left to auto, `--resume` read the checkpoint's part count
/// before restoring an interrupted swap's `checkpoint.old`, so on a machine with other cores it
/// chose its own count and refused the checkpoint as "made with other settings".
#[test]
fn resume_with_auto_parts_on_other_cores_recovers_an_interrupted_swap() {
    let tmp = fast_tempdir();
    let shards = tmp.path().join("shards");
    small_shards(&shards);
    let model = stories_dir();
    let run = |out: &Path, threads: &str, extra: &[&str]| {
        let mut e = vec!["--steps", "8", "--checkpoint-every", "3"];
        e.extend_from_slice(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_qat-distill"))
            .args(distill_args(&model, &shards, out, &e))
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap()
    };
    // Auto parts with 3 threads (batch 4): 3 parts; stopped at step 5 (checkpoint at 3).
    let out = tmp.path().join("s");
    assert_error(
        &run(&out, "3", &["--inject-nan-at", "5"]),
        "qat-distill",
        "last good checkpoint: step 3",
    );
    let work = work_dir(&out);
    std::fs::rename(work.join("checkpoint"), work.join("checkpoint.old")).unwrap();
    // Resumed where auto would choose 2 parts: it keeps the checkpoint's 3.
    let r = ok_json(&run(&out, "2", &["--resume"]));
    assert_eq!(r["resumed_from_step"], 3, "{r}");
    let whole = tmp.path().join("whole");
    ok_json(&run(&whole, "3", &[]));
    assert_eq!(student_files(&out), student_files(&whole));
}

/// A training log shorter than its checkpoint says (it cannot happen through a kill any more:
/// the log is cut back atomically) is refused instead of giving a short loss curve.
#[test]
fn resume_refuses_a_log_shorter_than_its_checkpoint() {
    let tmp = fast_tempdir();
    let shards = tmp.path().join("shards");
    small_shards(&shards);
    let model = stories_dir();
    let out = tmp.path().join("s");
    let args = |extra: &[&str]| {
        let mut e = vec!["--steps", "12", "--checkpoint-every", "3"];
        e.extend_from_slice(extra);
        distill_args(&model, &shards, &out, &e)
    };
    assert_error(
        &qat_distill(&strs(&args(&["--inject-nan-at", "5"]))),
        "qat-distill",
        "last good checkpoint: step 3",
    );
    let log = work_dir(&out).join("train_log.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::write(&log, text.lines().next().unwrap().to_string() + "\n").unwrap();
    assert_error(
        &qat_distill(&strs(&args(&["--resume"]))),
        "qat-distill",
        "train_log.jsonl: has 1 lines, fewer than the 3 its checkpoint counts; cannot resume",
    );
    assert!(!out.exists());
}

/// NaN/inf steps never touch the last good checkpoint: its bytes are unchanged after a second
/// NaN in a resumed run, and a resume without the injection matches an uninterrupted run
/// (loss curve and final weights). A NaN before the first checkpoint leaves nothing to resume
/// from; `--resume` then starts over and still matches.
#[test]
fn nan_steps_never_corrupt_the_last_good_checkpoint() {
    let tmp = fast_tempdir();
    let shards = tmp.path().join("shards");
    small_shards(&shards);
    let model = stories_dir();
    let out = tmp.path().join("s");
    let ckpt = work_dir(&out).join("checkpoint");
    let args = |o: &Path, extra: &[&str]| {
        let mut e = vec!["--steps", "12", "--checkpoint-every", "3"];
        e.extend_from_slice(extra);
        distill_args(&model, &shards, o, &e)
    };
    let r = qat_distill(&strs(&args(&out, &["--inject-nan-at", "7"])));
    assert_error(
        &r,
        "qat-distill",
        "non-finite loss NaN at step 7; training stopped. last good checkpoint: step 6",
    );
    let good = tree_files(&ckpt);
    assert_eq!(
        good.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["optimizer.safetensors", "state.json", "weights.safetensors"]
    );
    // A resumed run that hits another NaN before its next checkpoint (step 9) keeps it as is.
    let r = qat_distill(&strs(&args(&out, &["--resume", "--inject-nan-at", "8"])));
    assert_error(
        &r,
        "qat-distill",
        "non-finite loss NaN at step 8; training stopped. last good checkpoint: step 6",
    );
    assert_eq!(
        tree_files(&ckpt),
        good,
        "a NaN step changed the last good checkpoint"
    );
    assert!(!out.exists());
    let names: Vec<String> = names(&work_dir(&out));
    assert_eq!(
        names,
        ["checkpoint", "train_log.jsonl"],
        "leftovers in the work dir"
    );
    ok_json(&qat_distill(&strs(&args(&out, &["--resume"]))));
    let whole = tmp.path().join("whole");
    ok_json(&qat_distill(&strs(&args(&whole, &[]))));
    assert_eq!(
        student_files(&out),
        student_files(&whole),
        "resuming after NaN steps changed the loss curve or the weights"
    );

    let early = tmp.path().join("early");
    assert_error(
        &qat_distill(&strs(&args(&early, &["--inject-nan-at", "1"]))),
        "qat-distill",
        "NaN at step 1; training stopped. no checkpoint was written yet",
    );
    ok_json(&qat_distill(&strs(&args(&early, &["--resume"]))));
    assert_eq!(student_files(&early), student_files(&whole));
}

/// No `*.tmp`, `*.partial` or probe file anywhere under `dir`.
fn assert_no_leftovers(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let left: Vec<String> = tree_files(dir)
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.ends_with(".tmp") || n.contains(".partial") || n.contains("write-test"))
        .collect();
    assert!(
        left.is_empty(),
        "half-written files left in {}: {left:?}",
        dir.display()
    );
    let dirs: Vec<String> = names(dir)
        .into_iter()
        .filter(|n| n.ends_with(".tmp") || n.ends_with(".partial"))
        .collect();
    assert!(
        dirs.is_empty(),
        "half-written directories left in {}: {dirs:?}",
        dir.display()
    );
}

/// A full disk (simulated with RLIMIT_FSIZE: writes past the limit fail with EFBIG) while
/// `qat-sample` writes: exit 2 naming the file, nothing half-written left, the finished files
/// and manifest still valid, and a rerun with space completes to the bytes of a normal run.
#[test]
fn qat_sample_on_a_full_disk_fails_cleanly_and_resumes() {
    let tmp = fast_tempdir();
    let model = stories_dir();
    let m = model.to_str().unwrap();
    // (a) The first shard does not fit: nothing but the empty directory.
    let out = tmp.path().join("a");
    let o = out.to_str().unwrap();
    let r = run_with_file_size_limit(
        SAMPLE,
        &[
            "--model",
            m,
            "--out",
            o,
            "-n",
            "8",
            "--max-len",
            "40",
            "-K",
            "16",
            "--seqs-per-file",
            "8",
            "-q",
        ],
        4096,
    );
    assert_error(
        &r,
        "qat-sample",
        &format!("{o}/shard-00000.parquet.tmp: flush: File too large (os error 27)"),
    );
    assert!(names(&out).is_empty(), "files left: {:?}", names(&out));

    // (b) Tiny shards (about 3.3 kB each) fit, but the manifest outgrows the limit part way.
    let tiny = [
        "-n",
        "24",
        "--max-len",
        "4",
        "-K",
        "1",
        "--batch-size",
        "8",
        "--seqs-per-file",
        "1",
        "-q",
    ];
    let whole = tmp.path().join("whole");
    let mut a = vec!["--model", m, "--out", whole.to_str().unwrap()];
    a.extend_from_slice(&tiny);
    ok_json(&qat_sample(&a));
    let reference = dir_files(&whole);
    let biggest_shard = reference
        .iter()
        .filter(|(n, _)| n.ends_with(".parquet"))
        .map(|(_, b)| b.len())
        .max()
        .unwrap() as u64;
    let manifest = std::fs::metadata(whole.join("manifest.json"))
        .unwrap()
        .len();
    assert!(
        biggest_shard + 1000 < manifest,
        "shards {biggest_shard} bytes, manifest {manifest}"
    );
    let out = tmp.path().join("b");
    let o = out.to_str().unwrap();
    let mut a = vec!["--model", m, "--out", o];
    a.extend_from_slice(&tiny);
    let r = run_with_file_size_limit(SAMPLE, &a, (biggest_shard + manifest) / 2);
    assert_error(
        &r,
        "qat-sample",
        &format!("{o}/manifest.json.tmp: write: File too large (os error 27)"),
    );
    assert_no_leftovers(&out);
    let m0 = Manifest::load(&out.join("manifest.json")).unwrap();
    assert!(
        !m0.complete && !m0.files.is_empty() && m0.files.len() < 24,
        "{} files listed",
        m0.files.len()
    );
    check_killed_sample_state(&out, &reference);
    ok_json(&qat_sample(&a));
    assert_eq!(
        dir_files(&out),
        reference,
        "the run resumed after a full disk differs from a normal run"
    );
}

/// A full disk while `qat-distill` writes its first checkpoint: exit 2 naming the file, no
/// output, no partial checkpoint; `--resume` with space gives the normal result.
#[test]
fn qat_distill_on_a_full_disk_fails_cleanly_and_resumes() {
    let tmp = fast_tempdir();
    let shards = tmp.path().join("shards");
    small_shards(&shards);
    let model = stories_dir();
    let out = tmp.path().join("s");
    let args = distill_args(
        &model,
        &shards,
        &out,
        &["--steps", "6", "--checkpoint-every", "3"],
    );
    // The f32 weights of stories260K take about 1 MB.
    let r = run_with_file_size_limit(DISTILL, &strs(&args), 256 * 1024);
    assert_error(
        &r,
        "qat-distill",
        &format!(
            "{}/checkpoint.tmp/weights.safetensors.tmp: cannot write:",
            work_dir(&out).display()
        ),
    );
    assert!(stderr(&r).contains("File too large"), "{}", stderr(&r));
    assert!(!out.exists());
    assert_no_leftovers(&work_dir(&out));
    assert_eq!(names(&work_dir(&out)), ["train_log.jsonl"]);
    let mut resume = args.clone();
    resume.push("--resume".into());
    ok_json(&qat_distill(&strs(&resume)));
    let whole = tmp.path().join("whole");
    ok_json(&qat_distill(&strs(&distill_args(
        &model,
        &shards,
        &whole,
        &["--steps", "6", "--checkpoint-every", "3"],
    ))));
    assert_eq!(student_files(&out), student_files(&whole));
}

/// A full disk while `qat-pack` writes the packed file: exit 2 naming it, and neither the
/// output nor its `.partial` directory left behind.
#[test]
fn qat_pack_on_a_full_disk_fails_cleanly() {
    let tmp = fast_tempdir();
    let student = tmp.path().join("student");
    copy_dir(&stories_dir(), &student);
    std::fs::write(
        student.join("quant_scheme.json"),
        r#"{"format_version": 1, "weight": {"bits": 4, "format": {"kind": "sym_per_channel"}}}"#,
    )
    .unwrap();
    let out = tmp.path().join("packed");
    let r = run_with_file_size_limit(
        PACK,
        &[
            "--model",
            student.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        100 * 1024,
    );
    assert_error(
        &r,
        "qat-pack",
        &format!(
            "{}.partial/model.packed.safetensors: write: File too large (os error 27)",
            out.display()
        ),
    );
    assert!(
        !out.exists() && !tmp.path().join("packed.partial").exists(),
        "{:?}",
        names(tmp.path())
    );
    ok_json(
        &std::process::Command::new(PACK)
            .args([
                "--model",
                student.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
            .output()
            .unwrap(),
    );
}

/// A run killed right after its writability probe left `.qat-sample-write-test.<pid>` in the
/// output directory; the next run removes it, so a resumed set has no stray files.
#[test]
fn a_stale_write_probe_is_removed() {
    let tmp = fast_tempdir();
    let out = tmp.path().join("s");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join(".qat-sample-write-test.12345"), b"").unwrap();
    let model = stories_dir();
    ok_json(&qat_sample(&[
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "-n",
        "2",
        "--max-len",
        "8",
        "-K",
        "4",
        "-q",
    ]));
    assert_eq!(names(&out), ["manifest.json", "shard-00000.parquet"]);
}
