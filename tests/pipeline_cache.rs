//! The Make pipelines: caching (a stage is redone when its inputs' bytes change, not when their
//! dates do: a data directory copied or mounted anew must keep the cached teacher shards), and
//! the names of the bit curriculum's stages, report row and baseline, and the clipping rule each
//! pipeline's students start from.

use std::path::Path;
use std::process::Command;

/// Runs `make -f pipelines/llm-qat.mk shards` with a stand-in `qat-sample` that counts its runs.
fn make_shards(out: &Path, model: &Path, bin: &Path) {
    let status = Command::new("make")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["-s", "-f", "pipelines/llm-qat.mk", "shards"])
        .arg(format!("OUT={}", out.display()))
        .arg(format!("MODEL={}", model.display()))
        .arg(format!("BIN={}", bin.display()))
        .status()
        .expect("make runs");
    assert!(status.success());
}

fn runs(counter: &Path) -> usize {
    std::fs::read_to_string(counter).map_or(0, |s| s.lines().count())
}

#[test]
fn shards_are_resampled_when_the_teacher_bytes_change_not_its_dates() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, bin, out) = (
        tmp.path().join("teacher"),
        tmp.path().join("bin"),
        tmp.path().join("out"),
    );
    std::fs::create_dir_all(&model).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    for f in ["model.safetensors", "config.json", "tokenizer.json"] {
        std::fs::write(model.join(f), format!("{f} v1")).unwrap();
    }
    let counter = tmp.path().join("sample-runs");
    let fake = bin.join("qat-sample");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho run >> '{}'\necho '{{}}'\n",
            counter.display()
        ),
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    make_shards(&out, &model, &bin);
    assert_eq!(runs(&counter), 1);
    make_shards(&out, &model, &bin);
    assert_eq!(runs(&counter), 1, "rerun with nothing changed");
    // Same bytes, newer dates (a fresh copy of the data directory): still cached.
    for f in ["model.safetensors", "config.json", "tokenizer.json"] {
        let ok = Command::new("touch")
            .args(["-d", "2099-01-01"])
            .arg(model.join(f))
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
    make_shards(&out, &model, &bin);
    assert_eq!(
        runs(&counter),
        1,
        "re-dated teacher files must not invalidate the shards"
    );
    // Different bytes: sampled again.
    std::fs::write(model.join("model.safetensors"), "model.safetensors v2").unwrap();
    make_shards(&out, &model, &bin);
    assert_eq!(runs(&counter), 2, "changed teacher weights must resample");
}

/// The commands `make -n -f pipelines/llm-qat.mk curriculum ARGS` would run (nothing is run).
fn curriculum_plan(out: &Path, args: &[&str]) -> String {
    plan("pipelines/llm-qat.mk", "curriculum", out, args)
}

