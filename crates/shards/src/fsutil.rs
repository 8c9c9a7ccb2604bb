//! Atomic file replacement: write `<name>.tmp`, fsync, rename over `<name>`, fsync the directory.

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Result, ShardError};

/// `<path>.tmp`, the name a file lives under until it is complete.
pub fn tmp_path_for(path: &Path) -> PathBuf {
    let mut name: OsString = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Atomically replace `path` with `bytes` (readers see either the old or the new content).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path_for(path);
    let res = (|| {
        let mut f = File::create(&tmp).map_err(|e| ShardError::io(&tmp, "create", e))?;
        f.write_all(bytes)
            .map_err(|e| ShardError::io(&tmp, "write", e))?;
        f.sync_all().map_err(|e| ShardError::io(&tmp, "fsync", e))?;
        drop(f);
        rename_durable(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Rename `from` to `to` and fsync the parent directory so the rename itself is durable.
pub fn rename_durable(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|e| ShardError::io(to, "rename from .tmp", e))?;
    if let Some(parent) = to.parent() {
        sync_dir(parent);
    }
    Ok(())
}

/// Best-effort fsync of a directory (not supported on every platform/filesystem; failures are
/// ignored because the data files themselves were already fsynced).
pub fn sync_dir(dir: &Path) {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}
