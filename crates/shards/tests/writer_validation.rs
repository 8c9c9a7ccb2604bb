//! The writer rejects invalid records and headers and never leaves a partial final file.

mod common;

use common::*;
use qat_shards::{IdDtype, LogprobDtype, SequenceRecord, ShardFileWriter};

type RecordEdit = Box<dyn Fn(&mut SequenceRecord)>;
type HeaderEdit = Box<dyn Fn(&mut qat_shards::ShardSetHeader)>;

fn good(seq_id: u64) -> SequenceRecord {
    SequenceRecord {
        seq_id,
        tokens: vec![1, 2, 3],
        prompt_len: 2,
        topk_ids: vec![5, 6, 7, 8],
        topk_logprobs: vec![-0.1, -2.5, -0.3, -1.9],
    }
}

fn final_and_tmp(dir: &std::path::Path) -> (bool, bool) {
    (
        dir.join("shard-00000.parquet").exists(),
        dir.join("shard-00000.parquet.tmp").exists(),
    )
}

#[test]
fn invalid_records_are_rejected_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let h = header(100, 2, LogprobDtype::F16, 3, 3);
    let mut w = ShardFileWriter::create(dir.path(), 0, &h).unwrap();
    let cases: Vec<(RecordEdit, &str)> = vec![
        (
            Box::new(|r| r.topk_ids.pop().map(drop).unwrap_or(())),
            "topk_ids has 3 values, expected (L-1)*K = (3-1)*2 = 4",
        ),
        (
            Box::new(|r| r.topk_logprobs.push(-1.0)),
            "topk_logprobs has 5 values",
        ),
        (
            Box::new(|r| r.prompt_len = 0),
            "prompt_len 0 out of range 1..=3",
        ),
        (
            Box::new(|r| r.prompt_len = 4),
            "prompt_len 4 out of range 1..=3",
        ),
        (
            Box::new(|r| r.tokens[1] = 100),
            "tokens[1] = 100 is not < vocab_size 100",
        ),
        (
            Box::new(|r| r.topk_ids[3] = 100),
            "topk id 100 at position 1 rank 1 is not < vocab_size 100",
        ),
        (
            Box::new(|r| r.topk_logprobs[2] = f32::NAN),
            "topk logprob NaN at position 1 rank 0",
        ),
        (
            Box::new(|r| r.topk_logprobs[0] = f32::NEG_INFINITY),
            "must be finite",
        ),
        (
            Box::new(|r| r.topk_logprobs[0] = 0.01),
            "must be finite and <= 0.001",
        ),
        (Box::new(|r| r.seq_id = 1), "expected seq_id 0"),
        (
            Box::new(|r| {
                r.tokens.clear();
                r.topk_ids.clear();
                r.topk_logprobs.clear();
            }),
            "tokens is empty",
        ),
    ];
    for (mutate, needle) in cases {
        let mut r = good(0);
        mutate(&mut r);
        let msg = err_text(w.push(&r));
        assert!(
            msg.contains(needle) && msg.contains("shard-00000.parquet"),
            "{needle}: {msg}"
        );
    }
    // Rejected records leave the writer usable.
    for s in 0..3 {
        w.push(&good(s)).unwrap();
    }
    let msg = err_text(w.push(&good(3)));
    assert!(msg.contains("already holds all 3 of its rows"), "{msg}");
    w.finish().unwrap();
}

#[test]
fn finish_with_missing_rows_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let h = header(100, 2, LogprobDtype::F16, 3, 3);
    let mut w = ShardFileWriter::create(dir.path(), 0, &h).unwrap();
    w.push(&good(0)).unwrap();
    assert_eq!(final_and_tmp(dir.path()), (false, true));
    let msg = err_text(w.finish());
    assert!(
        msg.contains("finish with 1 rows, but file 0 must hold 3"),
        "{msg}"
    );
    assert_eq!(final_and_tmp(dir.path()), (false, false));
}

#[test]
fn dropping_an_unfinished_writer_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let h = header(100, 2, LogprobDtype::F32, 200, 200);
    let mut w = ShardFileWriter::create(dir.path(), 0, &h).unwrap();
    for s in 0..130 {
        w.push(&good(s)).unwrap(); // two row groups already flushed
    }
    drop(w);
    assert_eq!(final_and_tmp(dir.path()), (false, false));
}

#[test]
fn invalid_headers_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let base = header(100, 2, LogprobDtype::F16, 10, 4);
    let cases: Vec<(HeaderEdit, &str)> = vec![
        (Box::new(|h| h.top_k = 101), "top_k must be in 1..=100"),
        (Box::new(|h| h.top_k = 0), "top_k must be in 1..=100"),
        (
            Box::new(|h| h.id_dtype = IdDtype::U32),
            "vocab_size 100 requires \"u16\"",
        ),
        (
            Box::new(|h| h.num_files = 2),
            "num_files is 2 but ceil(num_sequences 10 / seqs_per_file 4) = 3",
        ),
        (
            Box::new(|h| h.seqs_per_file = 0),
            "seqs_per_file must be >= 1",
        ),
        (
            Box::new(|h| h.format_version = 2),
            "format_version is 2, expected 1",
        ),
    ];
    for (mutate, needle) in cases {
        let mut h = base.clone();
        mutate(&mut h);
        let msg = err_text(ShardFileWriter::create(dir.path(), 0, &h));
        assert!(msg.contains(needle), "{needle}: {msg}");
    }
    let msg = err_text(ShardFileWriter::create(dir.path(), 3, &base));
    assert!(msg.contains("file_index 3 out of range 0..3"), "{msg}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn big_vocab_header_requires_u32() {
    let mut h = header(65_536, 2, LogprobDtype::F16, 1, 1);
    assert_eq!(h.id_dtype, IdDtype::U16);
    h.teacher.vocab_size = 65_537;
    assert!(h.validate().is_err());
    h.id_dtype = IdDtype::U32;
    h.validate().unwrap();
}