/// The commands `make -n -f MAKEFILE GOAL ARGS` would run, with `BIN=bin` (nothing is run).
fn plan(makefile: &str, goal: &str, out: &Path, args: &[&str]) -> String {
    let output = Command::new("make")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["-n", "-f", makefile, goal, "BIN=bin"])
        .arg(format!("OUT={}", out.display()))
        .args(args)
        .output()
        .expect("make runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Joined continuation lines, single spaces: one command per line.
    let text = String::from_utf8(output.stdout)
        .unwrap()
        .replace("\\\n", " ");
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn a_curriculum_names_its_stages_row_and_baseline_after_its_stages_and_tag() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().display().to_string();
    let recipe = "stories260K-n4096-len256-k512-s0-e1-lr2e-4-bal64-clipqk";
    let plan = curriculum_plan(
        tmp.path(),
        &[
            "CURRICULUM=W4A8KV6H:1:5e-4 W4A8KV4H:2:2e-4",
            "CURRICULUM_TAG=kvh",
        ],
    );
    let stages = format!("{out}/students/{recipe}-kvh");
    for want in [
        format!("--model {out}/students/{recipe}/W4A8KV8 --shards"),
        format!("--out {stages}/1-W4A8KV6H --scheme W4A8KV6H --epochs 1 --lr 5e-4"),
        format!("--model {stages}/1-W4A8KV6H --shards"),
        format!("--out {stages}/2-W4A8KV4H --scheme W4A8KV4H --epochs 2 --lr 2e-4"),
        format!("bin/qat-eval --model {stages}/2-W4A8KV4H"),
        format!(
            "--checkpoint {out}/eval/stories260K/rtn-W4A8KV4H.json.ckpt \
             --scheme W4A8KV4H > {out}/eval/stories260K/rtn-W4A8KV4H.json.tmp"
        ),
        format!(
            "--curriculum W4A8KV4H {out}/eval/stories260K/rtn-W4A8KV4H.json \
             {out}/eval/stories260K/qat-{recipe}-kvh.json"
        ),
        format!("> {out}/report-{recipe}-kvh.md.tmp"),
    ] {
        assert!(plan.contains(&want), "missing {want:?} in:\n{plan}");
    }
    // The default chain keeps its names: W4A8KV4, kvcurriculum.
    let plan = curriculum_plan(tmp.path(), &[]);
    for want in [
        format!("--out {out}/students/{recipe}-kvcurriculum/4-W4A8KV4 --scheme W4A8KV4 --epochs 2"),
        format!("--curriculum W4A8KV4 {out}/eval/stories260K/rtn-W4A8KV4.json"),
        format!("--curriculum-from W4A8KV8 > {out}/report-{recipe}-kvcurriculum.md.tmp"),
    ] {
        assert!(plan.contains(&want), "missing {want:?} in:\n{plan}");
    }
    // Its stages start from a rebalanced W4A8KV8 student and do not rebalance again.
    let stage1 = "--scheme W4A8KV6 --epochs 1 --lr 5e-4 -b 16 --seed 0 --resume >";
    assert!(plan.contains(stage1), "missing {stage1:?} in:\n{plan}");
}

/// `CURRICULUM_FROM=teacher` starts the chain from the teacher, and only its first stage gets
/// the recipe's DISTILL_FLAGS (the K/V rebalancing a W4A8KV8 start already had).
#[test]
fn a_curriculum_from_the_teacher_rebalances_in_its_first_stage_only() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().display().to_string();
    let recipe = "stories260K-n4096-len256-k512-s0-e1-lr2e-4-bal64-clipqk";
    let teacher = "../shared/data/models/stories260K";
    let plan = curriculum_plan(
        tmp.path(),
        &[
            "CURRICULUM=KV6H:1:5e-4 KV4H:2:5e-4",
            "CURRICULUM_FROM=teacher",
            "CURRICULUM_TAG=kvonly-h",
            "QAT_DATA=../shared/data",
        ],
    );
    let stages = format!("{out}/students/{recipe}-kvonly-h");
    for want in [
        format!(
            "bin/qat-distill --model {teacher} --shards {out}/shards/stories260K-n4096-len256-k512-s0 \
             --out {stages}/1-KV6H --scheme KV6H --epochs 1 --lr 5e-4 -b 16 --seed 0 --resume --balance-kv 64 >"
        ),
        format!(
            "bin/qat-distill --model {stages}/1-KV6H --shards {out}/shards/stories260K-n4096-len256-k512-s0 \
             --out {stages}/2-KV4H --scheme KV4H --epochs 2 --lr 5e-4 -b 16 --seed 0 --resume >"
        ),
        format!("--curriculum KV4H {out}/eval/stories260K/rtn-KV4H.json"),
        "--curriculum-from teacher >".to_string(),
    ] {
        assert!(plan.contains(&want), "missing {want:?} in:\n{plan}");
    }
    assert!(!plan.contains("/W4A8KV8"), "{plan}");
}

