//! The safetensors container of a packed file: a deterministic writer (sorted header keys,
//! tensors by descending element size then name) and an opener that reports truncation with
//! the sizes found and expected before handing the bytes to the `safetensors` crate.
//!
//! The `safetensors` crate's own writer serializes `__metadata__` from a `HashMap`, in an order
//! that changes between runs; packing the same student must give the same bytes.

use crate::error::{PackError, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A tensor to write: raw little-endian bytes of `dtype`, row-major.
#[derive(Debug, Clone)]
pub struct OwnedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Largest header the opener accepts (as the `safetensors` crate: 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// Writes `tensors` and `metadata` as a safetensors file at `path` (flushed and fsynced);
/// returns the number of bytes written.
pub fn write(
    path: &Path,
    metadata: &BTreeMap<String, String>,
    mut tensors: Vec<OwnedTensor>,
) -> Result<u64> {
    tensors.sort_by(|a, b| {
        b.dtype
            .bitsize()
            .cmp(&a.dtype.bitsize())
            .then_with(|| a.name.cmp(&b.name))
    });
    let mut header: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    header.insert(
        "__metadata__".into(),
        serde_json::to_value(metadata).unwrap_or_default(),
    );
    let mut offset = 0usize;
    for t in &tensors {
        let expected = t.shape.iter().product::<usize>() * t.dtype.bitsize() / 8;
        assert_eq!(
            t.data.len(),
            expected,
            "tensor {} of {:?} {:?}",
            t.name,
            t.dtype,
            t.shape
        );
        let entry = serde_json::json!({
            "dtype": t.dtype,
            "shape": t.shape,
            "data_offsets": [offset, offset + t.data.len()],
        });
        header.insert(t.name.clone(), entry);
        offset += t.data.len();
    }
    let mut text = serde_json::to_string(&header)
        .unwrap_or_default()
        .into_bytes();
    text.resize(text.len().next_multiple_of(8), b' ');
    let io = |op| PackError::io(path, op);
    let file = std::fs::File::create(path).map_err(io("create"))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, &file);
    w.write_all(&(text.len() as u64).to_le_bytes())
        .map_err(io("write"))?;
    w.write_all(&text).map_err(io("write"))?;
    for t in &tensors {
        w.write_all(&t.data).map_err(io("write"))?;
    }
    w.flush().map_err(io("write"))?;
    drop(w);
    file.sync_all().map_err(io("fsync"))?;
    Ok(8 + text.len() as u64 + offset as u64)
}

/// A packed file mapped read-only, its size checked against its header.
pub struct MappedFile {
    pub path: PathBuf,
    mmap: memmap2::Mmap,
}

impl MappedFile {
    /// Maps `path` and checks that it is a complete safetensors file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(PackError::io(path, "open"))?;
        // SAFETY: mapped read-only; packed files are not modified while a model is loaded.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(PackError::io(path, "map"))?;
        let me = Self {
            path: path.to_path_buf(),
            mmap,
        };
        me.check_size()?;
        me.tensors()?;
        Ok(me)
    }

    pub fn len(&self) -> u64 {
        self.mmap.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.mmap.is_empty()
    }

    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }

    /// The parsed file (header validated by the `safetensors` crate).
    pub fn tensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.mmap).map_err(|e| PackError::Safetensors {
            path: self.path.clone(),
            what: e.to_string(),
        })
    }

    /// The header's `__metadata__` map.
    pub fn metadata(&self) -> Result<Option<std::collections::HashMap<String, String>>> {
        let (_, meta) =
            SafeTensors::read_metadata(&self.mmap).map_err(|e| PackError::Safetensors {
                path: self.path.clone(),
                what: e.to_string(),
            })?;
        Ok(meta.metadata().clone())
    }

    fn check_size(&self) -> Result<()> {
        let (bytes, path) = (&self.mmap[..], &self.path);
        let found = bytes.len() as u64;
        let truncated = |what, expected| PackError::Truncated {
            path: path.clone(),
            what,
            found,
            expected,
        };
        let Some(len) = bytes.get(..8) else {
            return Err(truncated("shorter than the 8-byte header length", 8));
        };
        let n = u64::from_le_bytes(len.try_into().expect("8 bytes"));
        if n > MAX_HEADER {
            return Err(PackError::Safetensors {
                path: path.clone(),
                what: format!("header length {n} exceeds {MAX_HEADER} bytes"),
            });
        }
        let Some(header) = bytes.get(8..8 + n as usize) else {
            return Err(truncated("the header is cut off", 8 + n));
        };
        let bad = |what: String| PackError::Safetensors {
            path: path.clone(),
            what,
        };
        let header: serde_json::Value = std::str::from_utf8(header)
            .map_err(|e| bad(format!("header is not UTF-8: {e}")))
            .and_then(|s| {
                serde_json::from_str(s).map_err(|e| bad(format!("header is not JSON: {e}")))
            })?;
        let obj = header
            .as_object()
            .ok_or_else(|| bad("header is not a JSON object".into()))?;
        let end = obj
            .iter()
            .filter(|(k, _)| *k != "__metadata__")
            .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
            .max()
            .unwrap_or(0);
        // A damaged offset near u64::MAX must not overflow (issue 5; a panic in builds with
        // overflow checks, as the packed_reader fuzz target showed).
        let Some(expected) = (8 + n).checked_add(end) else {
            return Err(bad(format!(
                "data_offsets end {end} is larger than any file"
            )));
        };
        if found != expected {
            return Err(truncated(
                "its size disagrees with the header (8 + header + tensor data)",
                expected,
            ));
        }
        Ok(())
    }
}
