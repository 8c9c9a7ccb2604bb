//! `ShardFileReader`: opens one shard file using only its own metadata and streams its records.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float16Type, Float32Type, UInt16Type, UInt32Type, UInt64Type};
use arrow_array::{Array, ArrayRef, ListArray, RecordBatch};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::file::metadata::ParquetMetaData;

use crate::error::{Result, ShardError};
use crate::header::{ShardSetHeader, FORMAT_VERSION};
use crate::record::SequenceRecord;
use crate::schema::{self, arrow_schema, check_schema, ROWS_PER_ROW_GROUP};

/// One shard file, opened and checked against its own key-value metadata (`qat.header` etc.).
pub struct ShardFileReader {
    path: PathBuf,
    header: ShardSetHeader,
    file_index: u32,
    num_rows: u64,
    num_row_groups: usize,
    builder: ParquetRecordBatchReaderBuilder<File>,
}

impl std::fmt::Debug for ShardFileReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardFileReader")
            .field("path", &self.path)
            .field("file_index", &self.file_index)
            .field("num_rows", &self.num_rows)
            .finish()
    }
}

impl ShardFileReader {
    /// Open `path`: read the footer, check `qat.format_version`, parse `qat.header`, cross-check
    /// the scalar `qat.*` keys against it, check the schema and the row count.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| ShardError::io(path, "open", e))?;
        let file_len = file
            .metadata()
            .map_err(|e| ShardError::io(path, "stat", e))?
            .len();
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| ShardError::parquet(path, e))?;
        check_column_chunks(builder.metadata(), file_len)
            .map_err(|m| ShardError::bad_file(path, m))?;
        let meta = builder.metadata().file_metadata();
        let kv: HashMap<&str, &str> = meta
            .key_value_metadata()
            .map(|v| {
                v.iter()
                    .filter_map(|kv| kv.value.as_deref().map(|val| (kv.key.as_str(), val)))
                    .collect()
            })
            .unwrap_or_default();
        let get = |key: &str| -> Result<&str> {
            kv.get(key).copied().ok_or_else(|| {
                ShardError::bad_file(
                    path,
                    format!("missing key-value metadata {key:?}; not a qat shard file?"),
                )
            })
        };
        let version = get(schema::KV_FORMAT_VERSION)?;
        if version != FORMAT_VERSION.to_string() {
            return Err(ShardError::UnsupportedVersion {
                path: path.to_owned(),
                found: version.to_string(),
                expected: FORMAT_VERSION,
            });
        }
        let header: ShardSetHeader =
            serde_json::from_str(get(schema::KV_HEADER)?).map_err(|source| ShardError::Json {
                path: path.to_owned(),
                source,
            })?;
        header
            .validate()
            .map_err(|e| ShardError::bad_file(path, format!("{}: {e}", schema::KV_HEADER)))?;
        let t = &header.teacher;
        let expect: [(&str, String); 7] = [
            (schema::KV_TOP_K, header.top_k.to_string()),
            (schema::KV_VOCAB_SIZE, t.vocab_size.to_string()),
            (
                schema::KV_LOGPROB_DTYPE,
                header.logprob_dtype.as_str().to_string(),
            ),
            (schema::KV_ID_DTYPE, header.id_dtype.as_str().to_string()),
            (schema::KV_SEED, header.seed.to_string()),
            (schema::KV_WEIGHTS_SHA256, t.weights_sha256.clone()),
            (schema::KV_TOKENIZER_SHA256, t.tokenizer_sha256.clone()),
        ];
        for (key, want) in expect {
            let got = get(key)?;
            if got != want {
                return Err(ShardError::bad_file(
                    path,
                    format!(
                        "key-value {key} = {got:?} but {} says {want:?}",
                        schema::KV_HEADER
                    ),
                ));
            }
        }
        let fi = get(schema::KV_FILE_INDEX)?;
        let file_index: u32 = fi.parse().map_err(|_| {
            ShardError::bad_file(
                path,
                format!("{} = {fi:?} is not a u32", schema::KV_FILE_INDEX),
            )
        })?;
        if file_index >= header.num_files {
            return Err(ShardError::bad_file(
                path,
                format!(
                    "{} = {file_index} out of range 0..{} (num_files)",
                    schema::KV_FILE_INDEX,
                    header.num_files
                ),
            ));
        }
        let expected = arrow_schema(header.logprob_dtype, header.id_dtype);
        check_schema(builder.schema(), &expected).map_err(|m| ShardError::bad_file(path, m))?;
        let num_rows = u64::try_from(meta.num_rows()).unwrap_or(u64::MAX);
        let want_rows = header.file_rows(file_index);
        if num_rows != want_rows {
            return Err(ShardError::bad_file(
                path,
                format!("has {num_rows} rows, but file {file_index} must hold {want_rows}"),
            ));
        }
        let num_row_groups = builder.metadata().num_row_groups();
        Ok(ShardFileReader {
            path: path.to_owned(),
            header,
            file_index,
            num_rows,
            num_row_groups,
            builder,
        })
    }

    /// The header embedded in the file (`teacher.source` is `""` there).
    pub fn header(&self) -> &ShardSetHeader {
        &self.header
    }

    /// Global file index (`qat.file_index`).
    pub fn file_index(&self) -> u32 {
        self.file_index
    }

    /// Rows (sequences) in the file.
    pub fn num_rows(&self) -> u64 {
        self.num_rows
    }

    /// Parquet row groups in the file.
    pub fn num_row_groups(&self) -> usize {
        self.num_row_groups
    }

    /// Path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stream the records, decoding at most [`ROWS_PER_ROW_GROUP`] rows at a time.
    pub fn records(self) -> Result<FileRecords> {
        let range = self.header.file_seq_range(self.file_index);
        let reader = self
            .builder
            .with_batch_size(ROWS_PER_ROW_GROUP)
            .build()
            .map_err(|e| ShardError::parquet(&self.path, e))?;
        Ok(FileRecords {
            path: self.path,
            reader,
            top_k: self.header.top_k,
            vocab_size: self.header.teacher.vocab_size,
            next_seq_id: range.start,
            end_seq_id: range.end,
            tokens: 0,
            expected_tokens: None,
            pending: Vec::new().into_iter(),
            done: false,
        })
    }

    /// Read and validate every record of the file.
    pub fn read_all(self) -> Result<Vec<SequenceRecord>> {
        self.records()?.collect()
    }
}

