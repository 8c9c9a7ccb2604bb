//! `qat-report`: PNG curves of qat-distill training logs (several runs on one chart) and
//! Markdown tables of qat-eval JSONs.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use qat_cli::{main_with, Outcome};
use qat_report::{EvalRecord, Metric, PlotConfig, XAxis};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "qat-report",
    version,
    about = "Loss curves (PNG) from qat-distill logs and Markdown tables from qat-eval JSONs",
    after_help = "Examples:
  # Forward KL against CAKLD, smoothed over 8 steps
  qat-report plot out/students/*-fkl-clip-e1-*/W3G32/train_log.jsonl \\
      out/students/*-cakld-clip-e1-*/W3G32/train_log.jsonl --label FKL --label CAKLD --smooth 8 -o loss.png

  # Learning rate against training tokens
  qat-report plot students/w4/train_log.jsonl --metric lr --x tokens -o lr.png

  # Perplexity table, with the ratio to the full-precision model
  qat-report table out/eval/stories260K/rtn-W3G32.json out/eval/stories260K/bd-*-W3G32.json \\
      --fp out/eval/stories260K/fp.json"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Draw one chart of one metric of several training logs (train_log.jsonl), one line each.
    Plot(PlotArgs),
    /// Print a Markdown table comparing eval JSONs (qat-eval summaries, zero-shot results).
    Table(TableArgs),
}

#[derive(clap::Args, Debug)]
struct PlotArgs {
    /// Training logs (train_log.jsonl of a student, or OUT.work/log.jsonl of a running job).
    #[arg(required = true)]
    logs: Vec<PathBuf>,
    /// Output PNG (written to a temporary file, then renamed).
    #[arg(long, short = 'o')]
    out: PathBuf,
    /// Legend name of each log, in order [default: the log's directory name, plus what differs
    /// in the recipe directory names when two are equal].
    #[arg(long)]
    label: Vec<String>,
    /// What to plot on the y axis.
    #[arg(long, value_enum, default_value_t = MetricArg::Loss)]
    metric: MetricArg,
    /// Trailing moving average over N logged steps (1 = raw values).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000), value_name = "N")]
    smooth: u32,
    /// What to plot on the x axis.
    #[arg(long, value_enum, default_value_t = XArg::Step)]
    x: XArg,
    /// Logarithmic y axis (values <= 0 are left out).
    #[arg(long)]
    log_y: bool,
    /// Chart title [default: the metric and the runs].
    #[arg(long)]
    title: Option<String>,
    /// Image width in pixels.
    #[arg(long, default_value_t = 1000)]
    width: u32,
    /// Image height in pixels.
    #[arg(long, default_value_t = 600)]
    height: u32,
}

#[derive(clap::Args, Debug)]
struct TableArgs {
    /// Eval JSON files, one row each (a zero-shot file may give several), in this order.
    #[arg(required = true)]
    evals: Vec<PathBuf>,
    /// Full-precision eval JSON: adds the "x FP" column (ppl / FP ppl) and is listed first.
    #[arg(long)]
    fp: Option<PathBuf>,
    /// Write the table to this file (temporary file + rename) instead of stdout.
    #[arg(long, short = 'o')]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum MetricArg {
    /// The distillation loss (the --loss objective of each run).
    Loss,
    /// The learning rate.
    Lr,
    /// The global gradient norm before clipping.
    #[value(name = "grad_norm", alias = "grad-norm")]
    GradNorm,
    /// Training throughput.
    #[value(name = "tokens_per_s", alias = "tokens-per-s")]
    TokensPerS,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum XArg {
    Step,
    Tokens,
}

fn plot(a: &PlotArgs) -> anyhow::Result<()> {
    if !a.label.is_empty() && a.label.len() != a.logs.len() {
        return Err(qat_report::ReportError::LabelCount {
            labels: a.label.len(),
            logs: a.logs.len(),
        }
        .into());
    }
    let labels = match a.label.is_empty() {
        true => {
            qat_report::default_labels(&a.logs.iter().map(PathBuf::as_path).collect::<Vec<_>>())
        }
        false => a.label.clone(),
    };
    let runs = a
        .logs
        .iter()
        .zip(labels)
        .map(|(p, l)| qat_report::read_log(p, Some(l)))
        .collect::<Result<Vec<_>, _>>()?;
    let cfg = PlotConfig {
        metric: match a.metric {
            MetricArg::Loss => Metric::Loss,
            MetricArg::Lr => Metric::Lr,
            MetricArg::GradNorm => Metric::GradNorm,
            MetricArg::TokensPerS => Metric::TokensPerS,
        },
        x: match a.x {
            XArg::Step => XAxis::Step,
            XArg::Tokens => XAxis::Tokens,
        },
        smooth: a.smooth as usize,
        log_y: a.log_y,
        title: a.title.clone(),
        width: a.width,
        height: a.height,
    };
    let png = qat_report::render_png(&runs, &cfg)?;
    qat_shards::fsutil::write_atomic(&a.out, &png)?;
    let summary = serde_json::json!({
        "out": a.out.display().to_string(),
        "bytes": png.len(),
        "runs": runs.iter().map(|r| serde_json::json!({
            "log": r.path.display().to_string(), "label": r.label, "points": r.points.len(),
        })).collect::<Vec<_>>(),
    });
    println!("{summary}");
    Ok(())
}

fn table(a: &TableArgs) -> anyhow::Result<()> {
    let fp = match &a.fp {
        Some(p) => match qat_report::read_eval(p).context("--fp")? {
            EvalRecord::Ppl(r) => Some(r),
            EvalRecord::ZeroShot(_) => anyhow::bail!(
                "--fp {}: a zero-shot result, expected a perplexity summary",
                p.display()
            ),
        },
        None => None,
    };
    let mut records = Vec::new();
    if let Some(f) = &fp {
        if !a.evals.contains(&f.path) {
            records.push(EvalRecord::Ppl(f.clone()));
        }
    }
    for p in &a.evals {
        records.push(qat_report::read_eval(p)?);
    }
    let md = qat_report::markdown_table(&records, fp.as_ref());
    match &a.out {
        Some(out) => qat_shards::fsutil::write_atomic(out, md.as_bytes())?,
        None => print!("{md}"),
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    main_with("qat-report", || {
        match &args.command {
            Command::Plot(a) => plot(a)?,
            Command::Table(a) => table(a)?,
        }
        Ok(Outcome::Ok)
    })
}
