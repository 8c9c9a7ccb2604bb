//! `I/N` partitions of a shard set: file `f` belongs to partition `f % N`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::ShardError;

/// Partition `index` of `count`; owns the files whose global index `f` has `f % count == index`.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct Partition {
    pub index: u32,
    pub count: u32,
}

impl Partition {
    /// Validated constructor: requires `count >= 1` and `index < count`.
    pub fn new(index: u32, count: u32) -> Result<Partition, ShardError> {
        let p = Partition { index, count };
        p.check().map_err(|reason| ShardError::InvalidPartition {
            input: p.to_string(),
            reason,
        })?;
        Ok(p)
    }

    /// The single partition `0/1` (the whole set).
    pub fn single() -> Partition {
        Partition { index: 0, count: 1 }
    }

    /// Whether this is the whole set (`count == 1`).
    pub fn is_single(&self) -> bool {
        self.count == 1
    }

    /// Whether global file `file_index` belongs to this partition.
    pub fn owns(&self, file_index: u32) -> bool {
        self.count != 0 && file_index % self.count == self.index
    }

    /// Global indices of this partition's files in a set of `num_files` files, ascending.
    pub fn file_indices(&self, num_files: u32) -> impl Iterator<Item = u32> + '_ {
        let step = self.count.max(1) as usize;
        (self.index..num_files).step_by(step)
    }

    /// The invariant `1 <= count`, `index < count`, as a human-readable violation.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.count == 0 {
            return Err("partition count N must be >= 1".into());
        }
        if self.index >= self.count {
            return Err(format!(
                "partition index {} must be < count {}",
                self.index, self.count
            ));
        }
        Ok(())
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Partition {
    type Err = ShardError;

    /// Parses `I/N` (decimal, no spaces), e.g. `"0/1"`, `"3/8"`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| ShardError::InvalidPartition {
            input: s.to_string(),
            reason,
        };
        let (i, n) = s.split_once('/').ok_or_else(|| err("missing '/'".into()))?;
        let num = |part: &str, what: &str| -> Result<u32, ShardError> {
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err(format!(
                    "{what} {part:?} is not a non-negative integer"
                )));
            }
            part.parse::<u32>()
                .map_err(|e| err(format!("{what} {part:?}: {e}")))
        };
        let p = Partition {
            index: num(i, "index I")?,
            count: num(n, "count N")?,
        };
        p.check().map_err(err)?;
        Ok(p)
    }
}
