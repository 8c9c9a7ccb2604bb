//! `qat-eval`: perplexity of a model directory (full precision or under a quantization scheme)
//! on a text corpus, printed as one JSON object.

use clap::{Parser, ValueEnum};
use qat_cli::{main_with, Outcome};
use qat_eval::{Corpus, PplMode};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(
    name = "qat-eval",
    version,
    about = "Perplexity of a teacher, fake-quantized or packed model on a text corpus (JSON on stdout)",
    after_help = "Examples:
  # TinyStories-style documents: each is BOS + text, truncated to 512 tokens
  qat-eval --model ../shared/data/models/stories260K \\
      --corpus ../shared/data/corpora/tinystories/TinyStories-valid.first800.txt --mode docs --seq-len 512

  # WikiText-2 convention: whole file, non-overlapping 512-token windows
  qat-eval --model MODEL --corpus ../shared/data/corpora/wikitext-2-raw/wiki.test.raw --mode stream

  # A packed model (qat-pack output): its codes are dequantized, only activations and KV quantized
  qat-eval --model packed/w3g32 --corpus FILE

The JSON field \"quantization\" says what ran: \"none\", \"fake_quant\" (a model dir under a scheme,
weights quantized on the fly) or \"packed\" (a dir with model.packed.safetensors)."
)]
struct Args {
    /// Model directory (Hugging Face layout), or a packed model directory (qat-pack output).
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// UTF-8 text file to evaluate on.
    #[arg(long, short = 'c')]
    corpus: PathBuf,
    /// docs: documents split at --delimiter; stream: the whole file in non-overlapping windows.
    #[arg(long, value_enum, default_value_t = ModeArg::Docs)]
    mode: ModeArg,
    /// Tokens per document (truncated) or per window, BOS included.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Document delimiter for --mode docs.
    #[arg(long, default_value = "<|endoftext|>")]
    delimiter: String,
    /// Evaluate only the first N documents (docs) or windows (stream).
    #[arg(long)]
    limit: Option<usize>,
    /// Sequences per forward pass.
    #[arg(long, short = 'b', default_value_t = 16)]
    batch_size: usize,
    /// Quantization scheme to apply (short name like W4A8KV4, or a JSON file) [default: the
    /// model's quant_scheme.json if it has one, else full precision]. `FP` forces full precision.
    /// Not allowed for a packed model, which runs under the scheme it was packed with.
    #[arg(long)]
    scheme: Option<String>,
    /// Compute device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: f32, or bf16 / f16 (for GPUs). Weights load in f32, are fake-quantized
    /// in f32 under the scheme, then cast once.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// No progress bar.
    #[arg(long, short = 'q')]
    quiet: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    Docs,
    Stream,
}

fn main() -> ExitCode {
    let args = Args::parse();
    main_with("qat-eval", || {
        let started = Instant::now();
        let device = qat_model::parse_device(&args.device).map_err(anyhow::Error::msg)?;
        let dtype = qat_model::parse_dtype(&args.dtype).map_err(anyhow::Error::msg)?;
        let mut m = qat_eval::load_eval_model(&args.model, args.scheme.as_deref(), &device)?;
        // Quantize (and cast) the fixed weights once instead of in every forward pass.
        m.model.set_compute_dtype(dtype);
        m.model.freeze_weights()?;
        let corpus = Corpus::read(&args.corpus)?;
        let mode = match args.mode {
            ModeArg::Docs => PplMode::Docs,
            ModeArg::Stream => PplMode::Stream,
        };
        let bos = m.config.bos_token_id.or_else(|| m.tokenizer.token_to_id("<s>"));
        let seqs = qat_eval::tokenize(&corpus, &m.tokenizer, bos, mode, args.seq_len, &args.delimiter, args.limit)?;
        let totals = qat_eval::nll(&m.model, &seqs, args.batch_size, !args.quiet)?;
        let seconds = started.elapsed().as_secs_f64();
        let summary = serde_json::json!({
            "ppl": totals.mean().exp(),
            "nll": totals.mean(),
            "tokens": totals.tokens,
            "sequences": totals.sequences,
            "mode": mode,
            "seq_len": args.seq_len,
            "dtype": qat_model::dtype_name(dtype),
            "device": args.device,
            "quantization": m.quantization,
            "scheme": m.scheme.to_string(),
            "scheme_json": serde_json::from_str::<serde_json::Value>(&m.scheme.to_json_pretty())?,
            "model": args.model.display().to_string(),
            "weights_sha256": m.weights_sha256,
            "corpus": corpus.path.display().to_string(),
            "corpus_sha256": corpus.sha256,
            "tool": concat!("qat-eval ", env!("CARGO_PKG_VERSION")),
            "seconds": seconds,
            "tokens_per_s": totals.tokens as f64 / seconds,
        });
        println!("{summary}");
        Ok(Outcome::Ok)
    })
}
