//! Concurrency (issue 5): `qat-sample` processes writing different `--shard I/N` partitions into
//! one directory at the same time never clobber each other's files or manifests; the merged set
//! is byte for byte the set of a single process (shard files) and of partitions run one after
//! the other (manifests).

mod common;

use common::*;
use qat_shards::ShardSet;
use std::path::Path;
use std::process::{Command, Stdio};

/// Many small files (2 sequences each), so that the processes' shard renames and manifest
/// rewrites interleave.
const ARGS: &[&str] = &[
    "-n",
    "40",
    "--max-len",
    "24",
    "-K",
    "8",
    "--batch-size",
    "2",
    "--seqs-per-file",
    "2",
    "-q",
];

fn args<'a>(model: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["--model", model, "--out", out];
    a.extend_from_slice(ARGS);
    a.extend_from_slice(extra);
    a
}

/// Runs the `n` partitions of a set as `n` simultaneous processes into `out`.
fn concurrently(model: &str, out: &Path, n: u32) {
    let parts: Vec<String> = (0..n).map(|i| format!("{i}/{n}")).collect();
    let children: Vec<_> = parts
        .iter()
        .map(|p| {
            Command::new(env!("CARGO_BIN_EXE_qat-sample"))
                .args(args(model, out.to_str().unwrap(), &["--shard", p]))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (c, p) in children.into_iter().zip(&parts) {
        let o = c.wait_with_output().unwrap();
        let j = ok_json(&o);
        assert_eq!(j["partition"], p.as_str());
    }
}

fn parquet_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    dir_files(dir)
        .into_iter()
        .filter(|(n, _)| n.ends_with(".parquet"))
        .collect()
}

#[test]
fn concurrent_partitions_in_one_directory_equal_a_single_process_run() {
    let tmp = fast_tempdir();
    let model = stories_dir();
    let m = model.to_str().unwrap();
    let whole = tmp.path().join("whole");
    ok_json(&qat_sample(&args(m, whole.to_str().unwrap(), &[])));
    for n in [2, 3] {
        // The manifests of the partitions run one after the other, for comparison.
        let one_by_one = tmp.path().join(format!("seq{n}"));
        for i in 0..n {
            ok_json(&qat_sample(&args(
                m,
                one_by_one.to_str().unwrap(),
                &["--shard", &format!("{i}/{n}")],
            )));
        }
        let out = tmp.path().join(format!("conc{n}"));
        concurrently(m, &out, n);
        let mut expected: Vec<String> = (0..n)
            .map(|i| format!("manifest.{i}-of-{n}.json"))
            .collect();
        expected.extend((0..20).map(|f| format!("shard-{f:05}.parquet")));
        assert_eq!(
            names(&out),
            expected,
            "{n} processes: missing or extra files"
        );
        assert_eq!(
            parquet_files(&out),
            parquet_files(&whole),
            "{n} processes: shard files differ from a single process"
        );
        assert_eq!(
            dir_files(&out),
            dir_files(&one_by_one),
            "{n} processes: manifests differ from partitions run one by one"
        );
        let set = ShardSet::open(&out).unwrap();
        set.verify().unwrap();
        let whole_set = ShardSet::open(&whole).unwrap();
        let a: Vec<_> = set.records().map(|r| r.unwrap()).collect();
        let b: Vec<_> = whole_set.records().map(|r| r.unwrap()).collect();
        assert_eq!(a, b, "{n} processes: records differ");
    }
}
