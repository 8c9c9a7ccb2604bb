//! Per-partition manifests (`manifest.json` / `manifest.I-of-N.json`) and their file entries.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, ShardError};
use crate::fsutil::write_atomic;
use crate::hash::sha256_file;
use crate::header::{shard_file_name, ShardSetHeader, FORMAT_VERSION};
use crate::partition::Partition;

/// One finished shard file as recorded in a manifest.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
pub struct FileEntry {
    /// `shard-{file_index:05}.parquet`, relative to the shard-set directory.
    pub name: String,
    /// Global file index.
    pub file_index: u32,
    /// Seq id of the first row (`file_index * seqs_per_file`).
    pub first_seq_id: u64,
    /// Number of rows (sequences).
    pub rows: u64,
    /// Sum of `L` (all tokens, prompt included) over the rows.
    pub tokens: u64,
    /// File size in bytes.
    pub bytes: u64,
    /// Lowercase hex sha256 of the whole file.
    pub sha256: String,
}

/// The manifest of one partition of a shard set.
#[derive(Serialize, Deserialize, Clone, PartialEq, Debug)]
pub struct Manifest {
    pub header: ShardSetHeader,
    pub partition: Partition,
    /// Finished files of this partition, sorted by `file_index`.
    pub files: Vec<FileEntry>,
    /// True once every file of the partition is listed.
    pub complete: bool,
}

/// Parse a manifest file name: `manifest.json` -> `0/1`, `manifest.I-of-N.json` -> `I/N` (N >= 2).
/// Returns `None` for any other name.
pub fn parse_manifest_name(name: &str) -> Option<Partition> {
    if name == "manifest.json" {
        return Some(Partition::single());
    }
    let (i, n) = name
        .strip_prefix("manifest.")?
        .strip_suffix(".json")?
        .split_once("-of-")?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(i) || !digits(n) {
        return None;
    }
    let p = Partition {
        index: i.parse().ok()?,
        count: n.parse().ok()?,
    };
    (p.check().is_ok() && Manifest::file_name(&p) == name).then_some(p)
}

/// All manifests in `dir` as `(path, partition)`, sorted by name. Missing directory -> empty.
pub fn list_manifests(dir: &Path) -> Result<Vec<(PathBuf, Partition)>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ShardError::io(dir, "read directory", e)),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| ShardError::io(dir, "read directory", e))?;
        if let Some(p) = ent.file_name().to_str().and_then(parse_manifest_name) {
            out.push((ent.path(), p));
        }
    }
    out.sort_by_key(|(_, p)| (p.count, p.index));
    Ok(out)
}

/// Whether `dir/entry.name` exists with `entry.bytes` bytes and sha256 `entry.sha256`
/// (`Ok(false)` when missing or different; `Err` only for other I/O failures).
pub fn verify_entry(dir: &Path, entry: &FileEntry) -> Result<bool> {
    let path = dir.join(&entry.name);
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() && m.len() == entry.bytes => {}
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(ShardError::io(&path, "stat", e)),
    }
    Ok(sha256_file(&path)? == entry.sha256)
}

impl Manifest {
    /// An empty, incomplete manifest.
    pub fn new(header: ShardSetHeader, partition: Partition) -> Manifest {
        Manifest {
            header,
            partition,
            files: Vec::new(),
            complete: false,
        }
    }

    /// `manifest.json` if `partition.count == 1`, else `manifest.{I}-of-{N}.json`.
    pub fn file_name(partition: &Partition) -> String {
        if partition.is_single() {
            "manifest.json".to_string()
        } else {
            format!("manifest.{}-of-{}.json", partition.index, partition.count)
        }
    }

    /// `dir/`[`Manifest::file_name`].
    pub fn path(dir: &Path, partition: &Partition) -> PathBuf {
        dir.join(Self::file_name(partition))
    }

