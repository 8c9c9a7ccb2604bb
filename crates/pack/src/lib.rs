//! Real bit-packing of quantized students: the packed model directory of `formats/packed.md`.
//!
//! [`pack()`] turns a student (a model directory with a `quant_scheme.json`) into integer codes,
//! densely bit-packed ([`bits`]), with f16 scales and u8 zero points, in one safetensors file
//! ([`st`], [`meta`], [`layout`]); [`load_packed`] checks such a directory ([`unpack`]),
//! dequantizes it and builds a `qat_model::Llama` that runs the scheme's activation and KV
//! quantizers only. [`SizeReport`] measures bits per weight against theory. [`export_gguf`]
//! writes a student on llama.cpp's block grids as a GGUF file instead ([`gguf`], [`gguf_meta`], [`vocab`],
//! its unquantized tensors in F32, F16 or BF16: [`gguf_float`]; `formats/gguf.md`).

pub mod bits;
pub mod error;
pub mod gguf;
pub mod gguf_export;
pub mod gguf_float;
pub mod gguf_meta;
pub mod layout;
pub mod load;
pub mod meta;
pub mod pack;
pub mod size;
pub mod st;
pub mod unpack;
pub mod vocab;

pub use bits::{bytes_per_row, pack_rows, unpack_row};
pub use error::{OutOfRange, PackError, Result};
pub use gguf_export::{export_gguf, GgufOptions, GgufSummary};
pub use gguf_float::FloatType;
pub use layout::{LayerEntry, CODEBOOK_NF3, CODEBOOK_NF4, PACKED_FILE};
pub use load::{is_packed_dir, load_packed, without_weight_quant, PackedDir};
pub use meta::{FileProvenance, PackedMeta, FORMAT_NAME, FORMAT_VERSION};
pub use pack::{pack, PackSummary, TOOL};
pub use size::SizeReport;
