//! Opening shard sets: merging partitions and every way a directory can be wrong.

mod common;

use std::path::Path;

use common::*;
use qat_shards::{
    verify_entry, LogprobDtype, Manifest, Partition, SequenceRecord, ShardError, ShardFileReader,
    ShardSet, ShardSetHeader,
};

fn three_partitions(dir: &Path) -> (ShardSetHeader, Vec<SequenceRecord>) {
    let h = header(200, 4, LogprobDtype::F16, 14, 2); // 7 files
    let recs = records(&h, 6);
    for i in 0..3 {
        write_partition(dir, &h, Partition::new(i, 3).unwrap(), &recs);
    }
    (h, recs)
}

fn copy_dir(from: &Path, to: &Path) {
    for ent in std::fs::read_dir(from).unwrap() {
        let ent = ent.unwrap();
        std::fs::copy(ent.path(), to.join(ent.file_name())).unwrap();
    }
}

#[test]
fn partitions_from_separate_machines_merge_by_copying() {
    let h = header(200, 4, LogprobDtype::F32, 14, 2);
    let recs = records(&h, 6);
    let machines: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    for (i, m) in machines.iter().enumerate() {
        let mut hi = h.clone();
        hi.tool = format!("qat-sample 0.1.{i}"); // tool and source are not compared
        hi.teacher.source = format!("/machine{i}/teacher");
        write_partition(m.path(), &hi, Partition::new(i as u32, 3).unwrap(), &recs);
        // A lone partition is not a set.
        let msg = err_text(ShardSet::open(m.path()));
        assert!(
            msg.contains("partition") && msg.contains("is missing"),
            "{msg}"
        );
    }
    let merged = tempfile::tempdir().unwrap();
    for m in &machines {
        copy_dir(m.path(), merged.path());
    }
    let set = ShardSet::open(merged.path()).unwrap();
    set.verify().unwrap();
    assert_eq!(set.files().len(), 7);
    let got: Vec<SequenceRecord> = set.records().collect::<Result<_, _>>().unwrap();
    assert_eq!(got, recs);
}

#[test]
fn incomplete_partition_is_reported_with_resume_hint() {
    let dir = tempfile::tempdir().unwrap();
    let (h, recs) = three_partitions(dir.path());
    let p = Partition::new(1, 3).unwrap();
    let mut m = Manifest::new(h.clone(), p);
    m.upsert_file(write_file(dir.path(), &h, 1, &recs));
    m.write(dir.path()).unwrap();
    let msg = err_text(ShardSet::open(dir.path()));
    assert!(
        msg.contains(
            "partition 1/3 is incomplete (1 of 2 files): rerun qat-sample --shard 1/3 to resume"
        ),
        "{msg}"
    );
    // mark_complete refuses while files are missing.
    let msg = err_text(m.mark_complete());
    assert!(
        msg.contains("1/3") && msg.contains("shard-00004.parquet"),
        "{msg}"
    );
    // Resume: the writer side finds the manifest and what is left to do.
    let existing = Manifest::load_existing_partition(dir.path(), &p)
        .unwrap()
        .unwrap();
    assert_eq!(existing.missing_file_indices(), vec![4]);
    existing.check_header(dir.path(), &h).unwrap();
    let mut other = h.clone();
    other.top_k = 3;
    let msg = err_text(existing.check_header(dir.path(), &other));
    assert!(
        msg.contains("manifest.1-of-3.json") && msg.contains("top_k: 4 vs 3"),
        "{msg}"
    );
}

#[test]
fn missing_partition_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    three_partitions(dir.path());
    std::fs::remove_file(dir.path().join("manifest.2-of-3.json")).unwrap();
    let msg = err_text(ShardSet::open(dir.path()));
    assert!(
        msg.contains("partition 2/3 is missing (manifest.2-of-3.json not found)"),
        "{msg}"
    );
}

#[test]
fn mixed_single_and_partial_manifests_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (h, recs) = three_partitions(dir.path());
    write_partition(dir.path(), &h, Partition::single(), &recs);
    let msg = err_text(ShardSet::open(dir.path()));
    assert!(
        msg.contains("cannot be mixed")
            && msg.contains("manifest.json")
            && msg.contains("manifest.0-of-3.json"),
        "{msg}"
    );
    // The writer side refuses to start a partition of another count in that directory.
    let other = tempfile::tempdir().unwrap();
    three_partitions(other.path());
    let msg = err_text(Manifest::load_existing_partition(
        other.path(),
        &Partition::new(0, 2).unwrap(),
    ));
    assert!(
        msg.contains("manifest.0-of-3.json") && msg.contains("cannot be mixed with partition 0/2"),
        "{msg}"
    );
    assert!(
        Manifest::load_existing_partition(other.path(), &Partition::new(0, 3).unwrap())
            .unwrap()
            .is_some()
    );
    let empty = tempfile::tempdir().unwrap();
    assert!(
        Manifest::load_existing_partition(empty.path(), &Partition::single())
            .unwrap()
            .is_none()
    );
}

