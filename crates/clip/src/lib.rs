//! BitDistiller's asymmetric clipping search: before QAT, shrink each weight group's max and min
//! so that the quantized layer's partial outputs on calibration activations change least, and
//! clamp the weights to the chosen range.
//!
//! [`calib`] captures the inputs of every linear layer on tokens from a shard set, [`search`]
//! runs the 10 × 10 grid of (max, min) shrink ratios per group, [`run()`] ties them into the
//! `qat-clip` stage (model dir in, clipped model dir out, per-layer report).

pub mod calib;
pub mod error;
mod progress;
pub mod run;
pub mod search;

pub use error::{ClipError, Result};
pub use run::{run, ClipConfig, ClipSummary, LayerReport};
pub use search::{search_layer, search_layer_with, ErrorModel, LayerClip, SHRINK_RATIOS};
