//! `qat-distill`: quantization-aware training of a student from cached teacher shards
//! (LLM-QAT: fake-quantized weights, activations and KV cache; loss against teacher top-K;
//! BitDistiller's reverse-KL, JSD and confidence-aware KL losses).

use anyhow::Context;
use clap::{ArgGroup, Parser, ValueEnum};
use qat_cli::{main_with, Outcome};
use qat_train::{AdamWConfig, Budget, DistillConfig, LossKind, Schedule, TrainSettings};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "qat-distill",
    version,
    about = "Train a fake-quantized student against cached teacher top-K shards",
    group(ArgGroup::new("budget").args(["steps", "epochs", "max_tokens"])),
    after_help = "Examples:
  # LLM-QAT W4A8KV4 student of stories260K from data-free shards, 2 epochs
  qat-distill --model ../shared/data/models/stories260K --shards shards/s260k \\
      --scheme W4A8KV4 --out students/w4a8kv4 --epochs 2 --lr 5e-4

  # BitDistiller's confidence-aware KL; gamma (mean teacher top-1 probability) is measured
  # from the shards, printed, and recorded in provenance.json
  qat-distill --model ../shared/data/models/stories260K --shards shards/s260k \\
      --scheme W4 --out students/w4-cakld --loss cakld

  # The same with a fixed gamma (e.g. one measured on a larger shard set)
  qat-distill ... --loss cakld --cakld-gamma 0.7

  # Interrupted? The same command with --resume continues from the last checkpoint
  qat-distill ... --resume

  # Where the step time goes (on cuda: forward, backward, optimizer, ...), 20 steps
  qat-distill ... --device cuda --steps 20 --checkpoint-every 0 --profile