#[test]
fn missing_listed_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    three_partitions(dir.path());
    std::fs::remove_file(dir.path().join("shard-00003.parquet")).unwrap();
    let msg = err_text(ShardSet::open(dir.path()));
    assert!(
        msg.contains("shard-00003.parquet: listed in manifest.0-of-3.json but does not exist"),
        "{msg}"
    );
}

#[test]
fn flipped_byte_is_caught_by_verify() {
    let dir = tempfile::tempdir().unwrap();
    let h = header(200, 4, LogprobDtype::F16, 8, 4);
    write_set(dir.path(), &h, 6);
    let path = dir.path().join("shard-00001.parquet");
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let set = ShardSet::open(dir.path()).unwrap(); // same size: only hashing notices
    let e = set.verify().unwrap_err();
    assert!(matches!(e, ShardError::HashMismatch { .. }));
    let msg = e.to_string();
    let entry = &set.files()[1];
    assert!(
        msg.contains("shard-00001.parquet") && msg.contains(&entry.sha256),
        "{msg}"
    );
    assert!(!verify_entry(dir.path(), entry).unwrap());
    assert!(verify_entry(dir.path(), &set.files()[0]).unwrap());
    // Reading the corrupted file is an error too: a flipped byte inside a compressed page can
    // decode without any Parquet error (issue 5), so the reader checks the hash first.
    let e = set.read_file(entry).unwrap_err();
    assert!(matches!(e, ShardError::HashMismatch { .. }), "{e}");
    let errs: Vec<_> = set.records().filter_map(|r| r.err()).collect();
    assert!(
        matches!(errs.as_slice(), [ShardError::HashMismatch { .. }]),
        "{errs:?}"
    );
}

#[test]
fn a_file_rewritten_after_its_first_read_is_hashed_again() {
    // The first read hashes a file and remembers it; a clone shares that memory. Writing the
    // file in place afterwards (same size, one byte flipped) changes its modification time, so
    // the next read hashes it again and notices.
    let dir = tempfile::tempdir().unwrap();
    let h = header(200, 4, LogprobDtype::F16, 8, 4);
    write_set(dir.path(), &h, 6);
    let set = ShardSet::open(dir.path()).unwrap();
    let entry = set.files()[1].clone();
    let first = set.read_file(&entry).unwrap();
    let clone = set.clone();
    assert_eq!(
        clone.read_file(&entry).unwrap(),
        first,
        "an unchanged file reads the same"
    );
    let path = dir.path().join(&entry.name);
    let before = std::fs::metadata(&path).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    // File systems with coarse timestamps could keep the old time for a write within the
    // same tick; wait until the write is certain to change it.
    while std::time::SystemTime::now() <= before + std::time::Duration::from_millis(20) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::fs::write(&path, &bytes).unwrap();
    let e = clone.read_file(&entry).unwrap_err();
    assert!(matches!(e, ShardError::HashMismatch { .. }), "{e}");
    let e = set.read_file(&entry).unwrap_err();
    assert!(matches!(e, ShardError::HashMismatch { .. }), "{e}");
}

#[test]
fn truncated_file_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let h = header(200, 4, LogprobDtype::F16, 8, 8);
    write_set(dir.path(), &h, 6);
    let path = dir.path().join("shard-00000.parquet");
    let bytes = std::fs::read(&path).unwrap();
    for cut in [0, 3, 7, bytes.len() / 2, bytes.len() - 9, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let msg = err_text(ShardFileReader::open(&path));
        assert!(msg.contains("shard-00000.parquet"), "cut {cut}: {msg}");
        let msg = err_text(ShardSet::open(dir.path()));
        assert!(
            msg.contains(&format!("has {cut} bytes")) && msg.contains("truncated"),
            "cut {cut}: {msg}"
        );
    }
}

