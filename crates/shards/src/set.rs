//! `ShardSet`: a directory of shard files plus one or more partition manifests, opened as a whole.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::error::{Result, ShardError};
use crate::hash::sha256_file;
use crate::header::{shard_file_name, ShardSetHeader};
use crate::manifest::{list_manifests, FileEntry, Manifest};
use crate::partition::Partition;
use crate::reader::{FileRecords, ShardFileReader};
use crate::record::SequenceRecord;
use sha2::Digest;

/// A complete, consistent shard set (all partitions present and complete, every file listed once).
///
/// Clones share one record of the files whose hash has been checked (see [`ShardSet::file_records`]).
#[derive(Debug, Clone)]
pub struct ShardSet {
    dir: PathBuf,
    header: ShardSetHeader,
    partition_count: u32,
    files: Vec<FileEntry>,
    verified: Arc<Mutex<HashMap<PathBuf, FileStamp>>>,
}

/// What tells an unchanged file from a changed one without reading it: size, modification time
/// and, on Unix, device and inode (a file replaced by rename gets a new inode).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: SystemTime,
    dev_ino: (u64, u64),
}

impl FileStamp {
    /// `None` where the platform reports no modification time.
    fn of(path: &Path) -> Option<FileStamp> {
        let m = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        let dev_ino = {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        };
        #[cfg(not(unix))]
        let dev_ino = (0, 0);
        Some(FileStamp {
            len: m.len(),
            modified: m.modified().ok()?,
            dev_ino,
        })
    }
}

