//! The Make pipelines' caching: a stage is redone when its inputs' bytes change, not when their
//! dates do (a data directory copied or mounted anew must keep the cached teacher shards).

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
