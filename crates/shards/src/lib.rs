//! `qat-shards`: the on-disk format of teacher top-K shards (see `formats/shards.md`, version 1).
//!
//! This crate is the only code that knows the layout: [`ShardFileWriter`] writes one Parquet file
//! per `seqs_per_file` sequences, [`Manifest`] records finished files per partition, and
//! [`ShardSet`] / [`ShardFileReader`] read and validate them.

pub mod error;
pub mod fsutil;
pub mod hash;
pub mod header;
pub mod manifest;
pub mod partition;
pub mod reader;
pub mod record;
pub mod schema;
pub mod set;
pub mod writer;

pub use error::{Result, ShardError};
pub use hash::sha256_file;
pub use header::{
    num_files_for, shard_file_name, IdDtype, LogprobDtype, ShardSetHeader, TeacherIdentity,
    FORMAT_VERSION,
};
pub use manifest::{list_manifests, parse_manifest_name, verify_entry, FileEntry, Manifest};
pub use partition::Partition;
pub use reader::{FileRecords, ShardFileReader};
pub use record::{tail_mass, SequenceRecord, LOGPROB_POSITIVE_TOLERANCE};
pub use set::{SetRecords, ShardSet};
pub use writer::ShardFileWriter;
