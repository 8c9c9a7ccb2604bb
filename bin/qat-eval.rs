//! `qat-eval`: perplexity of a model directory (full precision or under a quantization scheme)
//! on a text corpus, or its zero-shot multiple-choice accuracy on lm-evaluation-harness tasks,
//! printed as one JSON object.

use anyhow::Context;
use clap::{Parser, ValueEnum};
use qat_cli::{main_with, Outcome};
use qat_eval::{Corpus, EvalModel, PplMode, Task};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(
    name = "qat-eval",
    version,
    about = "Perplexity on a text corpus, or zero-shot multiple-choice accuracy, of a teacher, fake-quantized or packed model (JSON on stdout)",
    after_help = "Examples:
  # TinyStories-style documents: each is BOS + text, truncated to 512 tokens
  qat-eval --model ../shared/data/models/stories260K \\
      --corpus ../shared/data/corpora/tinystories/TinyStories-valid.first800.txt --mode docs --seq-len 512

  # WikiText-2 convention: whole file, non-overlapping 512-token windows
  qat-eval --model MODEL --corpus ../shared/data/corpora/wikitext-2-raw/wiki.test.raw --mode stream

  # A long evaluation that can be interrupted (Ctrl-C, a kill) and resumed by the same command
  qat-eval --model MODEL --corpus FILE --checkpoint ppl.ckpt > ppl.json

  # A packed model (qat-pack output): its codes are dequantized, only activations and KV quantized
  qat-eval --model packed/w3g32 --corpus FILE

  # Zero-shot accuracy (lm-evaluation-harness prompts, acc and acc_norm), files from $QAT_DATA/eval
  qat-eval --model students/w4a8kv4 --task hellaswag,piqa,arc-easy,arc-challenge,boolq,winogrande
  qat-eval --model MODEL --task piqa --limit 100 --per-item piqa.jsonl --scheme W4A8KV4
  bunzip2 -k hellaswag_val_full.txt.bz2 && qat-eval --model MODEL --task hellaswag --task-file hellaswag_val_full.txt

The JSON field \"quantization\" says what ran: \"none\", \"fake_quant\" (a model dir under a scheme,
weights quantized on the fly) or \"packed\" (a dir with model.packed.safetensors)."
)]
struct Args {
    /// Model directory (Hugging Face layout), or a packed model directory (qat-pack output).
    /// Or a Hub id owner/name[@revision], resolved in the Hugging Face cache (fetched once).
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// UTF-8 text file to evaluate perplexity on.
    #[arg(
        long,
        short = 'c',
        required_unless_present = "task",
        conflicts_with = "task"
    )]
    corpus: Option<PathBuf>,
    /// Zero-shot task instead of perplexity: hellaswag, piqa, arc-easy, arc-challenge, boolq or
    /// winogrande (repeat the flag or separate with commas). Prompts, continuations and metrics
    /// are lm-evaluation-harness's; acc_norm only where the harness reports it.
    #[arg(long, value_delimiter = ',', value_parser = parse_task)]
    task: Vec<Task>,
    /// Directory of the task files [default: $QAT_DATA/eval, QAT_DATA defaulting to ../shared/data].
    #[arg(long, requires = "task")]
    eval_dir: Option<PathBuf>,
    /// The task's file instead of its default under --eval-dir (one --task only). PIQA and
    /// WinoGrande read their labels from NAME-labels.lst beside NAME.jsonl.
    #[arg(long, requires = "task")]
    task_file: Option<PathBuf>,
    /// Write every item's per-choice log-likelihoods, token counts and predictions to this file
    /// (JSON lines), to compare items by hand.
    #[arg(long, requires = "task")]
    per_item: Option<PathBuf>,
    /// docs: documents split at --delimiter; stream: the whole file in non-overlapping windows.
    #[arg(long, value_enum, default_value_t = ModeArg::Docs)]
    mode: ModeArg,
    /// Tokens per document (truncated) or per window, BOS included.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Document delimiter for --mode docs.
    #[arg(long, default_value = "<|endoftext|>")]
    delimiter: String,
    /// Write the scored token ids to this file (a JSON array of arrays, one per document or
    /// window, BOS first), e.g. to score the same tokens with another runtime
    /// (tests/foreign/llama_cpp_nll.py --ids FILE --score-ids).
    #[arg(long, conflicts_with = "task", value_name = "FILE")]
    ids_out: Option<PathBuf>,
    /// Evaluate only the first N documents (docs), windows (stream) or items (each --task).
    #[arg(long)]
    limit: Option<usize>,
    /// Save progress to this file after every batch: the running perplexity totals, or each
    /// task's scored requests. A run that finds the file (left by an interrupted run of the same
    /// evaluation: same sequences, weights, scheme, dtype, device and batch size) continues
    /// after its last saved batch, to the result an uninterrupted run gives; another
    /// evaluation's file is refused. Removed once the result is printed.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Sequences (documents, windows or task choices) per forward pass.
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
    /// Time each phase of every batch after the first (batch to device, forward, logits and
    /// NLL, checkpoint), synchronizing the device around each: the summary's `profile` and a
    /// line on stderr. Slows the run a little; measure speed without it. Perplexity only.
    #[arg(long, conflicts_with = "task")]
    profile: bool,
    /// No progress bar.
    #[arg(long, short = 'q')]
    quiet: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    Docs,
    Stream,
}

