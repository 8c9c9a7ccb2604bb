//! The `qat-distill` stage: quantization-aware training of a student from cached teacher
//! shards, with checkpoints that resume to the identical loss curve.
//!
//! Work happens in `<out>.work/` (checkpoint and log); the finished student directory is
//! written there and renamed to `<out>` only at the end, so `<out>` is never half written.

mod checkpoint;
mod output;
mod settings;
mod step;

use settings::{total_steps, validate};
pub use settings::{Budget, DistillConfig, TrainSettings};

use crate::data::{each_file_par, DataCursor, Prefetch, ShardBatches};
use crate::error::{io, Result, TrainError};
use crate::gamma::{teacher_confidence, TeacherConfidence};
use crate::loss::{Loss, LossKind};
use crate::optim::{clip_scale, grad_norm, AdamW, LrConfig};
use crate::student::Student;
use checkpoint::CheckpointState;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use qat_model::ModelDir;
use qat_model::{ProfileSummary, StepProfile};
use qat_quant::FakeQuant;
use qat_shards::ShardSet;
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// One line of `train_log.jsonl`.
#[derive(Debug, Clone, Serialize)]
struct LogLine {
    step: u64,
    loss: f32,
    lr: f64,
    grad_norm: f64,
    tokens: u64,
    tokens_per_s: f64,
}

/// The JSON summary printed on stdout.
#[derive(Debug, Clone, Serialize)]
pub struct DistillSummary {
    pub out: String,
    pub steps: u64,
    pub tokens: u64,
    pub final_loss: f32,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub resumed_from_step: Option<u64>,
    pub scheme: String,
    pub loss: LossKind,
    /// The gamma CAKLD trained with (measured or given); absent for the other losses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cakld_gamma: Option<f64>,
    /// With `--profile`: seconds per step phase (crate::profile); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<ProfileSummary>,
}

const TOOL: &str = concat!("qat-distill ", env!("CARGO_PKG_VERSION"));

