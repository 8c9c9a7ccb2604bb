//! The GGUF container (version 3, `formats/gguf.md`): typed metadata key/values, tensor infos
//! and 32-byte aligned tensor data, written deterministically to `<path>.tmp`, fsynced and
//! renamed into place, so a file under its final name is always complete.
//!
//! Layout (all integers little-endian): magic `GGUF`, version `u32` 3, tensor count `u64`, KV
//! count `u64`; the KVs (key string, value type `u32`, value); the tensor infos (name string,
//! `n_dims` `u32`, `n_dims` × `u64` dims with `ne0` (the contiguous one) first, ggml type `u32`,
//! data offset `u64` from the start of the data section); zero padding to the alignment; the
//! tensor data, each tensor padded with zeros to the alignment. A string is a `u64` byte length
//! and UTF-8 bytes, without a terminator.

use crate::error::{PackError, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// `GGUF`.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// The GGUF version written.
pub const VERSION: u32 = 3;
/// `general.alignment` (also GGUF's default).
pub const ALIGNMENT: usize = 32;
/// `GGML_TYPE_F32`, `GGML_TYPE_F16`, `GGML_TYPE_BF16`.
pub const TYPE_F32: u32 = 0;
pub const TYPE_F16: u32 = 1;
pub const TYPE_BF16: u32 = 30;

/// A metadata value (only the GGUF value types qat writes).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    F32Array(Vec<f32>),
    I32Array(Vec<i32>),
}

/// GGUF value type ids.
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;

/// A tensor to write: its ggml type id and raw bytes, `dims` with `ne0` first.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub data: Vec<u8>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    let array_head = |out: &mut Vec<u8>, ty: u32, n: usize| {
        out.extend_from_slice(&T_ARRAY.to_le_bytes());
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&(n as u64).to_le_bytes());
    };
    match v {
        Value::U32(x) => {
            out.extend_from_slice(&T_U32.to_le_bytes());
            out.extend_from_slice(&x.to_le_bytes());
        }
        Value::I32(x) => {
            out.extend_from_slice(&T_I32.to_le_bytes());
            out.extend_from_slice(&x.to_le_bytes());
        }
        Value::F32(x) => {
            out.extend_from_slice(&T_F32.to_le_bytes());
            out.extend_from_slice(&x.to_le_bytes());
        }
        Value::Bool(x) => {
            out.extend_from_slice(&T_BOOL.to_le_bytes());
            out.push(u8::from(*x));
        }
        Value::Str(s) => {
            out.extend_from_slice(&T_STRING.to_le_bytes());
            put_str(out, s);
        }
        Value::StrArray(a) => {
            array_head(out, T_STRING, a.len());
            a.iter().for_each(|s| put_str(out, s));
        }
        Value::F32Array(a) => {
            array_head(out, T_F32, a.len());
            a.iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        Value::I32Array(a) => {
            array_head(out, T_I32, a.len());
            a.iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
    }
}

fn pad(n: usize) -> usize {
    n.next_multiple_of(ALIGNMENT) - n
}

/// The whole file's bytes before the tensor data (header, KVs, infos, padding) and the data
/// offset of each tensor.
fn header(kvs: &[(String, Value)], tensors: &[Tensor]) -> (Vec<u8>, Vec<u64>) {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        put_str(&mut out, k);
        put_value(&mut out, v);
    }
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        t.dims
            .iter()
            .for_each(|d| out.extend_from_slice(&d.to_le_bytes()));
        out.extend_from_slice(&t.ggml_type.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offsets.push(offset);
        offset += (t.data.len() + pad(t.data.len())) as u64;
    }
    out.resize(out.len() + pad(out.len()), 0);
    (out, offsets)
}

/// Writes a GGUF file at `path` (via `<path>.tmp`, fsynced, then renamed); returns its size.
/// Removes the temporary file on failure.
pub fn write(path: &Path, kvs: &[(String, Value)], tensors: &[Tensor]) -> Result<u64> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let written = write_file(&tmp, kvs, tensors);
    let bytes = match written {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, path).map_err(PackError::io(path, "rename into place"))?;
    Ok(bytes)
}

fn write_file(path: &Path, kvs: &[(String, Value)], tensors: &[Tensor]) -> Result<u64> {
    let io = |op| PackError::io(path, op);
    let (head, _) = header(kvs, tensors);
    let file = std::fs::File::create(path).map_err(io("create"))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, &file);
    w.write_all(&head).map_err(io("write"))?;
    let mut total = head.len() as u64;
    for t in tensors {
        w.write_all(&t.data).map_err(io("write"))?;
        w.write_all(&vec![0u8; pad(t.data.len())])
            .map_err(io("write"))?;
        total += (t.data.len() + pad(t.data.len())) as u64;
    }
    w.flush().map_err(io("write"))?;
    drop(w);
    file.sync_all().map_err(io("fsync"))?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_bytes_by_hand() {
        let kvs = vec![
            ("a".to_string(), Value::U32(7)),
            ("s".to_string(), Value::StrArray(vec!["xy".into()])),
        ];
        let t = Tensor {
            name: "t".into(),
            dims: vec![2, 1],
            ggml_type: TYPE_F32,
            data: vec![0; 8],
        };
        let (h, offsets) = header(&kvs, &[t.clone(), t]);
        let mut want = b"GGUF".to_vec();
        want.extend([3, 0, 0, 0]); // version
        want.extend([2, 0, 0, 0, 0, 0, 0, 0]); // tensors
        want.extend([2, 0, 0, 0, 0, 0, 0, 0]); // kvs
        want.extend([1, 0, 0, 0, 0, 0, 0, 0, b'a', 4, 0, 0, 0, 7, 0, 0, 0]);
        want.extend([
            1, 0, 0, 0, 0, 0, 0, 0, b's', 9, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0,
        ]);
        want.extend([2, 0, 0, 0, 0, 0, 0, 0, b'x', b'y']);
        for off in [0u8, 32] {
            want.extend([1, 0, 0, 0, 0, 0, 0, 0, b't', 2, 0, 0, 0]);
            want.extend([2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
            want.extend([0, 0, 0, 0, off, 0, 0, 0, 0, 0, 0, 0]);
        }
        assert_eq!(&h[..want.len()], &want[..]);
        assert_eq!(h.len(), want.len().next_multiple_of(32));
        assert!(h[want.len()..].iter().all(|&b| b == 0));
        assert_eq!(offsets, [0, 32]);
    }
}