The student directory holds config.json, model.safetensors (full-precision master weights),
tokenizer.json, quant_scheme.json, train_log.jsonl and provenance.json."
)]
struct Args {
    /// Model directory that initializes the student (usually the teacher).
    /// Or a Hub id owner/name[@revision], resolved in the Hugging Face cache (fetched once).
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// Shard directory written by qat-sample from the same teacher.
    #[arg(long, short = 's')]
    shards: PathBuf,
    /// Output student directory (must not exist; written atomically at the end).
    #[arg(long, short = 'o')]
    out: PathBuf,
    /// Quantization scheme: a short name (W4A8KV4, W4A8KV8, W4, W4A8KV4H = KV scales per head, ...) or a JSON file (formats/scheme.md).
    #[arg(long, default_value = "W4A8KV4")]
    scheme: String,
    /// Distillation loss over the teacher's top-K + tail buckets (or the full vocabulary with
    /// --teacher), formats/distill-loss.md.
    #[arg(long, value_enum, default_value_t = LossArg::Fkl)]
    loss: LossArg,
    /// CAKLD's gamma in 0..=1 (weight of the reverse KL), instead of measuring it from the
    /// shards as the mean teacher top-1 probability over the trained positions.
    #[arg(long, value_name = "G")]
    cakld_gamma: Option<f64>,
    /// Sequences per micro-batch.
    #[arg(long, short = 'b', default_value_t = 16)]
    batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 5e-4)]
    lr: f64,
    /// Learning-rate schedule after warmup.
    #[arg(long, value_enum, default_value_t = ScheduleArg::Cosine)]
    schedule: ScheduleArg,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 10)]
    warmup_steps: u64,
    /// Cosine decays to lr * this ratio.
    #[arg(long, default_value_t = 0.0)]
    min_lr_ratio: f64,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Clip the global gradient norm to this value (0 = off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Train for this many optimizer steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Train for this many passes over the shards [default: 1].
    #[arg(long)]
    epochs: Option<f64>,
    /// Train until this many input tokens were seen.
    #[arg(long)]
    max_tokens: Option<u64>,
    /// Seed of the data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write a checkpoint every N optimizer steps (0 = never).
    #[arg(long, default_value_t = 50)]
    checkpoint_every: u64,
    /// Compute the teacher distribution online from this model (full vocabulary, exact) instead
    /// of reading the cached top-K from the shards (which then supply only the sequences).
    /// A local directory or a Hub id owner/name[@revision], as --model.
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// Before training, rebalance K and V channels from N calibration sequences of the shards
    /// (function-preserving in full precision; helps per-token KV quantization). 0 = off.
    #[arg(long, default_value_t = 0)]
    balance_kv: usize,
    /// Continue from the checkpoint in OUT.work/ (same flags required).
    #[arg(long)]
    resume: bool,
    /// Compute device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: f32, or bf16 / f16 (for GPUs) with f32 master weights and AdamW state.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Storage of the trained weights between steps: f32 (default), or bf16 / f16 to measure
    /// what rounding every update to that dtype costs (AdamW moments stay f32). README's "bf16
    /// compute, f32 master weights" gives the measurement that made f32 the default.
    #[arg(long, default_value = "f32", value_name = "DTYPE")]
    master_weights: String,
    /// Split every micro-batch into N parts that train concurrently, one thread each, their
    /// gradients summed (changes only floating-point rounding). 0 = one per thread
    /// (RAYON_NUM_THREADS, else the cores), at most one per sequence; 1 on CUDA. A resumed run
    /// keeps its checkpoint's value. Pass a number for results independent of the core count.
    #[arg(long, default_value_t = 0, value_name = "N")]
    data_parallel: usize,
    /// Time each phase of every step after the first (data, batch to device, teacher and
    /// student forward, loss, backward, accumulate, clip, optimizer, log and checkpoint),
    /// synchronizing the device around each: the summary's `profile` and a line on stderr.
    /// Slows the run a little; measure speed without it.
    #[arg(long)]
    profile: bool,
    /// No progress bar.
    #[arg(long, short = 'q')]
    quiet: bool,
    /// Testing: make the loss NaN at this step.
    #[arg(long, hide = true)]
    inject_nan_at: Option<u64>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LossArg {
    /// Forward KL(teacher || student), LLM-QAT's soft cross-entropy (minus the teacher entropy).
    Fkl,
    /// Reverse KL(student || teacher), mode seeking.
    Rkl,
    /// Jensen-Shannon divergence, m = (teacher + student) / 2.
    Jsd,
    /// BitDistiller's confidence-aware KL: gamma * rkl + (1 - gamma) * fkl.
    Cakld,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ScheduleArg {
    Constant,
    Cosine,
}

fn main() -> ExitCode {
    let args = Args::parse();
    main_with("qat-distill", || {
        let scheme = qat_quant::Scheme::from_arg(&args.scheme).context("--scheme")?;
        let budget = match (args.steps, args.epochs, args.max_tokens) {
            (Some(s), _, _) => Budget::Steps(s),
            (_, Some(e), _) => Budget::Epochs(e),
            (_, _, Some(t)) => Budget::Tokens(t),
            _ => Budget::Epochs(1.0),
        };
        let cfg = DistillConfig {
            model: qat_model::resolve_model(&args.model)?.dir,
            shards: args.shards.clone(),
            out: args.out.clone(),
            settings: TrainSettings {
                scheme,
                batch_size: args.batch_size,
                grad_accum: args.grad_accum,
                lr: args.lr,
                schedule: match args.schedule {
                    ScheduleArg::Constant => Schedule::Constant,
                    ScheduleArg::Cosine => Schedule::Cosine,
                },
                warmup_steps: args.warmup_steps,
                min_lr_ratio: args.min_lr_ratio,
                adam: AdamWConfig {
                    weight_decay: args.weight_decay,
                    ..AdamWConfig::default()
                },
                max_grad_norm: args.max_grad_norm,
                budget,
                seed: args.seed,
                loss: match args.loss {
                    LossArg::Fkl => LossKind::Fkl,
                    LossArg::Rkl => LossKind::Rkl,
                    LossArg::Jsd => LossKind::Jsd,
                    LossArg::Cakld => LossKind::Cakld,
                },
                cakld_gamma: args.cakld_gamma,
                online_teacher: args.teacher.is_some(),
                balance_kv: args.balance_kv,
                dtype: args.dtype.clone(),
                master_weights: args.master_weights.clone(),
                data_parallel: args.data_parallel,
            },
            checkpoint_every: args.checkpoint_every,
            resume: args.resume,
            teacher: args
                .teacher
                .as_deref()
                .map(qat_model::resolve_model)
                .transpose()?
                .map(|t| t.dir),
            device: args.device.clone(),
            progress: !args.quiet,
            profile: args.profile,
            inject_nan_at: args.inject_nan_at,
        };
        let summary =
            qat_train::run(&cfg).with_context(|| format!("training {}", args.out.display()))?;
        if let Some(p) = &summary.profile {
            eprintln!("qat-distill: {}", p.line("steps"));
        }
        println!("{}", serde_json::to_string(&summary)?);
        Ok(Outcome::Ok)
    })
}