/// Every column chunk's byte range must lie inside the file. The Parquet library panics on a
/// negative offset or size when it reads the chunk (found by fuzzing, issue 5), so a damaged
/// footer is refused here, before any chunk is read.
fn check_column_chunks(meta: &ParquetMetaData, file_len: u64) -> Result<(), String> {
    for (g, rg) in meta.row_groups().iter().enumerate() {
        for c in rg.columns() {
            let start = c.dictionary_page_offset().unwrap_or(c.data_page_offset());
            let len = c.compressed_size();
            let end = u64::try_from(start)
                .ok()
                .zip(u64::try_from(len).ok())
                .and_then(|(s, l)| s.checked_add(l));
            if end.is_none_or(|e| e > file_len) {
                return Err(format!(
                    "damaged footer: row group {g}, column {}: byte range {start} + {len} is not inside the file ({file_len} bytes)",
                    c.column_path()
                ));
            }
        }
    }
    Ok(())
}

/// Streaming iterator over the records of one file; yields at most one `Err` and then ends.
pub struct FileRecords {
    path: PathBuf,
    reader: ParquetRecordBatchReader,
    top_k: u32,
    vocab_size: u32,
    next_seq_id: u64,
    end_seq_id: u64,
    tokens: u64,
    expected_tokens: Option<u64>,
    pending: std::vec::IntoIter<SequenceRecord>,
    done: bool,
}

impl FileRecords {
    /// Also check at the end that the rows sum to `tokens` tokens (the manifest's `tokens`).
    pub fn expect_tokens(mut self, tokens: u64) -> Self {
        self.expected_tokens = Some(tokens);
        self
    }

    fn fail(&mut self, e: ShardError) -> Option<Result<SequenceRecord>> {
        self.done = true;
        self.pending = Vec::new().into_iter();
        Some(Err(e))
    }

    fn decode(&mut self, batch: &RecordBatch) -> Result<Vec<SequenceRecord>> {
        let cols = Columns::new(batch).map_err(|m| ShardError::bad_file(&self.path, m))?;
        let mut out = Vec::with_capacity(batch.num_rows());
        for r in 0..batch.num_rows() {
            let row = self.next_seq_id;
            let rec = cols.record(r);
            let bad = |m: String| {
                ShardError::bad_file(&self.path, format!("row with seq_id {}: {m}", rec.seq_id))
            };
            if row >= self.end_seq_id || rec.seq_id != row {
                return Err(bad(format!(
                    "expected seq_id {row} (rows must be consecutive, file ends before {})",
                    self.end_seq_id
                )));
            }
            rec.validate(self.top_k, self.vocab_size).map_err(bad)?;
            self.tokens += rec.tokens.len() as u64;
            self.next_seq_id += 1;
            out.push(rec);
        }
        Ok(out)
    }
}