fn parse_task(s: &str) -> Result<Task, String> {
    Task::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = Task::ALL.iter().map(|t| t.name()).collect();
        format!("unknown task {s:?} (one of {})", names.join(", "))
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    main_with("qat-eval", || {
        let started = Instant::now();
        let device = qat_model::parse_device(&args.device).map_err(anyhow::Error::msg)?;
        let src = qat_model::resolve_model(&args.model)?;
        let dtype = qat_model::parse_dtype(&args.dtype).map_err(anyhow::Error::msg)?;
        let mut m = qat_eval::load_eval_model(&src.dir, args.scheme.as_deref(), &device)?;
        // Quantize (and cast) the fixed weights once instead of in every forward pass.
        m.model.set_compute_dtype(dtype);
        m.model.freeze_weights()?;
        let bos = m
            .config
            .bos_token_id
            .or_else(|| m.tokenizer.token_to_id("<s>"));
        let mut summary = match &args.corpus {
            Some(corpus) => perplexity(&args, &m, bos, corpus, started)?,
            None => zero_shot(&args, &m, bos)?,
        };
        let fields = serde_json::json!({
            "dtype": qat_model::dtype_name(dtype),
            "device": qat_model::device_name(&device),
            "quantization": m.quantization,
            "scheme": m.scheme.to_string(),
            "scheme_json": serde_json::from_str::<serde_json::Value>(&m.scheme.to_json_pretty())?,
            "model": args.model.display().to_string(),
            "model_hub": src.hub,
            "weights_sha256": m.weights_sha256,
            "tool": concat!("qat-eval ", env!("CARGO_PKG_VERSION")),
            "seconds": started.elapsed().as_secs_f64(),
        });
        if let (Some(out), serde_json::Value::Object(add)) = (summary.as_object_mut(), fields) {
            out.extend(add);
        }
        println!("{summary}");
        // The result is out: the checkpoint has served.
        if let Some(path) = &args.checkpoint {
            qat_eval::checkpoint::remove(path)?;
        }
        Ok(Outcome::Ok)
    })
}

/// Everything besides the data that changes the scores, for a checkpoint's key.
fn checkpoint_settings(args: &Args, m: &EvalModel) -> serde_json::Value {
    serde_json::json!({
        "tool": concat!("qat-eval ", env!("CARGO_PKG_VERSION")),
        "weights_sha256": m.weights_sha256,
        "quantization": m.quantization,
        "scheme": m.scheme.to_json_pretty(),
        "dtype": qat_model::dtype_name(m.model.dtype()),
        "device": qat_model::device_name(m.model.device()),
        "batch_size": args.batch_size,
        "max_len": m.config.max_position_embeddings,
    })
}

