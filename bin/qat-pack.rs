//! `qat-pack`: a trained student (model dir + quant_scheme.json) in, the real low-bit model out:
//! integer codes densely bit-packed with f16 scales in one safetensors file (formats/packed.md),
//! or, with `--format gguf`, one GGUF file that llama.cpp loads unchanged (formats/gguf.md).

use anyhow::Context;
use clap::{Parser, ValueEnum};
use qat_cli::{main_with, Outcome};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(
    name = "qat-pack",
    version,
    about = "Bit-pack a quantized student into a packed model directory (formats/packed.md) or a GGUF file for llama.cpp (formats/gguf.md); JSON summary on stdout",
    after_help = "Examples:
  # Pack a QAT student (its quant_scheme.json says how), then evaluate the packed model
  qat-pack --model students/w3g32 --out packed/w3g32
  qat-eval --model packed/w3g32 --corpus ../shared/data/corpora/tinystories/TinyStories-valid.first800.txt

  # Round-to-nearest baseline: any model dir with a scheme file copied in is a student
  cp -r ../shared/data/models/stories260K rtn && cp pipelines/schemes/stories260K/W3G32.json rtn/quant_scheme.json
  qat-pack -m rtn -o packed/rtn-w3g32

  # The LLM-QAT W4 student of `make pipeline` for llama.cpp (per-channel scales in Q4_0 blocks)
  qat-pack --format gguf -m out/students/s260k-n4096-L256-K512-e1-lr2e-4-bal64-clipqk/W4 -o w4.gguf

  # The same with the embeddings in F16 (the commonest choice of llama.cpp's conversions)
  qat-pack --format gguf --gguf-float f16 -m out/students/s260k-n4096-L256-K512-e1-lr2e-4-bal64-clipqk/W4 -o w4-f16.gguf

  # A student trained on llama.cpp's Q4_0 grid, exported losslessly as GGUF
  qat-distill -m ../shared/data/models/stories260K -s shards/s260k --scheme pipelines/schemes/stories260K/Q4_0.json -o students/q4_0
  qat-pack --format gguf -m students/q4_0 -o q4_0.gguf

Each quantized linear layer (per layer, after the scheme's overrides) is stored as .qweight (codes,
LSB-first bit stream per row, rows padded to whole bytes), .scales (f16) and, for asym_group,
.zeros (u8); everything else keeps its dtype. The summary reports bits per quantized weight,
measured and in theory (b + 16/g, nf3 b + 32/g, asym + 8/g). The output appears only when complete
(written to OUT.partial/, then renamed); an existing OUT is refused.

--format gguf writes one GGUF v3 file (written to OUT.tmp, then renamed): q4_0 / q4_1 / q8_0 layers
as those ggml types, sym_per_channel layers (LLM-QAT's W2..W8) as Q4_0 (up to 4 bits) or Q8_0
blocks that all carry the row's scale (llama.cpp dequantizes both to the student's fake-quantized
weights bit for bit; a per-channel layer whose inputs are not a multiple of 32 is stored as F32 of
those values, with a warning), unquantized layers and embeddings as F32 (or --gguf-float f16 /
bf16), norms as F32, q/k rows permuted
to llama.cpp's RoPE order, the vocabulary from tokenizer.model (else tokenizer.json). Refused
(exit 2, naming the layer): any other weight format, and activation or KV quantization unless
--drop-act-kv."
)]
struct Args {
    /// Student model directory: config.json, model.safetensors, tokenizer.json and
    /// quant_scheme.json (as qat-distill writes it).
    /// Or a Hub id owner/name[@revision], resolved in the Hugging Face cache (fetched once).
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// Output: the packed model directory, or with --format gguf the .gguf file (must not exist).
    #[arg(long, short = 'o')]
    out: PathBuf,
    /// Output format: `packed` (qat's packed safetensors directory) or `gguf` (llama.cpp).
    #[arg(long, value_enum, default_value_t = Format::Packed)]
    format: Format,
    /// GGUF only: export a scheme with activation or KV quantization anyway (llama.cpp runs the
    /// weights without them; the dropped quantizers are listed in the summary and metadata).
    #[arg(long)]
    drop_act_kv: bool,
    /// GGUF only: the type of the embeddings, the output layer and the linear layers the scheme
    /// leaves unquantized: `f32` (exact), `f16` or `bf16` (half the bytes, rounded to nearest
    /// even; the summary lists each tensor rounding changed). Norms stay F32.
    #[arg(long, value_enum, default_value_t = GgufFloat::F32)]
    gguf_float: GgufFloat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum GgufFloat {
    F32,
    F16,
    Bf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Packed,
    Gguf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    main_with("qat-pack", || {
        let started = Instant::now();
        let model = qat_model::resolve_model(&args.model)?.dir;
        let context = || {
            format!(
                "packing {} into {}",
                args.model.display(),
                args.out.display()
            )
        };
        if args.drop_act_kv && args.format != Format::Gguf {
            anyhow::bail!("--drop-act-kv applies to --format gguf only");
        }
        if args.gguf_float != GgufFloat::F32 && args.format != Format::Gguf {
            anyhow::bail!("--gguf-float applies to --format gguf only");
        }
        let mut json = match args.format {
            Format::Packed => {
                serde_json::to_value(qat_pack::pack(&model, &args.out).with_context(context)?)?
            }
            Format::Gguf => {
                let opts = qat_pack::GgufOptions {
                    drop_act_kv: args.drop_act_kv,
                    float_type: match args.gguf_float {
                        GgufFloat::F32 => qat_pack::FloatType::F32,
                        GgufFloat::F16 => qat_pack::FloatType::F16,
                        GgufFloat::Bf16 => qat_pack::FloatType::Bf16,
                    },
                };
                let s = qat_pack::export_gguf(&model, &args.out, opts).with_context(context)?;
                for d in &s.dropped {
                    eprintln!("qat-pack: warning: llama.cpp will not quantize {d}");
                }
                for d in &s.dequantized {
                    eprintln!("qat-pack: warning: {d}");
                }
                if s.remove_extra_whitespaces {
                    eprintln!(
                        "qat-pack: warning: the tokenizer collapses runs of spaces \
                         (remove_extra_whitespaces), llama.cpp's llama tokenizer does not: \
                         collapse them in text given to llama.cpp to get the same tokens"
                    );
                }
                serde_json::to_value(&s)?
            }
        };
        json["seconds"] = started.elapsed().as_secs_f64().into();
        println!("{json}");
        Ok(Outcome::Ok)
    })
}
