//! `qat-pack`: a trained student (model dir + quant_scheme.json) in, the real low-bit model out:
//! integer codes densely bit-packed with f16 scales in one safetensors file (formats/packed.md).

use anyhow::Context;
use clap::Parser;
use qat_cli::{main_with, Outcome};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(
    name = "qat-pack",
    version,
    about = "Bit-pack a quantized student into a packed model directory (formats/packed.md); JSON summary on stdout",
    after_help = "Examples:
  # Pack a QAT student (its quant_scheme.json says how), then evaluate the packed model
  qat-pack --model students/w3g32 --out packed/w3g32
  qat-eval --model packed/w3g32 --corpus ../shared/data/corpora/tinystories/TinyStories-valid.first800.txt

  # Round-to-nearest baseline: any model dir with a scheme file copied in is a student
  cp -r ../shared/data/models/stories260K rtn && cp pipelines/schemes/stories260K/W3G32.json rtn/quant_scheme.json
  qat-pack -m rtn -o packed/rtn-w3g32

Each quantized linear layer (per layer, after the scheme's overrides) is stored as .qweight (codes,
LSB-first bit stream per row, rows padded to whole bytes), .scales (f16) and, for asym_group,
.zeros (u8); everything else keeps its dtype. The summary reports bits per quantized weight,
measured and in theory (b + 16/g, nf3 b + 32/g, asym + 8/g). The output appears only when complete
(written to OUT.partial/, then renamed); an existing OUT is refused."
)]
struct Args {
    /// Student model directory: config.json, model.safetensors, tokenizer.json and
    /// quant_scheme.json (as qat-distill writes it).
    /// Or a Hub id owner/name[@revision], resolved in the Hugging Face cache (fetched once).
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// Output directory for the packed model (must not exist).
    #[arg(long, short = 'o')]
    out: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    main_with("qat-pack", || {
        let started = Instant::now();
        let model = qat_model::resolve_model(&args.model)?.dir;
        let summary = qat_pack::pack(&model, &args.out).with_context(|| {
            format!(
                "packing {} into {}",
                args.model.display(),
                args.out.display()
            )
        })?;
        let mut json = serde_json::to_value(&summary)?;
        json["seconds"] = started.elapsed().as_secs_f64().into();
        println!("{json}");
        Ok(Outcome::Ok)
    })
}
