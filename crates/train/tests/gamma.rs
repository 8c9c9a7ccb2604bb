//! CAKLD's gamma measured from a tiny hand-written shard set: the mean teacher top-1
//! probability over the trained (non-prompt) positions only, across files.

use qat_shards::{
    num_files_for, IdDtype, LogprobDtype, Manifest, Partition, SequenceRecord, ShardFileWriter,
    ShardSetHeader, TeacherIdentity, FORMAT_VERSION,
};
use qat_train::teacher_confidence;

const K: usize = 3;

fn header(num_sequences: u64, seqs_per_file: u32, lp: LogprobDtype) -> ShardSetHeader {
    ShardSetHeader {
        format_version: FORMAT_VERSION,
        tool: "qat-train-tests".into(),
        teacher: TeacherIdentity {
            weights_sha256: "ab".repeat(32),
            tokenizer_sha256: "cd".repeat(32),
            vocab_size: 8,
            config: serde_json::json!({"vocab_size": 8}),
            source: String::new(),
        },
        sampling: serde_json::json!({}),
        seed: 0,
        top_k: K as u32,
        logprob_dtype: lp,
        id_dtype: IdDtype::for_vocab(8),
        num_sequences,
        seqs_per_file,
        num_files: num_files_for(num_sequences, seqs_per_file).unwrap(),
    }
}

/// A record whose position `i` has top-K probabilities `probs[i]` (descending).
fn record(seq_id: u64, prompt_len: u32, probs: &[[f64; K]]) -> SequenceRecord {
    let l = probs.len() + 1;
    SequenceRecord {
        seq_id,
        tokens: (0..l as u32).collect(),
        prompt_len,
        topk_ids: (0..probs.len()).flat_map(|_| [0u32, 1, 2]).collect(),
        topk_logprobs: probs.iter().flatten().map(|p| p.ln() as f32).collect(),
    }
}

fn write_set(dir: &std::path::Path, h: &ShardSetHeader, recs: &[SequenceRecord]) {
    let mut m = Manifest::new(h.clone(), Partition::single());
    for f in 0..h.num_files {
        let mut w = ShardFileWriter::create(dir, f, h).unwrap();
        for s in h.file_seq_range(f) {
            w.push(&recs[s as usize]).unwrap();
        }
        m.upsert_file(w.finish().unwrap());
    }
    m.mark_complete().unwrap();
    m.write(dir).unwrap();
}

/// Four sequences in two files:
///   seq 0, prompt_len 1: positions 0, 1 trained, top-1 0.5 and 0.9
///   seq 1, prompt_len 2: position 0 is prompt (top-1 0.99, excluded); 1, 2 trained: 0.2, 0.6
///   seq 2, prompt_len 3 = L: no trained position (0.01, 0.02 excluded)
///   seq 3, L = 1: no positions at all
/// gamma = (0.5 + 0.9 + 0.2 + 0.6) / 4 = 0.55 over 4 positions.
#[test]
fn gamma_is_the_mean_top1_probability_over_trained_positions() {
    let recs = vec![
        record(0, 1, &[[0.5, 0.2, 0.1], [0.9, 0.05, 0.01]]),
        record(
            1,
            2,
            &[[0.99, 0.005, 0.001], [0.2, 0.15, 0.1], [0.6, 0.3, 0.05]],
        ),
        record(2, 3, &[[0.01, 0.009, 0.008], [0.02, 0.01, 0.005]]),
        record(3, 1, &[]),
    ];
    for lp in [LogprobDtype::F32, LogprobDtype::F16] {
        let tmp = tempfile::tempdir().unwrap();
        let h = header(4, 2, lp);
        write_set(tmp.path(), &h, &recs);
        let set = qat_shards::ShardSet::open(tmp.path()).unwrap();
        assert_eq!(set.files().len(), 2);
        let c = teacher_confidence(&set).unwrap();
        assert_eq!(c.positions, 4);
        // f16 log-probs carry relative errors up to 2^-11 (|ln 0.2| * 2^-11 * 0.2 ≈ 1.6e-4).
        let tol = if lp == LogprobDtype::F32 { 1e-7 } else { 2e-4 };
        assert!((c.gamma - 0.55).abs() < tol, "{lp:?}: {}", c.gamma);
    }
}

/// A set with no trained position cannot define gamma: a clear error, not NaN.
#[test]
fn no_trained_positions_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let h = header(1, 1, LogprobDtype::F32);
    write_set(tmp.path(), &h, &[record(0, 2, &[[0.5, 0.2, 0.1]])]);
    let set = qat_shards::ShardSet::open(tmp.path()).unwrap();
    let e = teacher_confidence(&set).unwrap_err().to_string();
    assert!(
        e.contains("no trained positions") && e.contains("--cakld-gamma"),
        "{e}"
    );
}
