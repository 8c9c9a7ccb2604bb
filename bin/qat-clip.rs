//! `qat-clip`: BitDistiller's asymmetric clipping search, a stage of its own — a model dir in, a
//! model dir with per-group clamped weights out (the initialization of a sub-4-bit student).

use anyhow::Context;
use clap::Parser;
use qat_cli::{main_with, Outcome};
use qat_clip::ClipConfig;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "qat-clip",
    version,
    about = "Search per-group weight clipping ranges for a quantization scheme (BitDistiller) and write the clamped model",
    after_help = "Examples:
  # 2-bit asymmetric, groups of 32: calibrate on 64 sequences from the teacher's shards
  qat-clip --model ../shared/data/models/stories260K --shards shards/s260k \\
      --scheme W2g32 --out clipped/w2g32

  # NF3 with q_proj/k_proj included, more calibration data
  qat-clip -m MODEL -s SHARDS --scheme NF3g32 --include-qk --calib-sequences 128 --out clipped/nf3

  # On a GPU (the model and the search's matmuls); rerun the same command after an interruption
  qat-clip -m MODEL -s SHARDS --scheme W3g128 --device cuda --out clipped/w3g128

  # Then train from the clipped model with the same scheme
  qat-distill --model clipped/w2g32 --shards shards/s260k --scheme W2g32 --loss cakld --out students/w2g32

For every linear layer and group, the 10 x 10 shrink ratios 1.0, 0.95, ..., 0.55 of the group's max
and min are tried; the pair that least changes the group's partial outputs x.w (mean squared error
over the calibration tokens) is kept and the weights are clamped to it. A JSON report (MSE before and
after per layer) goes to stdout and into the output's provenance.json. Each finished block is saved in
OUT.work/; the same command after an interruption continues from there, to the same output."
)]
struct Args {
    /// Model directory to clip (usually the teacher).
    /// Or a Hub id owner/name[@revision], resolved in the Hugging Face cache (fetched once).
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// Shard directory from the same teacher; its first sequences are the calibration data.
    #[arg(long, short = 's')]
    shards: PathBuf,
    /// Output model directory (replaced if it exists; written atomically).
    #[arg(long, short = 'o')]
    out: PathBuf,
    /// Quantization scheme whose weight quantizer is searched for: short name (W2g32, W3g32,
    /// NF3g32, ...) or a JSON file (formats/scheme.md). It is saved with the output.
    #[arg(long)]
    scheme: String,
    /// Calibration sequences (the first N of the shard set).
    #[arg(long, default_value_t = 64)]
    calib_sequences: usize,
    /// Tokens kept from each calibration sequence.
    #[arg(long, default_value_t = 256)]
    calib_len: usize,
    /// Layer-input rows per layer (strided subsample of all calibration positions).
    #[arg(long, default_value_t = 512)]
    calib_tokens: usize,
    /// Also clip q_proj and k_proj (BitDistiller skips them).
    #[arg(long)]
    include_qk: bool,
    /// Device the model and the clipping search run on: cpu, cuda or cuda:N (only the Gram
    /// matrices of the calibration inputs are built on the CPU, once per layer).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// No progress bar.
    #[arg(long, short = 'q')]
    quiet: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    main_with("qat-clip", || {
        let scheme = qat_quant::Scheme::from_arg(&args.scheme).context("--scheme")?;
        let cfg = ClipConfig {
            model: qat_model::resolve_model(&args.model)?.dir,
            shards: args.shards.clone(),
            out: args.out.clone(),
            scheme,
            calib_sequences: args.calib_sequences,
            calib_len: args.calib_len,
            calib_tokens: args.calib_tokens,
            include_qk: args.include_qk,
            device: args.device.clone(),
            quiet: args.quiet,
        };
        let summary = qat_clip::run(&cfg).with_context(|| {
            format!(
                "clipping {} into {}",
                args.model.display(),
                args.out.display()
            )
        })?;
        println!("{}", serde_json::to_string(&summary)?);
        Ok(Outcome::Ok)
    })
}
