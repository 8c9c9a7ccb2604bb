//! The `qat-sample` stage: plans the files of a partition, resumes what is already done,
//! generates the rest batch by batch and writes shards and manifest atomically.

use crate::config::{SampleConfig, SamplingRecord, StartMode};
use crate::error::{Result, SampleError};
use crate::generate::{
    generate_batch, GenerationParams, GenerationStats, SequenceSpec, PROFILE_PHASES,
};
use crate::prompts::read_prompts;
use candle_core::DType;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use qat_model::{sha256_files, special_token_ids, ModelDir, ProfileSummary, StepProfile};
use qat_shards::{
    num_files_for, verify_entry, FileEntry, IdDtype, Manifest, SequenceRecord, ShardFileWriter,
    ShardSetHeader, TeacherIdentity, FORMAT_VERSION,
};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// The JSON summary `qat-sample` prints on stdout.
#[derive(Debug, Clone, Serialize)]
pub struct SampleSummary {
    pub out: String,
    pub manifest: String,
    pub partition: String,
    /// Sequences and tokens written by this run (resumed files excluded).
    pub sequences: u64,
    pub tokens: u64,
    pub generated_tokens: u64,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub bytes_written: u64,
    pub files_written: usize,
    pub files_resumed: usize,
    /// Teacher NLL (temperature 1) of the tokens it generated in this run, per token.
    pub teacher_nll: Option<f64>,
    pub top_k_logprobs: u32,
    /// With `--profile`: seconds per batch phase (qat_model::profile); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<ProfileSummary>,
}

const TOOL: &str = concat!("qat-sample ", env!("CARGO_PKG_VERSION"));

fn invalid(msg: String) -> SampleError {
    SampleError::Config(msg)
}

/// Builds the start of every sequence id from the mode.
struct Starts {
    prompts: Option<Vec<Vec<u32>>>,
    vocab_starts: Vec<u32>,
    bos: Option<u32>,
}

impl Starts {
    fn spec(&self, seq_id: u64) -> SequenceSpec {
        let mut prompt = Vec::new();
        match &self.prompts {
            Some(p) => prompt.extend(&p[(seq_id % p.len() as u64) as usize]),
            None => {
                prompt.extend(self.bos);
                prompt.push(self.vocab_starts[(seq_id % self.vocab_starts.len() as u64) as usize]);
            }
        }
        SequenceSpec { seq_id, prompt }
    }
}

