//! `ShardFileWriter`: validates records and writes one shard file atomically (`.tmp` -> rename).

use std::fs::File;
use std::io::BufWriter;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::types::{Float16Type, Float32Type, UInt16Type, UInt32Type, UInt64Type};
use arrow_array::{ArrayRef, ListArray, PrimitiveArray, RecordBatch};
use arrow_buffer::OffsetBuffer;
use arrow_schema::SchemaRef;
use half::f16;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterVersion};

use crate::error::{Result, ShardError};
use crate::fsutil::{rename_durable, tmp_path_for};
use crate::hash::HashingWriter;
use crate::header::{shard_file_name, IdDtype, LogprobDtype, ShardSetHeader, FORMAT_VERSION};
use crate::manifest::FileEntry;
use crate::record::SequenceRecord;
use crate::schema::{self, arrow_schema, element_field, ROWS_PER_ROW_GROUP, ROW_GROUP_MAX_VALUES};

/// zstd level used for every column.
pub const ZSTD_LEVEL: i32 = 3;

type Sink = ArrowWriter<HashingWriter<BufWriter<File>>>;

/// Writes the rows of one shard file. Records must be pushed in seq-id order and the file must
/// receive exactly its rows; [`ShardFileWriter::finish`] then renames it into place. Dropping the
/// writer without finishing removes the `.tmp` file and leaves nothing under the final name.
pub struct ShardFileWriter {
    final_path: PathBuf,
    tmp_path: PathBuf,
    header: ShardSetHeader,
    file_index: u32,
    schema: SchemaRef,
    sink: Option<Sink>,
    buf: Buffers,
    seq_range: Range<u64>,
    next_seq_id: u64,
    tokens: u64,
    finished: bool,
}

#[derive(Default)]
struct Buffers {
    seq_ids: Vec<u64>,
    prompt_lens: Vec<u32>,
    token_lens: Vec<usize>,
    tokens: Vec<u32>,
    topk_lens: Vec<usize>,
    ids: Vec<u32>,
    logprobs: Vec<f32>,
}

/// Key-value metadata written into every shard file.
fn key_values(header: &ShardSetHeader, file_index: u32, path: &Path) -> Result<Vec<KeyValue>> {
    let json = serde_json::to_string(&header.for_file()).map_err(|source| ShardError::Json {
        path: path.to_owned(),
        source,
    })?;
    let kv = |k: &str, v: String| KeyValue::new(k.to_string(), v);
    Ok(vec![
        kv(schema::KV_FORMAT_VERSION, FORMAT_VERSION.to_string()),
        kv(schema::KV_FILE_INDEX, file_index.to_string()),
        kv(schema::KV_TOP_K, header.top_k.to_string()),
        kv(schema::KV_VOCAB_SIZE, header.teacher.vocab_size.to_string()),
        kv(
            schema::KV_LOGPROB_DTYPE,
            header.logprob_dtype.as_str().to_string(),
        ),
        kv(schema::KV_ID_DTYPE, header.id_dtype.as_str().to_string()),
        kv(schema::KV_SEED, header.seed.to_string()),
        kv(
            schema::KV_WEIGHTS_SHA256,
            header.teacher.weights_sha256.clone(),
        ),
        kv(
            schema::KV_TOKENIZER_SHA256,
            header.teacher.tokenizer_sha256.clone(),
        ),
        kv(schema::KV_HEADER, json),
    ])
}

/// Explicit Parquet writer settings (zstd, chunk statistics, data page v1, fixed row groups).
fn writer_properties(kv: Vec<KeyValue>) -> Result<WriterProperties> {
    let level = ZstdLevel::try_new(ZSTD_LEVEL)
        .map_err(|e| ShardError::InvalidHeader(format!("zstd level {ZSTD_LEVEL}: {e}")))?;
    Ok(WriterProperties::builder()
        .set_writer_version(WriterVersion::PARQUET_1_0)
        .set_compression(Compression::ZSTD(level))
        .set_statistics_enabled(EnabledStatistics::Chunk)
        .set_dictionary_enabled(true)
        .set_max_row_group_row_count(Some(ROWS_PER_ROW_GROUP))
        .set_key_value_metadata(Some(kv))
        .build())
}

