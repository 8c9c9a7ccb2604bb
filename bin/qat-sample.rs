//! `qat-sample`: the teacher generates training sequences and its top-K log-probabilities are
//! written as Parquet shards (formats/shards.md).

use anyhow::Context;
use clap::{Parser, ValueEnum};
use qat_cli::{main_with, Outcome};
use qat_sample::{SampleConfig, SamplingParams, StartMode};
use qat_shards::{LogprobDtype, Partition};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "qat-sample",
    version,
    about = "Generate teacher sequences and top-K log-probabilities as Parquet shards",
    after_help = "Examples:
  # LLM-QAT data-free shards: 4096 sequences of up to 256 tokens, top-64 log-probs
  qat-sample --model ../shared/data/models/stories260K --out shards/s260k -n 4096 --max-len 256 -K 64

  # BitDistiller-style: continue prompts from a JSON-lines file ({\"text\": ...} per line)
  qat-sample --model MODEL --prompts prompts.jsonl --out shards/p --max-len 512

  # Four machines, one partition each; copy the four directories together afterwards
  qat-sample --model MODEL --out shards/s -n 65536 --shard 2/4

A rerun with the same flags resumes: finished files that verify against the manifest are kept."
)]
struct Args {
    /// Teacher model directory (Hugging Face layout: config.json, *.safetensors, tokenizer.json).
    /// Or a Hub id owner/name[@revision], resolved in the Hugging Face cache (fetched once).
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// Output shard directory (created if missing; resumed if it holds this run's partition).
    #[arg(long, short = 'o')]
    out: PathBuf,
    /// Prompts file (JSON lines with a "text" field, or one prompt per line). Without it,
    /// sequences start from vocabulary tokens (LLM-QAT data-free generation).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Total number of sequences over all partitions [default: 4096, or one per prompt].
    #[arg(long, short = 'n')]
    num_sequences: Option<u64>,
    /// Maximum sequence length in tokens, prompt and BOS included.
    #[arg(long, default_value_t = 256)]
    max_len: usize,
    /// K: how many of the teacher's most probable next tokens to store per position (1..=vocab).
    #[arg(long = "top-k-logprobs", short = 'K', default_value_t = 64)]
    keep_top: u32,
    /// Sampling temperature (0 = greedy). Stored log-probabilities are always at temperature 1.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Sample only among the k most probable tokens (0 = no truncation).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample only among the most probable tokens whose mass reaches p (1 = no truncation).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Greedy prefix: the first N generated tokens are argmax, N drawn per sequence from
    /// MIN..=MAX [default: 3..=5 data-free (LLM-QAT), 0..=0 with --prompts].
    #[arg(long, value_name = "MIN..=MAX")]
    greedy: Option<String>,
    /// Master seed; each sequence's random stream is derived from (seed, sequence id).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sequences decoded together. Part of the shard identity: float rounding depends on it.
    #[arg(long, short = 'b', default_value_t = 64)]
    batch_size: usize,
    /// Sequences per Parquet file (the unit of resuming and of partitioning).
    #[arg(long, default_value_t = 256)]
    seqs_per_file: u32,
    /// Generate only partition I of N (files f with f mod N = I). Partitions written by
    /// different machines are merged by copying their files into one directory.
    #[arg(long, default_value = "0/1")]
    shard: Partition,
    /// Do not prepend BOS (the LLM-QAT reference code starts from the bare vocabulary token).
    #[arg(long)]
    no_bos: bool,
    /// Storage type of log-probabilities.
    #[arg(long, value_enum, default_value_t = DtypeArg::F16)]
    logprob_dtype: DtypeArg,
    /// Compute device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype of the teacher: f32, or bf16 / f16 (for GPUs; recorded in the shards).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Time each phase of every batch after the first (prefill, decode forward, logits to the
    /// host, log-softmax + top-K + sampling, KV cache row selection, waiting for the Parquet
    /// writer thread),
    /// synchronizing the device around each: the summary's `profile` and a line on stderr.
    /// Slows the run a little; measure speed without it.
    #[arg(long)]
    profile: bool,
    /// No progress bar.
    #[arg(long, short = 'q')]
    quiet: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DtypeArg {
    F16,
    F32,
}

fn parse_range(s: &str) -> anyhow::Result<(u32, u32)> {
    let (a, b) = s
        .split_once("..=")
        .or_else(|| s.split_once('-'))
        .unwrap_or((s, s));
    let lo = a
        .trim()
        .parse()
        .with_context(|| format!("--greedy {s:?}: expected MIN..=MAX, e.g. 3..=5"))?;
    let hi = b
        .trim()
        .parse()
        .with_context(|| format!("--greedy {s:?}: expected MIN..=MAX, e.g. 3..=5"))?;
    Ok((lo, hi))
}

fn main() -> ExitCode {
    let args = Args::parse();
    main_with("qat-sample", || {
        let (greedy_min, greedy_max) = match (&args.greedy, &args.prompts) {
            (Some(r), _) => parse_range(r)?,
            (None, None) => (3, 5),
            (None, Some(_)) => (0, 0),
        };
        let cfg = SampleConfig {
            model: qat_model::resolve_model(&args.model)?.dir,
            out: args.out.clone(),
            mode: args
                .prompts
                .clone()
                .map_or(StartMode::DataFree, StartMode::Prompts),
            num_sequences: args.num_sequences,
            max_len: args.max_len,
            keep_top: args.keep_top,
            sampling: SamplingParams {
                temperature: args.temperature,
                top_k: args.top_k,
                top_p: args.top_p,
            },
            greedy_min,
            greedy_max,
            seed: args.seed,
            batch_size: args.batch_size,
            seqs_per_file: args.seqs_per_file,
            partition: args.shard,
            bos: !args.no_bos,
            logprob_dtype: match args.logprob_dtype {
                DtypeArg::F16 => LogprobDtype::F16,
                DtypeArg::F32 => LogprobDtype::F32,
            },
            device: args.device.clone(),
            dtype: args.dtype.clone(),
            progress: !args.quiet,
            profile: args.profile,
        };
        let summary = qat_sample::run(&cfg)
            .with_context(|| format!("sampling into {}", args.out.display()))?;
        if let Some(p) = &summary.profile {
            eprintln!("qat-sample: {}", p.line("batches"));
        }
        println!("{}", serde_json::to_string(&summary)?);
        Ok(Outcome::Ok)
    })
}
