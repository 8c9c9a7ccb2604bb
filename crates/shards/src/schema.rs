//! Arrow/Parquet schema of a shard file and the names of its key-value metadata entries.

use std::sync::Arc;

use arrow_schema::{DataType, Field, FieldRef, Schema, SchemaRef};

use crate::header::{IdDtype, LogprobDtype};

/// Column: global sequence id (UInt64).
pub const COL_SEQ_ID: &str = "seq_id";
/// Column: number of leading prompt tokens (UInt32).
pub const COL_PROMPT_LEN: &str = "prompt_len";
/// Column: the `L` tokens (`List<UInt32>`).
pub const COL_TOKENS: &str = "tokens";
/// Column: flattened `[(L-1)*K]` top-K ids (List<UInt16|UInt32>).
pub const COL_TOPK_IDS: &str = "topk_ids";
/// Column: flattened `[(L-1)*K]` top-K log-probabilities (List<Float16|Float32>).
pub const COL_TOPK_LOGPROBS: &str = "topk_logprobs";
/// Name of the element field of every list column.
pub const LIST_ELEMENT: &str = "element";

/// Key-value metadata: format version (decimal string, `"1"`).
pub const KV_FORMAT_VERSION: &str = "qat.format_version";
/// Key-value metadata: global file index (decimal).
pub const KV_FILE_INDEX: &str = "qat.file_index";
/// Key-value metadata: K (decimal).
pub const KV_TOP_K: &str = "qat.top_k";
/// Key-value metadata: vocabulary size (decimal).
pub const KV_VOCAB_SIZE: &str = "qat.vocab_size";
/// Key-value metadata: `"f16"` or `"f32"`.
pub const KV_LOGPROB_DTYPE: &str = "qat.logprob_dtype";
/// Key-value metadata: `"u16"` or `"u32"`.
pub const KV_ID_DTYPE: &str = "qat.id_dtype";
/// Key-value metadata: generation seed (decimal).
pub const KV_SEED: &str = "qat.seed";
/// Key-value metadata: teacher weights sha256 (hex).
pub const KV_WEIGHTS_SHA256: &str = "qat.teacher.weights_sha256";
/// Key-value metadata: teacher tokenizer sha256 (hex).
pub const KV_TOKENIZER_SHA256: &str = "qat.teacher.tokenizer_sha256";
/// Key-value metadata: the full `ShardSetHeader` as JSON (with `teacher.source` = `""`).
pub const KV_HEADER: &str = "qat.header";

/// Number of sequences per Parquet row group (a writer choice, not part of the format; readers
/// must not rely on it). A row group is also closed early once it holds
/// [`ROW_GROUP_MAX_VALUES`] top-K values, bounding writer and reader memory.
pub const ROWS_PER_ROW_GROUP: usize = 64;
/// Upper bound on buffered top-K values (per column) before a row group is closed.
pub const ROW_GROUP_MAX_VALUES: usize = 16 << 20;

/// Arrow type of the id list elements.
pub fn id_type(id_dtype: IdDtype) -> DataType {
    match id_dtype {
        IdDtype::U16 => DataType::UInt16,
        IdDtype::U32 => DataType::UInt32,
    }
}

/// Arrow type of the log-probability list elements.
pub fn logprob_type(dtype: LogprobDtype) -> DataType {
    match dtype {
        LogprobDtype::F16 => DataType::Float16,
        LogprobDtype::F32 => DataType::Float32,
    }
}

/// Non-null element field of a list column.
pub fn element_field(data_type: DataType) -> FieldRef {
    Arc::new(Field::new(LIST_ELEMENT, data_type, false))
}

/// The Arrow schema of a shard file (all columns and list elements non-null).
pub fn arrow_schema(logprob_dtype: LogprobDtype, id_dtype: IdDtype) -> SchemaRef {
    let list = |t: DataType| DataType::List(element_field(t));
    Arc::new(Schema::new(vec![
        Field::new(COL_SEQ_ID, DataType::UInt64, false),
        Field::new(COL_PROMPT_LEN, DataType::UInt32, false),
        Field::new(COL_TOKENS, list(DataType::UInt32), false),
        Field::new(COL_TOPK_IDS, list(id_type(id_dtype)), false),
        Field::new(COL_TOPK_LOGPROBS, list(logprob_type(logprob_dtype)), false),
    ]))
}

/// Compare a file's Arrow schema with the expected one on names and types (ignoring metadata and
/// nullability, so files written by other Parquet writers with nullable columns are accepted);
/// returns a description of the first difference.
pub fn check_schema(actual: &Schema, expected: &Schema) -> Result<(), String> {
    if actual.fields().len() != expected.fields().len() {
        return Err(format!(
            "schema has {} columns {:?}, expected {} {:?}",
            actual.fields().len(),
            actual.fields().iter().map(|f| f.name()).collect::<Vec<_>>(),
            expected.fields().len(),
            expected
                .fields()
                .iter()
                .map(|f| f.name())
                .collect::<Vec<_>>()
        ));
    }
    for (a, e) in actual.fields().iter().zip(expected.fields()) {
        if a.name() != e.name() || !same_type(a.data_type(), e.data_type()) {
            return Err(format!(
                "column {:?}: {} , expected column {:?}: {}",
                a.name(),
                a.data_type(),
                e.name(),
                e.data_type()
            ));
        }
    }
    Ok(())
}

fn same_type(a: &DataType, e: &DataType) -> bool {
    match (a, e) {
        (DataType::List(fa), DataType::List(fe)) => fa.data_type() == fe.data_type(),
        _ => a == e,
    }
}