impl ShardFileWriter {
    /// Start `dir/shard-{file_index:05}.parquet` (written as `<name>.tmp` until `finish`).
    pub fn create(dir: &Path, file_index: u32, header: &ShardSetHeader) -> Result<Self> {
        header.validate()?;
        if file_index >= header.num_files {
            return Err(ShardError::InvalidHeader(format!(
                "file_index {file_index} out of range 0..{} (num_files)",
                header.num_files
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| ShardError::io(dir, "create directory", e))?;
        let final_path = dir.join(shard_file_name(file_index));
        let tmp_path = tmp_path_for(&final_path);
        let schema = arrow_schema(header.logprob_dtype, header.id_dtype);
        let props = writer_properties(key_values(header, file_index, &final_path)?)?;
        let file = File::create(&tmp_path).map_err(|e| ShardError::io(&tmp_path, "create", e))?;
        let out = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
        let sink = match ArrowWriter::try_new(out, schema.clone(), Some(props)) {
            Ok(w) => w,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp_path);
                return Err(ShardError::parquet(&tmp_path, e));
            }
        };
        let seq_range = header.file_seq_range(file_index);
        Ok(ShardFileWriter {
            final_path,
            tmp_path,
            header: header.clone(),
            file_index,
            schema,
            sink: Some(sink),
            buf: Buffers::default(),
            next_seq_id: seq_range.start,
            seq_range,
            tokens: 0,
            finished: false,
        })
    }

    /// Final path of the file being written.
    pub fn path(&self) -> &Path {
        &self.final_path
    }

    /// Seq ids this file must hold, in push order.
    pub fn seq_range(&self) -> Range<u64> {
        self.seq_range.clone()
    }

    /// Rows pushed so far.
    pub fn rows(&self) -> u64 {
        self.next_seq_id - self.seq_range.start
    }

    /// Validate and append one record (must have the next seq id of this file).
    pub fn push(&mut self, rec: &SequenceRecord) -> Result<()> {
        let invalid = |msg: String| ShardError::InvalidRecord {
            path: self.final_path.clone(),
            seq_id: rec.seq_id,
            msg,
        };
        if self.sink.is_none() {
            return Err(invalid(
                "writer failed earlier and cannot accept more records".into(),
            ));
        }
        if self.next_seq_id >= self.seq_range.end {
            return Err(invalid(format!(
                "file {} already holds all {} of its rows (seq ids {}..{})",
                self.file_index,
                self.seq_range.end - self.seq_range.start,
                self.seq_range.start,
                self.seq_range.end
            )));
        }
        if rec.seq_id != self.next_seq_id {
            return Err(invalid(format!(
                "expected seq_id {} (file {} holds seq ids {}..{}, pushed in order)",
                self.next_seq_id, self.file_index, self.seq_range.start, self.seq_range.end
            )));
        }
        rec.validate(self.header.top_k, self.header.teacher.vocab_size)
            .map_err(invalid)?;
        let n = rec.topk_ids.len();
        if n > i32::MAX as usize / 2 || rec.tokens.len() > i32::MAX as usize / 2 {
            return Err(invalid(format!(
                "{n} top-K values in one sequence is too many for one row"
            )));
        }
        if !self.buf.seq_ids.is_empty() && self.buf.ids.len() + n > ROW_GROUP_MAX_VALUES {
            self.flush_row_group()?;
        }
        let b = &mut self.buf;
        b.seq_ids.push(rec.seq_id);
        b.prompt_lens.push(rec.prompt_len);
        b.token_lens.push(rec.tokens.len());
        b.tokens.extend_from_slice(&rec.tokens);
        b.topk_lens.push(n);
        b.ids.extend_from_slice(&rec.topk_ids);
        // Tiny positive log-probs (allowed by validate) are stored as 0.
        b.logprobs.extend(
            rec.topk_logprobs
                .iter()
                .map(|&v| if v > 0.0 { 0.0 } else { v }),
        );
        self.next_seq_id += 1;
        self.tokens += rec.tokens.len() as u64;
        if self.buf.seq_ids.len() >= ROWS_PER_ROW_GROUP {
            self.flush_row_group()?;
        }
        Ok(())
    }

    /// Write the buffered rows as one row group.
    fn flush_row_group(&mut self) -> Result<()> {
        if self.buf.seq_ids.is_empty() {
            return Ok(());
        }
        let b = std::mem::take(&mut self.buf);
        let path = self.tmp_path.clone();
        let batch =
            build_batch(&self.schema, &self.header, b).map_err(|source| ShardError::Arrow {
                path: path.clone(),
                source,
            })?;
        let sink = self
            .sink
            .as_mut()
            .ok_or_else(|| ShardError::bad_file(&path, "writer already closed"))?;
        let res = sink.write(&batch).and_then(|_| sink.flush());
        if let Err(e) = res {
            self.sink = None; // poisoned; Drop removes the .tmp
            return Err(ShardError::parquet(&path, e));
        }
        Ok(())
    }

    /// Close the Parquet file, fsync, and rename `.tmp` to the final name. Errors (and leaves no
    /// final file) unless exactly the file's rows were pushed.
    pub fn finish(mut self) -> Result<FileEntry> {
        let rows = self.rows();
        let want = self.seq_range.end - self.seq_range.start;
        if rows != want {
            return Err(ShardError::bad_file(
                &self.final_path,
                format!(
                    "finish with {rows} rows, but file {} must hold {want} (seq ids {}..{})",
                    self.file_index, self.seq_range.start, self.seq_range.end
                ),
            ));
        }
        self.flush_row_group()?;
        let tmp = self.tmp_path.clone();
        let sink = self
            .sink
            .take()
            .ok_or_else(|| ShardError::bad_file(&tmp, "writer already closed"))?;
        let hashing = sink
            .into_inner()
            .map_err(|e| ShardError::parquet(&tmp, e))?;
        let (bufw, sha256, bytes) = hashing.finish();
        let file = bufw
            .into_inner()
            .map_err(|e| ShardError::io(&tmp, "flush", e.into_error()))?;
        file.sync_all()
            .map_err(|e| ShardError::io(&tmp, "fsync", e))?;
        let on_disk = file
            .metadata()
            .map_err(|e| ShardError::io(&tmp, "stat", e))?
            .len();
        drop(file);
        if on_disk != bytes {
            return Err(ShardError::bad_file(
                &tmp,
                format!("{on_disk} bytes on disk after close, but {bytes} bytes were written"),
            ));
        }
        rename_durable(&tmp, &self.final_path)?;
        self.finished = true;
        Ok(FileEntry {
            name: shard_file_name(self.file_index),
            file_index: self.file_index,
            first_seq_id: self.seq_range.start,
            rows,
            tokens: self.tokens,
            bytes,
            sha256,
        })
    }
}

impl Drop for ShardFileWriter {
    fn drop(&mut self) {
        if !self.finished {
            self.sink = None; // close the handle first
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

fn offsets(lens: &[usize]) -> Result<OffsetBuffer<i32>, arrow_schema::ArrowError> {
    OffsetBuffer::<i32>::try_from_lengths(lens.iter().copied())
        .map_err(|e| arrow_schema::ArrowError::InvalidArgumentError(format!("list offsets: {e}")))
}

fn list(item: ArrayRef, lens: &[usize]) -> Result<ArrayRef, arrow_schema::ArrowError> {
    let field = element_field(item.data_type().clone());
    Ok(Arc::new(ListArray::try_new(
        field,
        offsets(lens)?,
        item,
        None,
    )?))
}

/// Build one record batch from buffered rows, converting ids / logprobs to the stored dtypes.
fn build_batch(
    schema: &SchemaRef,
    header: &ShardSetHeader,
    b: Buffers,
) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let ids: ArrayRef = match header.id_dtype {
        // ids < vocab_size <= 65536 was validated, so the cast is lossless.
        IdDtype::U16 => Arc::new(PrimitiveArray::<UInt16Type>::from_iter_values(
            b.ids.iter().map(|&v| v as u16),
        )),
        IdDtype::U32 => Arc::new(PrimitiveArray::<UInt32Type>::from(b.ids)),
    };
    let lps: ArrayRef = match header.logprob_dtype {
        LogprobDtype::F16 => Arc::new(PrimitiveArray::<Float16Type>::from_iter_values(
            b.logprobs.iter().map(|&v| to_f16(v)),
        )),
        LogprobDtype::F32 => Arc::new(PrimitiveArray::<Float32Type>::from(b.logprobs)),
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(PrimitiveArray::<UInt64Type>::from(b.seq_ids)),
        Arc::new(PrimitiveArray::<UInt32Type>::from(b.prompt_lens)),
        list(
            Arc::new(PrimitiveArray::<UInt32Type>::from(b.tokens)),
            &b.token_lens,
        )?,
        list(ids, &b.topk_lens)?,
        list(lps, &b.topk_lens)?,
    ];
    RecordBatch::try_new(schema.clone(), columns)
}

/// Round to nearest f16; values below the f16 range (< -65504, p < e^-65504) clamp to -65504.
pub fn to_f16(v: f32) -> f16 {
    f16::from_f32(v.max(f16::MIN.to_f32()))
}
