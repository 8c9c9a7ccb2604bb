//! Shared helpers for the `qat-shards` integration tests: synthetic headers, records and sets.
#![allow(dead_code)]

use std::path::Path;

use qat_shards::{
    num_files_for, FileEntry, IdDtype, LogprobDtype, Manifest, Partition, SequenceRecord,
    ShardFileWriter, ShardSetHeader, TeacherIdentity, FORMAT_VERSION,
};

/// Deterministic splitmix64 generator.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub fn header(
    vocab: u32,
    top_k: u32,
    lp: LogprobDtype,
    num_sequences: u64,
    seqs_per_file: u32,
) -> ShardSetHeader {
    ShardSetHeader {
        format_version: FORMAT_VERSION,
        tool: "qat-shards-tests 0.0.0".into(),
        teacher: TeacherIdentity {
            weights_sha256: "ab".repeat(32),
            tokenizer_sha256: "cd".repeat(32),
            vocab_size: vocab,
            config: serde_json::json!({"hidden_size": 64, "vocab_size": vocab, "rope_theta": 10000.0}),
            source: "/models/teacher".into(),
        },
        sampling: serde_json::json!({"temperature": 1.0, "top_p": 1.0, "seed": 7, "max_new_tokens": 12}),
        seed: 7,
        top_k,
        logprob_dtype: lp,
        id_dtype: IdDtype::for_vocab(vocab),
        num_sequences,
        seqs_per_file,
        num_files: num_files_for(num_sequences, seqs_per_file).unwrap(),
    }
}

/// A realistic record: log-softmax over `vocab` random logits, top-K sorted descending.
/// For vocabularies above 4096 the "full" softmax is replaced by K random descending values.
pub fn record(seq_id: u64, vocab: u32, top_k: u32, max_len: u64) -> SequenceRecord {
    let mut rng =
        Rng::new(seq_id.wrapping_mul(1_000_003) ^ u64::from(vocab) << 20 ^ u64::from(top_k));
    let l = rng.range(1, max_len + 1) as usize;
    let prompt_len = rng.range(1, l as u64 + 1) as u32;
    let tokens: Vec<u32> = (0..l)
        .map(|_| rng.range(0, u64::from(vocab)) as u32)
        .collect();
    let k = top_k as usize;
    let mut topk_ids = Vec::with_capacity((l - 1) * k);
    let mut topk_logprobs = Vec::with_capacity((l - 1) * k);
    for _ in 1..l {
        if vocab <= 4096 {
            let logits: Vec<f64> = (0..vocab).map(|_| rng.unit() * 12.0 - 6.0).collect();
            let m = logits.iter().cloned().fold(f64::MIN, f64::max);
            let lse = m + logits.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            let mut idx: Vec<u32> = (0..vocab).collect();
            idx.sort_by(|&a, &b| {
                logits[b as usize]
                    .total_cmp(&logits[a as usize])
                    .then(a.cmp(&b))
            });
            for &i in &idx[..k] {
                topk_ids.push(i);
                topk_logprobs.push((logits[i as usize] - lse) as f32);
            }
        } else {
            let mut lp = -(rng.unit() as f32) * 0.5;
            for _ in 0..k {
                topk_ids.push(rng.range(0, u64::from(vocab)) as u32);
                topk_logprobs.push(lp);
                lp -= (rng.unit() as f32) * 3.0;
            }
        }
    }
    SequenceRecord {
        seq_id,
        tokens,
        prompt_len,
        topk_ids,
        topk_logprobs,
    }
}

/// All records of a set described by `h`.
pub fn records(h: &ShardSetHeader, max_len: u64) -> Vec<SequenceRecord> {
    (0..h.num_sequences)
        .map(|s| record(s, h.teacher.vocab_size, h.top_k, max_len))
        .collect()
}

/// Write one file from `recs` (all records of the set).
pub fn write_file(dir: &Path, h: &ShardSetHeader, f: u32, recs: &[SequenceRecord]) -> FileEntry {
    let mut w = ShardFileWriter::create(dir, f, h).unwrap();
    for s in h.file_seq_range(f) {
        w.push(&recs[s as usize]).unwrap();
    }
    w.finish().unwrap()
}

/// Write partition `p` completely (all its files and a complete manifest).
pub fn write_partition(
    dir: &Path,
    h: &ShardSetHeader,
    p: Partition,
    recs: &[SequenceRecord],
) -> Manifest {
    let mut m = Manifest::new(h.clone(), p);
    for f in p.file_indices(h.num_files) {
        m.upsert_file(write_file(dir, h, f, recs));
        m.write(dir).unwrap();
    }
    m.mark_complete().unwrap();
    m.write(dir).unwrap();
    m
}

/// Write a whole single-partition set; returns its records.
pub fn write_set(dir: &Path, h: &ShardSetHeader, max_len: u64) -> Vec<SequenceRecord> {
    let recs = records(h, max_len);
    write_partition(dir, h, Partition::single(), &recs);
    recs
}

/// Error text of a `Result`, panicking if it is `Ok`.
pub fn err_text<T, E: std::fmt::Display>(r: Result<T, E>) -> String {
    match r {
        Ok(_) => panic!("expected an error, got Ok"),
        Err(e) => e.to_string(),
    }
}