impl Iterator for FileRecords {
    type Item = Result<SequenceRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(r) = self.pending.next() {
                return Some(Ok(r));
            }
            if self.done {
                return None;
            }
            match self.reader.next() {
                None => {
                    self.done = true;
                    if self.next_seq_id != self.end_seq_id {
                        let msg = format!(
                            "ended at seq_id {}, expected rows up to {}",
                            self.next_seq_id, self.end_seq_id
                        );
                        return self.fail(ShardError::bad_file(&self.path, msg));
                    }
                    if let Some(want) = self.expected_tokens.filter(|&t| t != self.tokens) {
                        let msg = format!("rows hold {} tokens, manifest says {want}", self.tokens);
                        return self.fail(ShardError::bad_file(&self.path, msg));
                    }
                    return None;
                }
                Some(Err(source)) => {
                    let path = self.path.clone();
                    return self.fail(ShardError::Arrow { path, source });
                }
                Some(Ok(batch)) => match self.decode(&batch) {
                    Ok(recs) => self.pending = recs.into_iter(),
                    Err(e) => return self.fail(e),
                },
            }
        }
    }
}

/// Typed views of one record batch's columns.
struct Columns<'a> {
    seq_id: &'a [u64],
    prompt_len: &'a [u32],
    tokens: ListView<'a, u32>,
    ids: IdView<'a>,
    lps: LpView<'a>,
}

struct ListView<'a, T> {
    offsets: &'a [i32],
    values: &'a [T],
}

enum IdView<'a> {
    U16(ListView<'a, u16>),
    U32(ListView<'a, u32>),
}

enum LpView<'a> {
    F16(ListView<'a, half::f16>),
    F32(ListView<'a, f32>),
}

impl<T> ListView<'_, T> {
    fn row(&self, r: usize) -> &[T] {
        &self.values[self.offsets[r] as usize..self.offsets[r + 1] as usize]
    }
}

fn no_nulls(name: &str, a: &dyn Array) -> Result<(), String> {
    match a.logical_null_count() {
        0 => Ok(()),
        n => Err(format!(
            "column {name:?} has {n} null values (nulls are not allowed)"
        )),
    }
}

fn list_of<'a>(col: &'a ArrayRef, name: &str) -> Result<&'a ListArray, String> {
    let l = col
        .as_list_opt::<i32>()
        .ok_or_else(|| format!("column {name:?} is not a list"))?;
    no_nulls(name, l)?;
    no_nulls(name, l.values().as_ref())?;
    Ok(l)
}

macro_rules! prim_list {
    ($col:expr, $name:expr, $ty:ty) => {{
        let l = list_of($col, $name)?;
        let v = l.values().as_primitive_opt::<$ty>().ok_or_else(|| {
            format!(
                "column {:?} has unexpected element type {}",
                $name,
                l.values().data_type()
            )
        })?;
        ListView {
            offsets: l.value_offsets(),
            values: v.values().as_ref(),
        }
    }};
}

impl<'a> Columns<'a> {
    fn new(b: &'a RecordBatch) -> Result<Self, String> {
        let col = |i: usize| b.column(i);
        let seq = col(0)
            .as_primitive_opt::<UInt64Type>()
            .ok_or("seq_id is not UInt64")?;
        let pl = col(1)
            .as_primitive_opt::<UInt32Type>()
            .ok_or("prompt_len is not UInt32")?;
        no_nulls(schema::COL_SEQ_ID, seq)?;
        no_nulls(schema::COL_PROMPT_LEN, pl)?;
        let tokens = prim_list!(col(2), schema::COL_TOKENS, UInt32Type);
        let ids = match col(3)
            .as_list_opt::<i32>()
            .map(|l| l.values().data_type().clone())
        {
            Some(arrow_schema::DataType::UInt16) => {
                IdView::U16(prim_list!(col(3), schema::COL_TOPK_IDS, UInt16Type))
            }
            _ => IdView::U32(prim_list!(col(3), schema::COL_TOPK_IDS, UInt32Type)),
        };
        let lps = match col(4)
            .as_list_opt::<i32>()
            .map(|l| l.values().data_type().clone())
        {
            Some(arrow_schema::DataType::Float16) => {
                LpView::F16(prim_list!(col(4), schema::COL_TOPK_LOGPROBS, Float16Type))
            }
            _ => LpView::F32(prim_list!(col(4), schema::COL_TOPK_LOGPROBS, Float32Type)),
        };
        Ok(Columns {
            seq_id: seq.values().as_ref(),
            prompt_len: pl.values().as_ref(),
            tokens,
            ids,
            lps,
        })
    }

    fn record(&self, r: usize) -> SequenceRecord {
        SequenceRecord {
            seq_id: self.seq_id[r],
            tokens: self.tokens.row(r).to_vec(),
            prompt_len: self.prompt_len[r],
            topk_ids: match &self.ids {
                IdView::U16(v) => v.row(r).iter().map(|&x| u32::from(x)).collect(),
                IdView::U32(v) => v.row(r).to_vec(),
            },
            topk_logprobs: match &self.lps {
                LpView::F16(v) => v.row(r).iter().map(|x| x.to_f32()).collect(),
                LpView::F32(v) => v.row(r).to_vec(),
            },
        }
    }
}