    /// Write atomically (tmp + fsync + rename) to [`Manifest::path`]; returns the path.
    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        let path = Self::path(dir, &self.partition);
        let mut json = serde_json::to_vec_pretty(self).map_err(|source| ShardError::Json {
            path: path.clone(),
            source,
        })?;
        json.push(b'\n');
        write_atomic(&path, &json)?;
        Ok(path)
    }

    /// Load and validate a manifest: `header.format_version == 1` (checked before anything else),
    /// header consistency, partition matching the file name, and every entry's name, ownership,
    /// seq range and row count; a `complete` manifest must list all of its partition's files.
    pub fn load(path: &Path) -> Result<Manifest> {
        let bytes = std::fs::read(path).map_err(|e| ShardError::io(path, "read manifest", e))?;
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|source| ShardError::Json {
                path: path.to_owned(),
                source,
            })?;
        match value.pointer("/header/format_version") {
            Some(v) if v.as_u64() == Some(u64::from(FORMAT_VERSION)) => {}
            other => {
                return Err(ShardError::UnsupportedVersion {
                    path: path.to_owned(),
                    found: other
                        .map_or("<missing header.format_version>".into(), |v| v.to_string()),
                    expected: FORMAT_VERSION,
                })
            }
        }
        let m: Manifest = serde_json::from_value(value).map_err(|source| ShardError::Json {
            path: path.to_owned(),
            source,
        })?;
        if let Some(named) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(parse_manifest_name)
        {
            if named != m.partition {
                return Err(ShardError::bad_manifest(
                    path,
                    format!(
                        "file name says partition {named} but the manifest says {}",
                        m.partition
                    ),
                ));
            }
        }
        m.validate()
            .map_err(|msg| ShardError::bad_manifest(path, msg))?;
        Ok(m)
    }

    /// Writer side of resuming: the existing manifest of `partition` in `dir`, if any. Errors if
    /// `dir` holds manifests made with a different partition count (a set must be produced with
    /// one `N`), or if the existing manifest is invalid.
    pub fn load_existing_partition(dir: &Path, partition: &Partition) -> Result<Option<Manifest>> {
        partition
            .check()
            .map_err(|reason| ShardError::InvalidPartition {
                input: partition.to_string(),
                reason,
            })?;
        let manifests = list_manifests(dir)?;
        if let Some((p, other)) = manifests.iter().find(|(_, p)| p.count != partition.count) {
            return Err(ShardError::bad_set(
                dir,
                format!(
                    "already holds {} (partition {other}), which cannot be mixed with partition {partition}; \
                     use the same --shard I/N count or another output directory",
                    p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned())
                ),
            ));
        }
        let path = Self::path(dir, partition);
        if !path.exists() {
            return Ok(None);
        }
        Self::load(&path).map(Some)
    }

    /// `Ok` if `header` may continue / join this manifest's shard set (all fields but `tool` and
    /// `teacher.source` equal); otherwise an error naming the differing fields.
    pub fn check_header(&self, dir: &Path, header: &ShardSetHeader) -> Result<()> {
        self.header.check_compatible(header).map_err(|diff| {
            ShardError::bad_manifest(
                Self::path(dir, &self.partition),
                format!("existing shard set was made with different settings: {diff} (existing vs requested)"),
            )
        })
    }

    /// Global indices of all files of this partition.
    pub fn expected_file_indices(&self) -> Vec<u32> {
        self.partition.file_indices(self.header.num_files).collect()
    }

    /// Files of this partition not yet listed.
    pub fn missing_file_indices(&self) -> Vec<u32> {
        self.expected_file_indices()
            .into_iter()
            .filter(|&f| self.entry(f).is_none())
            .collect()
    }

    /// The entry of `file_index`, if listed.
    pub fn entry(&self, file_index: u32) -> Option<&FileEntry> {
        self.files.iter().find(|e| e.file_index == file_index)
    }

    /// Insert or replace the entry with the same `file_index`, keeping `files` sorted.
    pub fn upsert_file(&mut self, entry: FileEntry) {
        self.files.retain(|e| e.file_index != entry.file_index);
        self.files.push(entry);
        self.files.sort_by_key(|e| e.file_index);
    }

    /// Set `complete = true`; errors (naming the missing files) unless every file is listed.
    pub fn mark_complete(&mut self) -> Result<()> {
        let missing = self.missing_file_indices();
        if !missing.is_empty() {
            return Err(ShardError::IncompletePartition {
                partition: self.partition.to_string(),
                have: self.files.len(),
                want: self.expected_file_indices().len(),
                first_missing: shard_file_name(missing[0]),
            });
        }
        self.complete = true;
        Ok(())
    }

    /// Structural checks; the message is prefixed by the caller with the manifest path.
    fn validate(&self) -> std::result::Result<(), String> {
        self.partition.check()?;
        self.header.validate().map_err(|e| e.to_string())?;
        let h = &self.header;
        let mut prev: Option<u32> = None;
        for e in &self.files {
            let f = e.file_index;
            if f >= h.num_files {
                return Err(format!(
                    "file_index {f} out of range 0..{} (num_files)",
                    h.num_files
                ));
            }
            if !self.partition.owns(f) {
                return Err(format!(
                    "file_index {f} does not belong to partition {}",
                    self.partition
                ));
            }
            if prev.is_some_and(|p| p >= f) {
                return Err(format!(
                    "files not strictly sorted by file_index (duplicate or out of order at {f})"
                ));
            }
            prev = Some(f);
            if e.name != shard_file_name(f) {
                return Err(format!(
                    "file_index {f} has name {:?}, expected {:?}",
                    e.name,
                    shard_file_name(f)
                ));
            }
            let range = h.file_seq_range(f);
            if e.first_seq_id != range.start || e.rows != range.end - range.start {
                return Err(format!(
                    "{}: first_seq_id {} rows {}, expected first_seq_id {} rows {}",
                    e.name,
                    e.first_seq_id,
                    e.rows,
                    range.start,
                    range.end - range.start
                ));
            }
            if e.sha256.len() != 64
                || !e
                    .sha256
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            {
                return Err(format!(
                    "{}: sha256 {:?} is not 64 lowercase hex digits",
                    e.name, e.sha256
                ));
            }
        }
        if self.complete {
            let (have, want) = (self.files.len(), self.expected_file_indices().len());
            if have != want {
                return Err(format!("marked complete but lists {have} of {want} files"));
            }
        }
        Ok(())
    }
}
