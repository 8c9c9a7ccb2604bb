//! Typed errors of `qat-shards`; every message names the file or directory involved.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = ShardError> = std::result::Result<T, E>;

/// Everything that can go wrong while writing, reading or validating a shard set.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// An operating-system I/O error on `path`.
    #[error("{}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// The Parquet library failed on `path` (corrupt, truncated or not a Parquet file).
    #[error("{}: parquet: {source}", path.display())]
    Parquet {
        path: PathBuf,
        #[source]
        source: parquet::errors::ParquetError,
    },

    /// The Arrow library rejected data for `path`.
    #[error("{}: arrow: {source}", path.display())]
    Arrow {
        path: PathBuf,
        #[source]
        source: arrow_schema::ArrowError,
    },

    /// JSON (manifest or embedded header) could not be (de)serialized.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A `format_version` other than the one this crate understands.
    #[error("{}: unsupported shard format_version {found} (this build reads version {expected})", path.display())]
    UnsupportedVersion {
        path: PathBuf,
        found: String,
        expected: u32,
    },

    /// A `ShardSetHeader` that is internally inconsistent.
    #[error("invalid shard set header: {0}")]
    InvalidHeader(String),

    /// A partition string that is not `I/N` with `I < N`.
    #[error("invalid partition {input:?}: {reason} (expected I/N with 0 <= I < N, e.g. 0/4)")]
    InvalidPartition { input: String, reason: String },

    /// A partition was marked complete while some of its files are not listed.
    #[error("partition {partition} is incomplete ({have} of {want} files; first missing: {first_missing})")]
    IncompletePartition {
        partition: String,
        have: usize,
        want: usize,
        first_missing: String,
    },

    /// A record handed to the writer violates the format.
    #[error("{}: record seq_id {seq_id}: {msg}", path.display())]
    InvalidRecord {
        path: PathBuf,
        seq_id: u64,
        msg: String,
    },

    /// A shard file's content (schema, metadata, rows) does not match the format or its manifest.
    #[error("{}: {msg}", path.display())]
    BadFile { path: PathBuf, msg: String },

    /// A manifest is malformed or inconsistent.
    #[error("{}: {msg}", path.display())]
    BadManifest { path: PathBuf, msg: String },

    /// The directory as a whole does not form a valid shard set.
    #[error("shard set {}: {msg}", dir.display())]
    BadShardSet { dir: PathBuf, msg: String },

    /// The bytes of a file do not hash to what its manifest recorded.
    #[error("{}: sha256 mismatch: manifest says {expected}, file has {actual}", path.display())]
    HashMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

impl ShardError {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        ShardError::Io {
            path: path.into(),
            op,
            source,
        }
    }

    pub(crate) fn parquet(path: impl Into<PathBuf>, source: parquet::errors::ParquetError) -> Self {
        ShardError::Parquet {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn bad_file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        ShardError::BadFile {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn bad_manifest(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        ShardError::BadManifest {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn bad_set(dir: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        ShardError::BadShardSet {
            dir: dir.into(),
            msg: msg.into(),
        }
    }
}
