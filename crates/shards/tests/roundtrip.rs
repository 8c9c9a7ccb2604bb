//! Write/read round trips: exact f32, bounded f16 rounding, K = vocab, u32 ids, lone files.

mod common;

use common::*;
use qat_shards::{
    sha256_file, tail_mass, verify_entry, LogprobDtype, Partition, SequenceRecord, ShardFileReader,
    ShardFileWriter, ShardSet,
};

#[test]
fn f32_roundtrip_is_exact_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let h = header(300, 8, LogprobDtype::F32, 23, 5); // 5 files, last one holds 3
    let recs = write_set(dir.path(), &h, 12);
    let set = ShardSet::open(dir.path()).unwrap();
    assert_eq!(set.header(), &h);
    assert_eq!(set.partition_count(), 1);
    let idx: Vec<u32> = set.files().iter().map(|e| e.file_index).collect();
    assert_eq!(idx, vec![0, 1, 2, 3, 4]);
    assert_eq!(set.files()[4].rows, 3);
    assert_eq!(set.files()[4].first_seq_id, 20);
    set.verify().unwrap();
    let all: Vec<SequenceRecord> = set.records().collect::<Result<_, _>>().unwrap();
    assert_eq!(all, recs);
    let f2 = set.read_file(&set.files()[2]).unwrap();
    assert_eq!(f2, recs[10..15].to_vec());
    let tokens: u64 = recs.iter().map(|r| r.tokens.len() as u64).sum();
    assert_eq!(set.total_tokens(), tokens);
    for e in set.files() {
        assert!(verify_entry(dir.path(), e).unwrap());
        assert_eq!(sha256_file(&set.file_path(e)).unwrap(), e.sha256);
    }
    // No temporaries left behind.
    for ent in std::fs::read_dir(dir.path()).unwrap() {
        let n = ent.unwrap().file_name().into_string().unwrap();
        assert!(!n.ends_with(".tmp"), "left-over temporary {n}");
    }
}

#[test]
fn f16_rounding_within_documented_bound() {
    let dir = tempfile::tempdir().unwrap();
    let h = header(500, 16, LogprobDtype::F16, 12, 12);
    let mut recs = records(&h, 10);
    // Extreme values: below the f16 range (clamped to -65504), subnormal range, tiny positive.
    let r = recs.iter_mut().find(|r| r.tokens.len() >= 2).unwrap();
    r.topk_logprobs[0] = 5e-4;
    r.topk_logprobs[1] = -3e-6;
    r.topk_logprobs[2] = -1e6;
    r.topk_logprobs[3] = -65519.0;
    write_partition(dir.path(), &h, Partition::single(), &recs);
    let got: Vec<SequenceRecord> = ShardSet::open(dir.path())
        .unwrap()
        .records()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(got.len(), recs.len());
    let mut checked = 0usize;
    let mut any_diff = false;
    for (a, b) in recs.iter().zip(&got) {
        assert_eq!(
            (a.seq_id, &a.tokens, a.prompt_len, &a.topk_ids),
            (b.seq_id, &b.tokens, b.prompt_len, &b.topk_ids)
        );
        for (&x, &y) in a.topk_logprobs.iter().zip(&b.topk_logprobs) {
            assert!(y <= 0.0, "stored logprob {y} > 0");
            let x_clamped = x.clamp(-65504.0, 0.0);
            let bound = (x_clamped.abs() * 2f32.powi(-11)).max(2f32.powi(-25));
            assert!(
                (x_clamped - y).abs() <= bound,
                "{x} -> {y}: error above bound {bound}"
            );
            any_diff |= x != y;
            checked += 1;
        }
    }
    assert!(checked > 100 && any_diff, "f16 test must exercise rounding");
    let r = got.iter().find(|r| r.tokens.len() >= 2).unwrap();
    assert_eq!(
        &r.topk_logprobs[..4],
        &[0.0, r.topk_logprobs[1], -65504.0, -65504.0]
    );
    assert!((r.topk_logprobs[1] + 3e-6).abs() <= 2f32.powi(-25));
}