/// Runs the stage. Returns the summary; the shards and manifest are on disk.
pub fn run(cfg: &SampleConfig) -> Result<SampleSummary> {
    let started = Instant::now();
    let model_dir = ModelDir::open(&cfg.model)?;
    let tokenizer = model_dir.tokenizer()?;
    let mc = &model_dir.config;
    let vocab = mc.vocab_size;
    if cfg.keep_top == 0 || cfg.keep_top as usize > vocab {
        return Err(invalid(format!(
            "--top-k-logprobs {} must be in 1..={vocab} (the model's vocab_size)",
            cfg.keep_top
        )));
    }
    if cfg.max_len < 2 || cfg.max_len > mc.max_position_embeddings {
        return Err(invalid(format!(
            "--max-len {} must be in 2..={} (max_position_embeddings)",
            cfg.max_len, mc.max_position_embeddings
        )));
    }
    if cfg.batch_size == 0 || cfg.seqs_per_file == 0 {
        return Err(invalid(
            "--batch-size and --seqs-per-file must be >= 1".into(),
        ));
    }
    if cfg.greedy_min > cfg.greedy_max {
        return Err(invalid(format!(
            "greedy range {}..={} is empty",
            cfg.greedy_min, cfg.greedy_max
        )));
    }
    let s = &cfg.sampling;
    let temperature_ok = s.temperature >= 0.0 && s.temperature.is_finite();
    let top_p_ok = s.top_p > 0.0 && s.top_p <= 1.0;
    if !(temperature_ok && top_p_ok) {
        return Err(invalid(format!(
            "--temperature must be >= 0 (got {}) and --top-p in (0, 1] (got {})",
            s.temperature, s.top_p
        )));
    }
    let device = qat_model::parse_device(&cfg.device).map_err(invalid)?;
    let dtype = qat_model::parse_dtype(&cfg.dtype).map_err(invalid)?;
    let bos = if cfg.bos {
        Some(
            mc.bos_token_id
                .or_else(|| tokenizer.token_to_id("<s>"))
                .ok_or_else(|| {
                    invalid(format!(
                        "{}: no bos_token_id in config.json and no <s> token; use --no-bos",
                        model_dir.dir.display()
                    ))
                })?,
        )
    } else {
        None
    };
    let mut eos_ids = mc.eos_token_ids.clone();
    if eos_ids.is_empty() {
        eos_ids.extend(tokenizer.token_to_id("</s>"));
    }

    // Starts of sequences, and what identifies them.
    let (starts, prompts_file, prompts_sha256, num_prompts) = match &cfg.mode {
        StartMode::DataFree => {
            let special = special_token_ids(&tokenizer);
            let n = tokenizer.get_vocab_size(true) as u32;
            let vocab_starts: Vec<u32> = (0..n).filter(|id| !special.contains(id)).collect();
            if vocab_starts.is_empty() {
                return Err(invalid(
                    "the tokenizer has no non-special tokens to start from".into(),
                ));
            }
            (
                Starts {
                    prompts: None,
                    vocab_starts,
                    bos,
                },
                None,
                None,
                None,
            )
        }
        StartMode::Prompts(path) => {
            let texts = read_prompts(path)?;
            let mut prompts = Vec::with_capacity(texts.len());
            for text in &texts {
                let enc =
                    tokenizer
                        .encode(text.as_str(), false)
                        .map_err(|e| SampleError::Prompts {
                            path: path.clone(),
                            what: format!("cannot tokenize: {e}"),
                        })?;
                let mut ids: Vec<u32> = bos.into_iter().collect();
                ids.extend(enc.get_ids());
                ids.truncate(cfg.max_len - 1); // leave room for at least one generated token
                if ids.is_empty() {
                    return Err(SampleError::Prompts {
                        path: path.clone(),
                        what: format!("prompt {text:?} has no tokens (and --no-bos)"),
                    });
                }
                prompts.push(ids);
            }
            let sha = sha256_files(std::slice::from_ref(path))?;
            (
                Starts {
                    prompts: Some(prompts),
                    vocab_starts: Vec::new(),
                    bos,
                },
                Some(path.display().to_string()),
                Some(sha),
                Some(texts.len()),
            )
        }
    };
    let num_sequences = cfg
        .num_sequences
        .unwrap_or(num_prompts.map(|n| n as u64).unwrap_or(4096));
    if num_sequences == 0 {
        return Err(invalid("--num-sequences must be >= 1".into()));
    }

    let record = SamplingRecord {
        mode: if num_prompts.is_some() {
            "prompts"
        } else {
            "data-free"
        },
        prompts_file,
        prompts_sha256,
        num_prompts,
        max_len: cfg.max_len,
        top_k_logprobs: cfg.keep_top,
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        greedy_min: cfg.greedy_min,
        greedy_max: cfg.greedy_max,
        bos: cfg.bos,
        seed: cfg.seed,
        batch_size: cfg.batch_size,
        eos_ids: eos_ids.clone(),
        dtype: qat_model::dtype_name(dtype),
        device_kind: if device.is_cpu() { "cpu" } else { "cuda" },
    };
    let header = ShardSetHeader {
        format_version: FORMAT_VERSION,
        tool: TOOL.to_string(),
        teacher: TeacherIdentity {
            weights_sha256: model_dir.weights_sha256()?,
            tokenizer_sha256: model_dir.tokenizer_sha256()?,
            vocab_size: vocab as u32,
            config: model_dir.config_json.clone(),
            source: model_dir.dir.display().to_string(),
        },
        sampling: serde_json::to_value(&record).map_err(|e| invalid(e.to_string()))?,
        seed: cfg.seed,
        top_k: cfg.keep_top,
        logprob_dtype: cfg.logprob_dtype,
        id_dtype: IdDtype::for_vocab(vocab as u32),
        num_sequences,
        seqs_per_file: cfg.seqs_per_file,
        num_files: num_files_for(num_sequences, cfg.seqs_per_file)?,
    };
    header.validate()?;

    prepare_out_dir(&cfg.out)?;
    let mut manifest = match Manifest::load_existing_partition(&cfg.out, &cfg.partition)? {
        Some(m) => {
            m.check_header(&cfg.out, &header)?;
            m
        }
        None => Manifest::new(header.clone(), cfg.partition),
    };
    // Resume: keep listed files whose bytes still match; regenerate the rest.
    let mut todo = Vec::new();
    let mut resumed = 0;
    for f in manifest.expected_file_indices() {
        match manifest.entry(f) {
            Some(e) if verify_entry(&cfg.out, e)? => resumed += 1,
            _ => todo.push(f),
        }
    }
    manifest.complete = false;

    let params = GenerationParams {
        max_len: cfg.max_len,
        keep_top: cfg.keep_top as usize,
        greedy_min: cfg.greedy_min,
        greedy_max: cfg.greedy_max,
        sampling: cfg.sampling,
        seed: cfg.seed,
        eos_ids,
    };
    // Weights load in f32 and are cast once to the compute dtype (same values as loading in it).
    let mut model = model_dir.load(&device, DType::F32)?;
    model.set_compute_dtype(dtype);
    model.freeze_weights()?;
    let total_rows: u64 = todo.iter().map(|&f| header.file_rows(f)).sum();
    let bar = progress_bar(total_rows, cfg.progress);
    let mut stats = GenerationStats::default();
    let (mut sequences, mut tokens, mut bytes) = (0u64, 0u64, 0u64);
    let gen_started = Instant::now();
    let profile = StepProfile::new_if(cfg.profile, &device, &PROFILE_PHASES);
    for &f in &todo {
        let writer = ShardFileWriter::create(&cfg.out, f, &header)?;
        let ids: Vec<u64> = header.file_seq_range(f).collect();
        // The file's writer runs on its own thread: Parquet encoding and compression of one batch
        // overlap the generation of the next (the records go in the same order: the same bytes).
        let entry = std::thread::scope(|scope| -> Result<FileEntry> {
            let (to_writer, batches) = std::sync::mpsc::sync_channel::<Vec<SequenceRecord>>(1);
            let writing = scope.spawn(move || -> Result<FileEntry> {
                let mut writer = writer;
                for batch in batches {
                    for r in &batch {
                        writer.push(r)?;
                    }
                }
                Ok(writer.finish()?)
            });
            for chunk in ids.chunks(cfg.batch_size) {
                let specs: Vec<SequenceSpec> = chunk.iter().map(|&id| starts.spec(id)).collect();
                let (records, batch_stats) = generate_batch(&model, &specs, &params, &profile)?;
                stats.generated_tokens += batch_stats.generated_tokens;
                stats.teacher_nll_sum += batch_stats.teacher_nll_sum;
                tokens += records.iter().map(|r| r.tokens.len() as u64).sum::<u64>();
                sequences += records.len() as u64;
                let n = records.len() as u64;
                // A closed channel means the writer failed: its error comes from the join below.
                let sent = profile.time("write", || {
                    Ok::<_, SampleError>(to_writer.send(records).is_ok())
                })?;
                profile.end_step();
                if !sent {
                    break;
                }
                bar.inc(n);
                bar.set_message(format!(
                    "{:.0} tok/s",
                    stats.generated_tokens as f64 / gen_started.elapsed().as_secs_f64()
                ));
            }
            drop(to_writer);
            writing.join().expect("the shard writer thread panicked")
        })?;
        bytes += entry.bytes;
        manifest.upsert_file(entry);
        manifest.write(&cfg.out)?;
    }
    manifest.mark_complete()?;
    let manifest_path = manifest.write(&cfg.out)?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    Ok(SampleSummary {
        out: cfg.out.display().to_string(),
        manifest: manifest_path.display().to_string(),
        partition: cfg.partition.to_string(),
        sequences,
        tokens,
        generated_tokens: stats.generated_tokens,
        seconds,
        tokens_per_s: stats.generated_tokens as f64 / gen_started.elapsed().as_secs_f64().max(1e-9),
        bytes_written: bytes,
        files_written: todo.len(),
        files_resumed: resumed,
        teacher_nll: (stats.generated_tokens > 0)
            .then(|| stats.teacher_nll_sum / stats.generated_tokens as f64),
        top_k_logprobs: cfg.keep_top,
        profile: profile.summary(),
    })
}