/// Both pipelines initialize students through shards.mk's qat-clip rules: LLM-QAT's from
/// `<scheme>-qk` (q and k clipped too), BitDistiller's from `<scheme>` (q and k left as they are).
#[test]
fn llm_qat_clips_q_and_k_and_bitdistiller_does_not_through_the_shared_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().display().to_string();
    let clips = |plan: &str| -> Vec<String> {
        plan.split(" bin/")
            .filter(|c| c.starts_with("qat-clip "))
            .map(str::to_string)
            .collect()
    };
    let llm = plan(
        "pipelines/llm-qat.mk",
        "clipped",
        tmp.path(),
        &["STUDENTS=W4 W4A8KV4"],
    );
    let clipped = format!("{out}/clipped/stories260K-n4096-len256-k512-s0");
    assert_eq!(clips(&llm).len(), 2, "{llm}");
    for s in ["W4", "W4A8KV4"] {
        let want = format!("--scheme {s} --include-qk --out {clipped}/{s}-qk -q");
        assert!(llm.contains(&want), "missing {want:?} in:\n{llm}");
    }
    let bd = plan(
        "pipelines/bitdistiller.mk",
        "clipped",
        tmp.path(),
        &["STUDENTS=W3G32"],
    );
    let clipped = format!("{out}/clipped/stories260K-n4096-len256-k64-s0");
    let c = clips(&bd);
    assert_eq!(c.len(), 1, "{bd}");
    assert!(!c[0].contains("--include-qk"), "{bd}");
    let want = format!("--out {clipped}/W3G32 -q > {clipped}/W3G32.clip.json");
    assert!(bd.contains(&want), "missing {want:?} in:\n{bd}");
    // DEVICE_FLAGS reach qat-clip like every other tool.
    let gpu = plan(
        "pipelines/bitdistiller.mk",
        "clipped",
        tmp.path(),
        &["STUDENTS=W3G32", "DEVICE_FLAGS=--device cuda"],
    );
    let want = format!("--out {clipped}/W3G32 -q --device cuda > {clipped}/W3G32.clip.json");
    assert!(gpu.contains(&want), "missing {want:?} in:\n{gpu}");
}

/// `gguf` exports only the weight-only students (activation or KV quantization is not llama.cpp's)
/// and scores each file in llama.cpp on the ids qat-eval scores.
#[test]
fn gguf_exports_the_weight_only_students_and_scores_qat_evals_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().display().to_string();
    let p = plan(
        "pipelines/llm-qat.mk",
        "gguf",
        tmp.path(),
        &["STUDENTS=W4 W4A8KV8 W8 W4A8KV4"],
    );
    let recipe = "stories260K-n4096-len256-k512-s0-e1-lr2e-4-bal64-clipqk";
    let packs: Vec<&str> = p
        .split(" bin/")
        .filter(|c| c.starts_with("qat-pack "))
        .collect();
    assert_eq!(packs.len(), 2, "{p}");
    for s in ["W4", "W8"] {
        let want = format!(
            "qat-pack --format gguf --gguf-float f32 -m {out}/students/{recipe}/{s} -o {out}/gguf/{recipe}/{s}.gguf"
        );
        assert!(p.contains(&want), "missing {want:?} in:\n{p}");
        let want = format!("tests/foreign/llama_cpp_nll.py {out}/gguf/{recipe}/{s}.gguf");
        assert!(p.contains(&want), "missing {want:?} in:\n{p}");
    }
    assert!(
        !p.contains("W4A8KV8.gguf") && !p.contains("W4A8KV4.gguf"),
        "{p}"
    );
    let ids = format!("--ids-out {out}/eval/stories260K/ids.json");
    assert!(p.contains(&ids), "missing {ids:?} in:\n{p}");
    assert!(
        p.contains(&format!(
            "--ids {out}/eval/stories260K/ids.json --score-ids"
        )),
        "{p}"
    );
    // GGUF_FLOAT=f16: the same students, in files and results of their own.
    let p = plan(
        "pipelines/llm-qat.mk",
        "gguf",
        tmp.path(),
        &["STUDENTS=W4", "GGUF_FLOAT=f16"],
    );
    let gguf = format!("{out}/gguf/{recipe}-f16/W4.gguf");
    let want =
        format!("qat-pack --format gguf --gguf-float f16 -m {out}/students/{recipe}/W4 -o {gguf}");
    assert!(p.contains(&want), "missing {want:?} in:\n{p}");
    let want = format!("llama_cpp_nll.py {gguf} ");
    assert!(p.contains(&want), "missing {want:?} in:\n{p}");
    let want = format!("> {out}/eval/stories260K/llama-cpp-{recipe}-f16-W4.json.tmp");
    assert!(p.contains(&want), "missing {want:?} in:\n{p}");
}