#[test]
fn k_equal_vocab_has_zero_tail() {
    let dir = tempfile::tempdir().unwrap();
    let h = header(40, 40, LogprobDtype::F32, 6, 4);
    let recs = write_set(dir.path(), &h, 6);
    let got: Vec<SequenceRecord> = ShardSet::open(dir.path())
        .unwrap()
        .records()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(got, recs);
    for r in &got {
        for i in 0..r.num_positions() {
            assert!(tail_mass(r.logprobs_at(i, 40)) < 1e-5);
        }
    }
}

#[test]
fn large_vocab_uses_u32_ids() {
    let dir = tempfile::tempdir().unwrap();
    let h = header(70_000, 4, LogprobDtype::F32, 9, 4);
    assert_eq!(h.id_dtype, qat_shards::IdDtype::U32);
    let recs = write_set(dir.path(), &h, 8);
    assert!(recs.iter().flat_map(|r| &r.topk_ids).any(|&id| id > 65535));
    let got: Vec<SequenceRecord> = ShardSet::open(dir.path())
        .unwrap()
        .records()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(got, recs);
}

#[test]
fn lone_file_is_self_describing() {
    let dir = tempfile::tempdir().unwrap();
    let h = header(300, 4, LogprobDtype::F32, 10, 4);
    let recs = write_set(dir.path(), &h, 8);
    let r = ShardFileReader::open(&dir.path().join("shard-00001.parquet")).unwrap();
    assert_eq!(r.file_index(), 1);
    assert_eq!(r.num_rows(), 4);
    let mut expect = h.clone();
    expect.teacher.source = String::new(); // never embedded in files
    assert_eq!(r.header(), &expect);
    assert_eq!(r.read_all().unwrap(), recs[4..8].to_vec());
}

#[test]
fn row_groups_are_bounded_and_streamed() {
    let dir = tempfile::tempdir().unwrap();
    let h = header(100, 2, LogprobDtype::F16, 150, 150);
    let recs = write_set(dir.path(), &h, 4);
    let r = ShardFileReader::open(&dir.path().join("shard-00000.parquet")).unwrap();
    assert_eq!(r.num_row_groups(), 3); // 64 + 64 + 22
    let got: Vec<SequenceRecord> = r.records().unwrap().collect::<Result<_, _>>().unwrap();
    assert_eq!(got.len(), 150);
    assert_eq!(
        got.iter().map(|r| &r.tokens).collect::<Vec<_>>(),
        recs.iter().map(|r| &r.tokens).collect::<Vec<_>>()
    );
}

#[test]
fn output_is_deterministic_and_independent_of_partitioning() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let h = header(300, 8, LogprobDtype::F16, 20, 3);
    let recs = write_set(a.path(), &h, 10);
    // Same data written as 3 partitions, with the teacher at another path on "another machine".
    let mut h2 = h.clone();
    h2.teacher.source = "/elsewhere/teacher".into();
    for i in 0..3 {
        write_partition(b.path(), &h2, Partition::new(i, 3).unwrap(), &recs);
    }
    let (sa, sb) = (
        ShardSet::open(a.path()).unwrap(),
        ShardSet::open(b.path()).unwrap(),
    );
    assert_eq!(
        sa.files(),
        sb.files(),
        "same names, sizes and sha256 regardless of partitioning"
    );
    assert_eq!(sb.partition_count(), 3);
}

#[test]
fn tail_mass_formula() {
    assert_eq!(tail_mass(&[]), 1.0);
    let t = tail_mass(&[0.5f32.ln(), 0.25f32.ln()]);
    assert!((t - 0.25).abs() < 1e-6);
    assert_eq!(tail_mass(&[0.0, -0.1]), 0.0); // sums above 1 clamp to 0
}

#[test]
fn empty_generation_record_roundtrips() {
    // L = 1: no distributions at all, prompt_len must be 1.
    let dir = tempfile::tempdir().unwrap();
    let h = header(50, 3, LogprobDtype::F16, 1, 1);
    let rec = SequenceRecord {
        seq_id: 0,
        tokens: vec![7],
        prompt_len: 1,
        topk_ids: vec![],
        topk_logprobs: vec![],
    };
    let mut w = ShardFileWriter::create(dir.path(), 0, &h).unwrap();
    w.push(&rec).unwrap();
    let e = w.finish().unwrap();
    assert_eq!((e.rows, e.tokens), (1, 1));
    let got = ShardFileReader::open(&dir.path().join(&e.name))
        .unwrap()
        .read_all()
        .unwrap();
    assert_eq!(got, vec![rec]);
}