/// Creates the output directory and checks that it is writable before any work starts.
fn prepare_out_dir(out: &Path) -> Result<()> {
    if out.exists() && !out.is_dir() {
        return Err(SampleError::Io {
            path: out.to_path_buf(),
            what: "output path exists and is not a directory",
            source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        });
    }
    std::fs::create_dir_all(out).map_err(|source| SampleError::Io {
        path: out.to_path_buf(),
        what: "cannot create output directory",
        source,
    })?;
    let probe = out.join(format!("{PROBE_PREFIX}{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|source| SampleError::Io {
        path: out.to_path_buf(),
        what: "output directory is not writable",
        source,
    })?;
    let _ = std::fs::remove_file(probe);
    // A run killed between the write and the removal above left its probe behind: remove those
    // too. (A concurrent partition's probe may go with them; it ignores its own removal failing.)
    if let Ok(entries) = std::fs::read_dir(out) {
        for e in entries.flatten() {
            if e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(PROBE_PREFIX))
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

/// Name prefix of the empty file that checks the output directory is writable.
const PROBE_PREFIX: &str = ".qat-sample-write-test.";

fn progress_bar(total: u64, enabled: bool) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(total),
        if enabled {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    bar.set_style(
        ProgressStyle::with_template("qat-sample {bar:30} {pos}/{len} sequences  {msg}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}