/// Runs the stage.
pub fn run(cfg: &DistillConfig) -> Result<DistillSummary> {
    let started = Instant::now();
    let dev = qat_model::parse_device(&cfg.device).map_err(TrainError::Config)?;
    let work = PathBuf::from(format!("{}.work", cfg.out.display()));
    let ckpt = work.join("checkpoint");
    // Before anything reads the checkpoint: a kill mid-swap leaves it in checkpoint.old.
    checkpoint::recover_interrupted_swap(&work)?;
    let saved = if cfg.resume {
        checkpoint::read_state(&ckpt)?
    } else {
        None
    };
    let mut settings = cfg.settings.clone();
    if settings.data_parallel == 0 {
        settings.data_parallel = match &saved {
            Some(state) => state.settings.data_parallel,
            None => crate::parallel::auto_parts(&dev, settings.batch_size),
        };
    }
    let s = &settings;
    validate(s)?;
    let compute_dtype = qat_model::parse_dtype(&s.dtype).map_err(TrainError::Config)?;
    let master_dtype = qat_model::parse_dtype(&s.master_weights)
        .map_err(|e| TrainError::Config(format!("--master-weights: {e}")))?;
    let model_dir = ModelDir::open(&cfg.model)?;
    s.scheme.validate_for(&model_dir.config)?;
    let set = ShardSet::open(&cfg.shards)?;
    // Before hours of training: the sha256 of every file (copied shards are checked) and every
    // record (an id >= vocab or a NaN log-prob stops the run now, not mid-epoch), files in
    // parallel, the first bad file in file order reported. CAKLD's gamma, when it is measured
    // from the shards (also with an online teacher: the shards hold the same teacher's top-1
    // probabilities), is measured in this same pass.
    let confidence: Option<TeacherConfidence> = match (s.loss, s.cakld_gamma) {
        (LossKind::Cakld, None) => Some(teacher_confidence(&set)?),
        _ => {
            each_file_par(&set, |mut records| records.try_for_each(|r| r.map(drop)))?;
            None
        }
    };
    let h = set.header().clone();
    let mismatch = |what: String| TrainError::Mismatch {
        shards: cfg.shards.clone(),
        model: cfg.model.clone(),
        what,
    };
    if let Some(what) =
        h.teacher_mismatch(&model_dir.tokenizer_sha256()?, model_dir.config.vocab_size)
    {
        return Err(mismatch(what));
    }
    let shards_sha = set.manifests_sha256()?;
    let gamma = s.cakld_gamma.or(confidence.map(|c| c.gamma));
    let objective = Loss::new(s.loss, gamma)?;
    if let (true, Some(g)) = (cfg.progress, gamma) {
        match confidence {
            Some(c) => eprintln!("qat-distill: cakld gamma = {g:.6} (mean teacher top-1 probability over {} trained positions, {:.2} s)", c.positions, c.seconds),
            None => eprintln!("qat-distill: cakld gamma = {g:.6} (--cakld-gamma)"),
        }
    }
    let init_sha = model_dir.weights_sha256()?;

    let log_path = work.join("train_log.jsonl");
    if cfg.out.exists() {
        // A run killed after moving its student into place, before removing its work dir,
        // leaves both: say so, as the work dir (checkpoints) can be large.
        let what = if work.is_dir() {
            "output already exists (remove it to train again); its .work directory is left over from a run stopped after it had finished, and can be removed"
        } else {
            "output already exists (remove it to train again)"
        };
        return Err(TrainError::Io {
            path: cfg.out.clone(),
            what,
            source: std::io::ErrorKind::AlreadyExists.into(),
        });
    }
    let mut student = Student::load(&model_dir, &dev)?;
    student.model.set_fused_kernels(false);
    student.model.set_compute_dtype(compute_dtype);
    student
        .model
        .set_hooks(Arc::new(FakeQuant::for_training(s.scheme.clone())));
    if cfg.teacher.is_some() != s.online_teacher {
        return Err(TrainError::Config(
            "settings.online_teacher must be set exactly when a teacher is given".into(),
        ));
    }
    let teacher = match &cfg.teacher {
        Some(dir) => {
            let td = ModelDir::open(dir)?;
            if td.weights_sha256()? != h.teacher.weights_sha256 {
                return Err(mismatch(format!("--teacher {} is not the model that produced the shards (weights sha256 differs)", dir.display())));
            }
            let mut t = td.load(&dev, candle_core::DType::F32)?;
            t.set_compute_dtype(compute_dtype);
            t.freeze_weights()?;
            Some(t)
        }
        None => None,
    };
    // Rebalancing changes the initial weights; a resumed run loads the balanced ones instead.
    let mut balance = if s.balance_kv > 0 && saved.is_none() {
        let calib: Vec<Vec<u32>> = set
            .records()
            .take(s.balance_kv)
            .map(|r| r.map(|r| r.tokens))
            .collect::<std::result::Result<_, _>>()?;
        Some(crate::balance::balance_kv(&mut student, &calib)?)
    } else {
        None
    };
    let mut opt = AdamW::new(student.vars(), s.adam)?;
    if saved.is_none() {
        opt.round_vars_to(master_dtype)?;
    }
    let per_step = s.batch_size * s.grad_accum;
    let total = total_steps(s.budget, &set, per_step);
    let lr_cfg = LrConfig {
        lr: s.lr,
        schedule: s.schedule,
        warmup_steps: s.warmup_steps,
        total_steps: total,
        min_lr_ratio: s.min_lr_ratio,
    };

    let mut cursor = DataCursor::default();
    let (mut tokens_seen, mut log_lines, mut resumed_from) = (0u64, 0u64, None);
    match saved {
        Some(state) => {
            if state.settings != *s
                || state.shards_manifest_sha256 != shards_sha
                || state.init_weights_sha256 != init_sha
            {
                return Err(TrainError::Checkpoint {
                    path: ckpt.join("state.json"),
                    what: "made with other settings, shards or initial model; cannot resume".into(),
                });
            }
            let w = candle_core::safetensors::load(ckpt.join("weights.safetensors"), &dev)?;
            student.set_tensors(&w, &ckpt)?;
            let o = candle_core::safetensors::load(ckpt.join("optimizer.safetensors"), &dev)?;
            opt.load_state(&o, state.step)?;
            cursor = state.cursor;
            tokens_seen = state.tokens_seen;
            log_lines = state.log_lines;
            balance = state.balance;
            resumed_from = Some(state.step);
            checkpoint::truncate_lines(&log_path, log_lines)?;
        }
        None if checkpoint::exists(&ckpt) => {
            return Err(TrainError::Checkpoint { path: ckpt.clone(), what: "a checkpoint of an earlier run exists: pass --resume to continue it, or delete it".into() });
        }
        None => {
            std::fs::create_dir_all(&work).map_err(io(&work, "cannot create work directory"))?;
            let _ = std::fs::remove_file(&log_path);
        }
    }
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io(&log_path, "cannot open training log"))?;
    let pools = crate::parallel::PartPools::new(s.data_parallel).map_err(|e| {
        TrainError::Config(format!(
            "cannot start {} training threads: {e}",
            s.data_parallel
        ))
    })?;
    let mut data = Prefetch::new(ShardBatches::new(set, s.seed, cursor), s.batch_size, 2);
    let profile = StepProfile::new_if(cfg.profile, &dev, &step::PHASES);
    let models = step::StepModels {
        student: &student,
        teacher: teacher.as_ref(),
        objective: &objective,
        dev: &dev,
        top_k: h.top_k as usize,
        vocab: h.teacher.vocab_size as usize,
        profile: &profile,
    };

    let bar = if cfg.progress {
        ProgressBar::new(total)
    } else {
        ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden())
    };
    bar.set_style(
        ProgressStyle::with_template("qat-distill {bar:30} {pos}/{len} steps  {msg}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(opt.step);
    let vars = opt.vars().to_vec();
    let mut last_loss = f32::NAN;
    let loop_started = Instant::now();
    let tokens_at_start = tokens_seen;
    let mut last_good = resumed_from.map_or("no checkpoint was written yet".to_string(), |s| {
        format!("last good checkpoint: step {s} in {}", ckpt.display())
    });
    while opt.step < total {
        let step_started = Instant::now();
        let plan = step::StepPlan {
            grad_accum: s.grad_accum,
            data_parallel: s.data_parallel,
            step: opt.step,
            poison: cfg.inject_nan_at == Some(opt.step),
            last_good: &last_good,
        };
        let step = step::step_grads(&models, &mut data, &pools, &vars, &plan)?;
        // Clipping's scale goes into AdamW's moment passes (the bits of scaling first).
        let grad_norm = profile.time("clip_grad", || grad_norm(&step.grads))?;
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFinite {
                loss: f32::NAN,
                step: opt.step,
                last_good,
            });
        }
        let lr = lr_cfg.at(opt.step);
        profile.time("optimizer", || {
            opt.apply_scaled(&step.grads, lr, clip_scale(grad_norm, s.max_grad_norm))?;
            opt.round_vars_to(master_dtype)
        })?;
        tokens_seen += step.tokens;
        last_loss = step.loss;
        profile.time("log_checkpoint", || {
            let line = LogLine {
                step: opt.step,
                loss: step.loss,
                lr,
                grad_norm,
                tokens: tokens_seen,
                tokens_per_s: step.tokens as f64 / step_started.elapsed().as_secs_f64(),
            };
            writeln!(
                log,
                "{}",
                serde_json::to_string(&line).expect("log line serializes")
            )
            .map_err(io(&log_path, "cannot write training log"))?;
            log_lines += 1;
            bar.set_position(opt.step);
            bar.set_message(format!("loss {:.4}", step.loss));
            if cfg.checkpoint_every > 0 && opt.step % cfg.checkpoint_every == 0 && opt.step < total
            {
                log.flush()
                    .map_err(io(&log_path, "cannot write training log"))?;
                let state = CheckpointState {
                    step: opt.step,
                    cursor: data.cursor(),
                    tokens_seen,
                    log_lines,
                    settings: s.clone(),
                    shards_manifest_sha256: shards_sha.clone(),
                    init_weights_sha256: init_sha.clone(),
                    balance: balance.clone(),
                };
                checkpoint::write(&work, &student, &opt, &state)?;
                last_good = format!(
                    "last good checkpoint: step {} in {}",
                    opt.step,
                    ckpt.display()
                );
            }
            Ok::<_, TrainError>(())
        })?;
        profile.end_step();
    }
    bar.finish_and_clear();
    drop(log);
    let seconds = loop_started.elapsed().as_secs_f64();

    let provenance = serde_json::json!({
        "tool": TOOL,
        "settings": s,
        "seed": s.seed,
        "init_model": model_dir.dir.display().to_string(),
        "init_weights_sha256": init_sha,
        // Set when the model was a Hub id resolved into the Hugging Face cache.
        "init_model_hub": qat_model::snapshot_source(&model_dir.dir),
        "shards": cfg.shards.display().to_string(),
        "shards_manifest_sha256": shards_sha,
        "teacher": h.teacher,
        "steps": opt.step,
        "tokens": tokens_seen,
        "final_loss": last_loss,
        "device": qat_model::device_name(&dev),
        "balance_kv": balance,
        "online_teacher": cfg.teacher.as_ref().map(|p| p.display().to_string()),
        "online_teacher_hub": cfg.teacher.as_deref().and_then(qat_model::snapshot_source),
        "cakld_gamma": gamma.map(|g| serde_json::json!({
            "gamma": g,
            "source": if confidence.is_some() { "shards" } else { "--cakld-gamma" },
            "measured": confidence,
        })),
    });
    output::install_student(
        &work,
        &cfg.out,
        &student,
        &model_dir,
        &s.scheme,
        &log_path,
        &provenance,
    )?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(DistillSummary {
        out: cfg.out.display().to_string(),
        steps: opt.step,
        tokens: tokens_seen,
        final_loss: last_loss,
        seconds: started.elapsed().as_secs_f64(),
        tokens_per_s: (tokens_seen - tokens_at_start) as f64 / seconds.max(1e-9),
        resumed_from_step: resumed_from,
        scheme: s.scheme.short_name().unwrap_or_else(|| "custom".into()),
        loss: s.loss,
        cakld_gamma: gamma,
        profile: profile.summary(),
    })
}
