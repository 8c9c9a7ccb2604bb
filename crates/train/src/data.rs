//! Training batches from a shard set: shuffled by seed, streamed file by file, resumable.
//!
//! Epoch `e` visits the files in a permutation drawn from (seed, e) and the rows of each file in
//! a permutation drawn from (seed, e, file). Only the current file is held in memory. The
//! position in this order ([`DataCursor`]) is saved in checkpoints, so a resumed run sees
//! exactly the batches an uninterrupted run would.

use qat_shards::{FileEntry, FileRecords, Result, SequenceRecord, ShardSet};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::mpsc::{sync_channel, Receiver};

/// Streams every file of `set` through `per_file` (each file's sha256 and metadata checked by
/// [`ShardSet::file_records`]), files in parallel on the rayon pool; returns the results in file
/// order, or the error of the first bad file in file order (whichever thread finds it first).
pub(crate) fn each_file_par<T: Send>(
    set: &ShardSet,
    per_file: impl Fn(FileRecords) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let results: Vec<Result<T>> = set
        .files()
        .par_iter()
        .map(|e| per_file(set.file_records(e)?))
        .collect();
    results.into_iter().collect()
}

/// Where the next batch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DataCursor {
    pub epoch: u64,
    /// Index into the epoch's file order.
    pub file_pos: usize,
    /// Index into the current file's row order.
    pub row_pos: usize,
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fisher-Yates permutation of `0..n` from a stream keyed by `key`.
pub fn permutation(n: usize, key: &[u64]) -> Vec<usize> {
    let mut state = key
        .iter()
        .fold(0x5EED_u64, |acc, &k| splitmix(acc ^ splitmix(k)));
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        state = splitmix(state);
        p.swap(i, (state % (i as u64 + 1)) as usize);
    }
    p
}

/// The shuffled, resumable stream of sequences.
pub struct ShardBatches {
    set: ShardSet,
    seed: u64,
    cursor: DataCursor,
    loaded: Option<(usize, Vec<SequenceRecord>, Vec<usize>)>,
}

impl ShardBatches {
    pub fn new(set: ShardSet, seed: u64, cursor: DataCursor) -> Self {
        Self {
            set,
            seed,
            cursor,
            loaded: None,
        }
    }

    pub fn cursor(&self) -> DataCursor {
        self.cursor
    }

    pub fn set(&self) -> &ShardSet {
        &self.set
    }

    fn file_order(&self, epoch: u64) -> Vec<usize> {
        permutation(self.set.files().len(), &[self.seed, epoch])
    }

    /// The next `n` sequences (crossing file and epoch boundaries as needed).
    pub fn next_batch(&mut self, n: usize) -> Result<Vec<SequenceRecord>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let order = self.file_order(self.cursor.epoch);
            if self.cursor.file_pos >= order.len() {
                self.cursor = DataCursor {
                    epoch: self.cursor.epoch + 1,
                    file_pos: 0,
                    row_pos: 0,
                };
                continue;
            }
            let file = order[self.cursor.file_pos];
            if self.loaded.as_ref().map(|(f, _, _)| *f) != Some(file) {
                let entry: FileEntry = self.set.files()[file].clone();
                let rows = self.set.read_file(&entry)?;
                let perm = permutation(rows.len(), &[self.seed, self.cursor.epoch, file as u64]);
                self.loaded = Some((file, rows, perm));
            }
            let (_, rows, perm) = self.loaded.as_ref().expect("loaded above");
            if self.cursor.row_pos >= rows.len() {
                self.cursor.file_pos += 1;
                self.cursor.row_pos = 0;
                continue;
            }
            out.push(rows[perm[self.cursor.row_pos]].clone());
            self.cursor.row_pos += 1;
        }
        Ok(out)
    }
}

/// A batch read ahead, with the cursor just after it.
type Ahead = Result<(Vec<SequenceRecord>, DataCursor)>;

/// [`ShardBatches`] read and decoded on a background thread, `depth` batches ahead of the
/// training step (Parquet decoding overlaps the forward/backward pass). Yields exactly the
/// batches `ShardBatches::next_batch(batch_size)` would, in order; [`Prefetch::cursor`] is the
/// position after the last batch handed out (what a checkpoint must save), not the reader's.
pub struct Prefetch {
    rx: Receiver<Ahead>,
    cursor: DataCursor,
}

impl Prefetch {
    pub fn new(mut batches: ShardBatches, batch_size: usize, depth: usize) -> Self {
        let cursor = batches.cursor();
        let (tx, rx) = sync_channel::<Ahead>(depth.max(1));
        // The thread stops after an error, or when the receiver is dropped (its send fails).
        std::thread::spawn(move || loop {
            let item = batches
                .next_batch(batch_size)
                .map(|recs| (recs, batches.cursor()));
            let failed = item.is_err();
            if tx.send(item).is_err() || failed {
                break;
            }
        });
        Self { rx, cursor }
    }

    /// The next batch (an error of the reader is returned here, in order).
    pub fn next_batch(&mut self) -> crate::Result<Vec<SequenceRecord>> {
        let (recs, cursor) = self
            .rx
            .recv()
            .map_err(|_| crate::TrainError::Config("the shard reader thread stopped".into()))??;
        self.cursor = cursor;
        Ok(recs)
    }

    pub fn cursor(&self) -> DataCursor {
        self.cursor
    }
}

#[cfg(test)]
mod tests {
    use super::permutation;

    #[test]
    fn permutations_are_permutations_and_depend_on_the_key() {
        let a = permutation(100, &[1, 2]);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_eq!(a, permutation(100, &[1, 2]));
        assert_ne!(a, permutation(100, &[1, 3]));
    }
}