fn perplexity(
    args: &Args,
    m: &EvalModel,
    bos: Option<u32>,
    corpus: &Path,
    started: Instant,
) -> anyhow::Result<serde_json::Value> {
    let corpus = Corpus::read(corpus)?;
    let mode = match args.mode {
        ModeArg::Docs => PplMode::Docs,
        ModeArg::Stream => PplMode::Stream,
    };
    let seqs = qat_eval::tokenize(
        &corpus,
        &m.tokenizer,
        bos,
        mode,
        args.seq_len,
        &args.delimiter,
        args.limit,
    )?;
    if let Some(path) = &args.ids_out {
        qat_shards::fsutil::write_atomic(path, serde_json::to_string(&seqs)?.as_bytes())
            .with_context(|| format!("writing --ids-out {}", path.display()))?;
    }
    let checkpoint = args
        .checkpoint
        .as_deref()
        .map(|path| qat_eval::NllCheckpoint::new(path, &seqs, &checkpoint_settings(args, m)));
    let profile =
        qat_model::StepProfile::new_if(args.profile, m.model.device(), &qat_eval::PROFILE_PHASES);
    let run = qat_eval::nll(
        &m.model,
        &seqs,
        args.batch_size,
        !args.quiet,
        checkpoint.as_ref(),
        &profile,
    )?;
    let (totals, resumed) = (run.totals, run.resumed.unwrap_or_default());
    let mut summary = serde_json::json!({
        "ppl": totals.mean().exp(),
        "nll": totals.mean(),
        "tokens": totals.tokens,
        "sequences": totals.sequences,
        "mode": mode,
        "seq_len": args.seq_len,
        "corpus": corpus.path.display().to_string(),
        "corpus_sha256": corpus.sha256,
        // This run's tokens: a resumed run did not evaluate the checkpoint's.
        "tokens_per_s": (totals.tokens - resumed.tokens) as f64 / started.elapsed().as_secs_f64(),
        "resumed_sequences": resumed.sequences,
    });
    if let Some(p) = profile.summary() {
        eprintln!("qat-eval: {}", p.line("batches"));
        summary["profile"] = serde_json::to_value(p)?;
    }
    Ok(summary)
}

fn zero_shot(args: &Args, m: &EvalModel, bos: Option<u32>) -> anyhow::Result<serde_json::Value> {
    if args.task_file.is_some() && args.task.len() != 1 {
        anyhow::bail!(
            "--task-file needs exactly one --task, got {}",
            args.task.len()
        );
    }
    let eval_dir = args.eval_dir.clone().unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("QAT_DATA").unwrap_or_else(|| "../shared/data".into()))
            .join("eval")
    });
    // Read and check every task file before the first forward pass.
    let data = args
        .task
        .iter()
        .map(|&t| {
            t.load(
                &args
                    .task_file
                    .clone()
                    .unwrap_or_else(|| eval_dir.join(t.default_file())),
                args.limit,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Per-item lines, written atomically at the end (nothing is left behind on an error); a
    // missing directory is reported before the first forward pass.
    if let Some(path) = &args.per_item {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.is_dir() {
            anyhow::bail!(
                "{}: directory {} does not exist",
                path.display(),
                dir.display()
            );
        }
    }
    let checkpoint = match &args.checkpoint {
        Some(path) => Some(qat_eval::TaskCheckpoint::open(
            path,
            &checkpoint_settings(args, m),
        )?),
        None => None,
    };
    let mut per_item: Vec<u8> = Vec::new();
    let max_len = m.config.max_position_embeddings;
    let mut tasks = serde_json::Map::new();
    for d in &data {
        let (scores, details) = qat_eval::evaluate(
            &m.model,
            &m.tokenizer,
            bos,
            d,
            max_len,
            args.batch_size,
            !args.quiet,
            checkpoint.as_ref(),
        )?;
        if !args.quiet {
            let norm = scores
                .acc_norm
                .map(|a| format!(" acc_norm {a:.4}"))
                .unwrap_or_default();
            eprintln!(
                "qat-eval: {}: acc {:.4}{norm} ({} items, {:.1} s)",
                d.task.name(),
                scores.acc,
                scores.items,
                scores.seconds
            );
        }
        if scores.truncated_continuations > 0 {
            eprintln!(
                "qat-eval: warning: {}: {} continuations are longer than the model's {max_len}-token context; only their last {max_len} tokens are scored (lm-evaluation-harness refuses them)",
                d.task.name(),
                scores.truncated_continuations
            );
        }
        if args.per_item.is_some() {
            for item in &details {
                serde_json::to_writer(&mut per_item, item)?;
                per_item.push(b'\n');
            }
        }
        tasks.insert(d.task.name().to_string(), serde_json::to_value(&scores)?);
    }
    if let Some(path) = &args.per_item {
        qat_shards::fsutil::write_atomic(path, &per_item)?;
    }
    Ok(
        serde_json::json!({ "tasks": tasks, "limit": args.limit, "batch_size": args.batch_size, "max_len": max_len }),
    )
}
