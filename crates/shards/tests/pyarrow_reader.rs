//! Cross-implementation test: shards written by this crate are read by `tests/foreign/read_shards.py`
//! (pyarrow only, following `formats/shards.md`), and its summary must match what Rust computes.
//!
//! The interpreter is `$QAT_PYTHON`, default `<workspace>/.venv/bin/python`; if it is missing or
//! lacks pyarrow the test fails and says to run `make test-deps`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use qat_shards::{tail_mass, LogprobDtype, Partition, SequenceRecord, ShardSet, ShardSetHeader};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn python() -> PathBuf {
    let py = std::env::var_os("QAT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv/bin/python"));
    let hint = "run `make test-deps` (creates .venv with pyarrow) or set QAT_PYTHON to an interpreter with pyarrow";
    assert!(
        py.exists(),
        "python interpreter {} does not exist: {hint}",
        py.display()
    );
    let out = Command::new(&py)
        .args(["-c", "import pyarrow; print(pyarrow.__version__)"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}: {hint}", py.display()));
    assert!(
        out.status.success(),
        "{} cannot import pyarrow ({}): {hint}",
        py.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    py
}

/// Run the foreign reader; `Ok(summary)` on success, `Err(stderr)` on a non-zero exit.
fn run_reader(dir: &Path) -> Result<serde_json::Value, String> {
    let script = workspace().join("tests/foreign/read_shards.py");
    let out = Command::new(python())
        .arg(&script)
        .arg(dir)
        .output()
        .expect("run read_shards.py");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(stderr);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("bad JSON {stdout:?}: {e}; stderr: {stderr}")))
}

/// The summary the script must print, computed from records read back by this crate.
fn expected_summary(
    h: &ShardSetHeader,
    recs: &[SequenceRecord],
    partitions: u32,
) -> serde_json::Value {
    let k = h.top_k as usize;
    let (mut tokens, mut positions, mut trained, mut sum_tok, mut sum_ids) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut sum_lp, mut sum_tail, mut sum_r0) = (0f64, 0f64, 0f64);
    for r in recs {
        tokens += r.tokens.len() as u64;
        positions += r.num_positions() as u64;
        trained += r.trained_positions().len() as u64;
        sum_tok += r.tokens.iter().map(|&t| u64::from(t)).sum::<u64>();
        sum_ids += r.topk_ids.iter().map(|&t| u64::from(t)).sum::<u64>();
        sum_lp += r.topk_logprobs.iter().map(|&v| f64::from(v)).sum::<f64>();
        for i in 0..r.num_positions() {
            sum_tail += f64::from(tail_mass(r.logprobs_at(i, k)));
            sum_r0 += f64::from(r.logprobs_at(i, k)[0]);
        }
    }
    serde_json::json!({
        "files": h.num_files, "partitions": partitions, "rows": recs.len(), "tokens": tokens,
        "positions": positions, "trained_positions": trained, "sum_token_ids": sum_tok,
        "sum_topk_ids": sum_ids, "sum_logprobs": sum_lp, "sum_tail_mass": sum_tail,
        "sum_rank0_logprob": sum_r0, "top_k": h.top_k, "num_sequences": h.num_sequences,
        "logprob_dtype": h.logprob_dtype.as_str(), "id_dtype": h.id_dtype.as_str(),
    })
}

fn assert_summaries_match(got: &serde_json::Value, want: &serde_json::Value) {
    let (g, w) = (got.as_object().unwrap(), want.as_object().unwrap());
    assert_eq!(
        g.keys().collect::<Vec<_>>(),
        w.keys().collect::<Vec<_>>(),
        "summary keys"
    );
    for (key, wv) in w {
        let gv = &g[key];
        match (gv.as_f64(), wv.as_f64(), wv.is_f64()) {
            (Some(a), Some(b), true) => {
                // fsum vs sequential f64 sums; tail masses are f32 on the Rust side.
                let tol = if key == "sum_tail_mass" {
                    1e-5 * b.abs().max(1.0)
                } else {
                    1e-9 * b.abs().max(1.0)
                };
                assert!((a - b).abs() <= tol, "{key}: python {a} vs rust {b}");
            }
            _ => assert_eq!(gv, wv, "{key}"),
        }
    }
}

fn check_config(lp: LogprobDtype, partitions: u32) {
    let dir = tempfile::tempdir().unwrap();
    let h = header(250, 6, lp, 17, 4); // 5 files, the last with one row
    let recs = records(&h, 9);
    for i in 0..partitions {
        write_partition(
            dir.path(),
            &h,
            Partition::new(i, partitions).unwrap(),
            &recs,
        );
    }
    let set = ShardSet::open(dir.path()).unwrap();
    let read: Vec<SequenceRecord> = set.records().collect::<Result<_, _>>().unwrap();
    if lp == LogprobDtype::F32 {
        assert_eq!(read, recs);
    }
    let want = expected_summary(&h, &read, partitions);
    let got = run_reader(dir.path()).unwrap_or_else(|e| panic!("read_shards.py failed: {e}"));
    assert_summaries_match(&got, &want);
    assert!(
        want["trained_positions"].as_u64().unwrap() > 0 && want["positions"].as_u64().unwrap() > 30
    );
}

#[test]
fn pyarrow_reads_f16_u16_shards() {
    check_config(LogprobDtype::F16, 1);
}

#[test]
fn pyarrow_reads_f32_u16_shards() {
    check_config(LogprobDtype::F32, 1);
}

#[test]
fn pyarrow_reads_merged_partitions() {
    check_config(LogprobDtype::F16, 3);
}

#[test]
fn pyarrow_reader_rejects_corruption_and_incomplete_sets() {
    let dir = tempfile::tempdir().unwrap();
    let h = header(250, 6, LogprobDtype::F16, 8, 4);
    write_set(dir.path(), &h, 6);
    run_reader(dir.path()).unwrap();
    // Flip one byte: the foreign reader's sha256 check must catch it.
    let path = dir.path().join("shard-00001.parquet");
    let orig = std::fs::read(&path).unwrap();
    let mut bytes = orig.clone();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let err = run_reader(dir.path()).unwrap_err();
    assert!(err.contains("shard-00001.parquet: sha256"), "{err}");
    std::fs::write(&path, &orig).unwrap();
    // An incomplete manifest must be refused.
    let mpath = dir.path().join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    m["complete"] = false.into();
    std::fs::write(&mpath, serde_json::to_vec(&m).unwrap()).unwrap();
    let err = run_reader(dir.path()).unwrap_err();
    assert!(err.contains("incomplete"), "{err}");
}