fn name_of(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

impl ShardSet {
    /// Open `dir`: find `manifest.json` or `manifest.I-of-N.json` for every `I` in `0..N` (not
    /// both kinds), check equal headers (ignoring `tool`, `teacher.source`), completeness, that
    /// every file index `0..num_files` is listed exactly once, and that each listed file exists
    /// with the recorded size. Content hashes are checked by [`ShardSet::verify`] (all files) and
    /// by [`ShardSet::file_records`] (each file as it is read).
    pub fn open(dir: &Path) -> Result<ShardSet> {
        if !dir.is_dir() {
            return Err(ShardError::bad_set(
                dir,
                "is not a directory (or does not exist)",
            ));
        }
        let found = list_manifests(dir)?;
        if found.is_empty() {
            return Err(ShardError::bad_set(
                dir,
                "no manifest found (expected manifest.json or manifest.I-of-N.json); \
                 is this a qat-sample output directory, and did the run write its first file?",
            ));
        }
        let counts: Vec<u32> = {
            let mut c: Vec<u32> = found.iter().map(|(_, p)| p.count).collect();
            c.dedup();
            c
        };
        if counts.len() > 1 {
            let names: Vec<String> = found.iter().map(|(p, _)| name_of(p)).collect();
            return Err(ShardError::bad_set(
                dir,
                format!(
                    "manifests from different partition counts cannot be mixed: {} \
                     (keep either manifest.json or the manifest.I-of-N.json set of one N)",
                    names.join(", ")
                ),
            ));
        }
        let count = counts[0];
        for i in 0..count {
            let p = Partition { index: i, count };
            if !found.iter().any(|(_, q)| *q == p) {
                return Err(ShardError::bad_set(
                    dir,
                    format!(
                        "partition {p} is missing ({} not found): run qat-sample --shard {p} \
                         into this directory or copy its output here",
                        Manifest::file_name(&p)
                    ),
                ));
            }
        }
        let mut manifests: Vec<(PathBuf, Manifest)> = Vec::with_capacity(found.len());
        for (path, _) in &found {
            manifests.push((path.clone(), Manifest::load(path)?));
        }
        let (first_path, first) = &manifests[0];
        for (path, m) in &manifests[1..] {
            first.header.check_compatible(&m.header).map_err(|diff| {
                ShardError::bad_manifest(
                    path,
                    format!(
                        "header differs from {}: {diff} ({} vs this file)",
                        name_of(first_path),
                        name_of(first_path)
                    ),
                )
            })?;
        }
        for (_, m) in &manifests {
            if !m.complete {
                return Err(ShardError::bad_set(
                    dir,
                    format!(
                        "partition {p} is incomplete ({} of {} files): rerun qat-sample --shard {p} to resume",
                        m.files.len(),
                        m.expected_file_indices().len(),
                        p = m.partition
                    ),
                ));
            }
        }
        let header = first.header.clone();
        let mut by_index: BTreeMap<u32, (FileEntry, PathBuf)> = BTreeMap::new();
        for (path, m) in &manifests {
            for e in &m.files {
                if let Some((_, other)) = by_index.get(&e.file_index) {
                    return Err(ShardError::bad_set(
                        dir,
                        format!(
                            "{} is listed twice (in {} and {})",
                            e.name,
                            name_of(other),
                            name_of(path)
                        ),
                    ));
                }
                by_index.insert(e.file_index, (e.clone(), path.clone()));
            }
        }
        if let Some(f) = (0..header.num_files).find(|f| !by_index.contains_key(f)) {
            return Err(ShardError::bad_set(
                dir,
                format!(
                    "{} is not listed in any manifest ({} of {} files listed)",
                    shard_file_name(f),
                    by_index.len(),
                    header.num_files
                ),
            ));
        }
        if by_index.len() != header.num_files as usize {
            return Err(ShardError::bad_set(
                dir,
                format!(
                    "manifests list {} files, expected num_files = {}",
                    by_index.len(),
                    header.num_files
                ),
            ));
        }
        let mut files = Vec::with_capacity(by_index.len());
        for (e, listed_in) in by_index.into_values() {
            let path = dir.join(&e.name);
            let len = match std::fs::metadata(&path) {
                Ok(m) => m.len(),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    return Err(ShardError::bad_file(
                        &path,
                        format!("listed in {} but does not exist", name_of(&listed_in)),
                    ))
                }
                Err(err) => return Err(ShardError::io(&path, "stat", err)),
            };
            if len != e.bytes {
                return Err(ShardError::bad_file(
                    &path,
                    format!(
                        "has {len} bytes, {} says {} (truncated or replaced?)",
                        name_of(&listed_in),
                        e.bytes
                    ),
                ));
            }
            files.push(e);
        }
        Ok(ShardSet {
            dir: dir.to_owned(),
            header,
            partition_count: count,
            files,
            verified: Arc::default(),
        })
    }

    /// The shard set directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The shared header (taken from partition 0's manifest).
    /// sha256 over the set's manifest files (sorted by name): the identity of the shard set that
    /// provenance records.
    pub fn manifests_sha256(&self) -> Result<String> {
        let mut files: Vec<PathBuf> = list_manifests(&self.dir)?
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        files.sort();
        let mut hasher = sha2::Sha256::new();
        for f in &files {
            let bytes =
                std::fs::read(f).map_err(|e| ShardError::io(f, "cannot read manifest", e))?;
            hasher.update(&bytes);
        }
        Ok(hex::encode(hasher.finalize()))
    }

    pub fn header(&self) -> &ShardSetHeader {
        &self.header
    }

    /// Number of partitions the set was produced in.
    pub fn partition_count(&self) -> u32 {
        self.partition_count
    }

    /// All files, sorted by `file_index`.
    pub fn files(&self) -> &[FileEntry] {
        &self.files
    }

    /// Total number of tokens (sum of `L`) over all sequences.
    pub fn total_tokens(&self) -> u64 {
        self.files.iter().map(|e| e.tokens).sum()
    }

    /// Path of a listed file.
    pub fn file_path(&self, entry: &FileEntry) -> PathBuf {
        self.dir.join(&entry.name)
    }

    /// Recompute the sha256 of every file and compare with the manifests.
    pub fn verify(&self) -> Result<()> {
        for e in &self.files {
            let path = self.file_path(e);
            let actual = sha256_file(&path)?;
            if actual != e.sha256 {
                return Err(ShardError::HashMismatch {
                    path,
                    expected: e.sha256.clone(),
                    actual,
                });
            }
        }
        Ok(())
    }

    /// Checks `entry`'s file against the manifest's sha256, unless this set (or a clone) has
    /// already checked it and its size, modification time and inode have not changed since.
    fn check_hash(&self, path: &Path, entry: &FileEntry) -> Result<()> {
        let before = FileStamp::of(path);
        let known = |stamp: &FileStamp| {
            let verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            verified.get(path) == Some(stamp)
        };
        if before.as_ref().is_some_and(known) {
            return Ok(());
        }
        let actual = sha256_file(path)?;
        if actual != entry.sha256 {
            return Err(ShardError::HashMismatch {
                path: path.to_owned(),
                expected: entry.sha256.clone(),
                actual,
            });
        }
        // Remembered only if the file did not change while it was being hashed.
        if let Some(stamp) = before.filter(|b| FileStamp::of(path).as_ref() == Some(b)) {
            let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            verified.insert(path.to_owned(), stamp);
        }
        Ok(())
    }

    /// Open one file for streaming: its SHA-256 must be the manifest's (a flipped byte inside
    /// compressed pages can decode without any Parquet error, so the hash is the only reliable
    /// check), and its embedded metadata must agree with the manifest.
    ///
    /// The hash is computed on the first read of a file only: later reads through this set or
    /// its clones (e.g. every training epoch) skip it while the file's size, modification time
    /// and inode are those it had when it was hashed. Any write or replacement of the file
    /// changes them (on file systems with sub-second timestamps), and the file is hashed again.
    pub fn file_records(&self, entry: &FileEntry) -> Result<FileRecords> {
        let path = self.file_path(entry);
        self.check_hash(&path, entry)?;
        let reader = ShardFileReader::open(&path)?;
        reader
            .header()
            .check_compatible(&self.header)
            .map_err(|diff| {
                ShardError::bad_file(
                    &path,
                    format!(
                        "embedded qat.header differs from the manifest: {diff} (file vs manifest)"
                    ),
                )
            })?;
        if reader.file_index() != entry.file_index {
            return Err(ShardError::bad_file(
                &path,
                format!(
                    "qat.file_index is {}, manifest says {}",
                    reader.file_index(),
                    entry.file_index
                ),
            ));
        }
        if reader.num_rows() != entry.rows {
            return Err(ShardError::bad_file(
                &path,
                format!(
                    "has {} rows, manifest says {}",
                    reader.num_rows(),
                    entry.rows
                ),
            ));
        }
        Ok(reader.records()?.expect_tokens(entry.tokens))
    }

    /// Read and validate all records of one file.
    pub fn read_file(&self, entry: &FileEntry) -> Result<Vec<SequenceRecord>> {
        self.file_records(entry)?.collect()
    }

    /// Stream all records of all files in seq-id order, one row group at a time. After an error
    /// the iterator ends.
    pub fn records(&self) -> SetRecords {
        SetRecords {
            set: self.clone(),
            next_file: 0,
            current: None,
            done: false,
        }
    }
}

/// Streaming iterator over every record of a [`ShardSet`].
pub struct SetRecords {
    set: ShardSet,
    next_file: usize,
    current: Option<FileRecords>,
    done: bool,
}

impl Iterator for SetRecords {
    type Item = Result<SequenceRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            if let Some(cur) = self.current.as_mut() {
                match cur.next() {
                    Some(Ok(r)) => return Some(Ok(r)),
                    Some(Err(e)) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                    None => self.current = None,
                }
            }
            let Some(entry) = self.set.files.get(self.next_file) else {
                self.done = true;
                break;
            };
            self.next_file += 1;
            match self.set.file_records(entry) {
                Ok(fr) => self.current = Some(fr),
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        None
    }
}