#[test]
fn header_mismatch_between_partitions_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let (h, recs) = three_partitions(dir.path());
    let mut h2 = h.clone();
    h2.seed = 8;
    h2.teacher.weights_sha256 = "ef".repeat(32);
    std::fs::remove_file(dir.path().join("manifest.2-of-3.json")).unwrap();
    write_partition(dir.path(), &h2, Partition::new(2, 3).unwrap(), &recs);
    let msg = err_text(ShardSet::open(dir.path()));
    assert!(
        msg.contains("manifest.2-of-3.json") && msg.contains("seed: 7 vs 8"),
        "{msg}"
    );
    assert!(msg.contains("teacher.weights_sha256"), "{msg}");
}

#[test]
fn empty_or_missing_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let msg = err_text(ShardSet::open(dir.path()));
    assert!(msg.contains("no manifest found"), "{msg}");
    let msg = err_text(ShardSet::open(&dir.path().join("nope")));
    assert!(
        msg.contains("nope") && msg.contains("not a directory"),
        "{msg}"
    );
}

fn edit_manifest(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

#[test]
fn unsupported_version_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write_set(dir.path(), &header(200, 4, LogprobDtype::F16, 4, 4), 4);
    let path = dir.path().join("manifest.json");
    edit_manifest(&path, |v| v["header"]["format_version"] = 2.into());
    let e = ShardSet::open(dir.path()).unwrap_err();
    assert!(matches!(e, ShardError::UnsupportedVersion { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("manifest.json")
            && msg.contains("format_version 2")
            && msg.contains("version 1"),
        "{msg}"
    );
}

#[test]
fn inconsistent_manifest_entries_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    three_partitions(dir.path());
    let path = dir.path().join("manifest.1-of-3.json");
    let orig = std::fs::read(&path).unwrap();
    // A file that belongs to another partition.
    edit_manifest(&path, |v| v["files"][0]["file_index"] = 2.into());
    let msg = err_text(ShardSet::open(dir.path()));
    assert!(
        msg.contains("manifest.1-of-3.json") && msg.contains("does not belong to partition 1/3"),
        "{msg}"
    );
    // Wrong row count.
    std::fs::write(&path, &orig).unwrap();
    edit_manifest(&path, |v| v["files"][0]["rows"] = 3.into());
    let msg = err_text(ShardSet::open(dir.path()));
    assert!(
        msg.contains("rows 3, expected first_seq_id 2 rows 2"),
        "{msg}"
    );
    // Partition in the JSON disagrees with the file name.
    std::fs::write(&path, &orig).unwrap();
    edit_manifest(&path, |v| v["partition"]["index"] = 2.into());
    let msg = err_text(ShardSet::open(dir.path()));
    assert!(msg.contains("manifest.1-of-3.json"), "{msg}");
}

#[test]
fn file_from_another_set_is_rejected_on_read() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let h = header(200, 4, LogprobDtype::F16, 8, 4);
    write_set(a.path(), &h, 6);
    let mut h2 = h.clone();
    h2.seed = 99;
    write_set(b.path(), &h2, 6);
    // Swap in b's file and patch a's manifest so size and hash match: only the embedded header differs.
    std::fs::copy(
        b.path().join("shard-00001.parquet"),
        a.path().join("shard-00001.parquet"),
    )
    .unwrap();
    let sb = ShardSet::open(b.path()).unwrap();
    let eb = sb.files()[1].clone();
    edit_manifest(&a.path().join("manifest.json"), |v| {
        v["files"][1]["bytes"] = eb.bytes.into();
        v["files"][1]["sha256"] = eb.sha256.clone().into();
    });
    let sa = ShardSet::open(a.path()).unwrap();
    sa.verify().unwrap();
    let msg = err_text(sa.read_file(&sa.files()[1]));
    assert!(
        msg.contains("shard-00001.parquet") && msg.contains("seed: 99 vs 7"),
        "{msg}"
    );
    let errs: Vec<_> = sa.records().filter_map(|r| r.err()).collect();
    assert_eq!(errs.len(), 1, "streaming stops after the first error");
}

#[test]
fn non_shard_parquet_is_rejected() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.parquet");
    let schema = Arc::new(arrow_schema::Schema::new(vec![arrow_schema::Field::new(
        "a",
        arrow_schema::DataType::Int32,
        false,
    )]));
    let batch = arrow_array::RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(arrow_array::Int32Array::from(vec![1, 2]))],
    )
    .unwrap();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), schema, None)
            .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let msg = err_text(ShardFileReader::open(&path));
    assert!(
        msg.contains("x.parquet") && msg.contains("qat.format_version"),
        "{msg}"
    );
}
