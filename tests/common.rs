//! Shared helpers of the CLI tests: data paths, running the real binaries, comparing outputs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `$QAT_DATA`, or `../shared/data` beside the repository.
pub fn data_dir() -> PathBuf {
    match std::env::var_os("QAT_DATA") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data"),
    }
}

pub fn stories_dir() -> PathBuf {
    data_dir().join("models/stories260K")
}

/// Runs `qat-sample` with `args`; returns the process output.
pub fn qat_sample(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qat-sample"))
        .args(args)
        .output()
        .expect("spawn qat-sample")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts a successful run and parses its JSON summary.
pub fn ok_json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "failed: {}", stderr(out));
    serde_json::from_slice(&out.stdout).expect("JSON summary on stdout")
}

/// Asserts exit code 2 and a single `tool: ...` message containing `needle`.
pub fn assert_error(out: &Output, tool: &str, needle: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "expected exit 2, stderr: {err}");
    assert!(
        err.starts_with(&format!("{tool}: ")),
        "stderr not prefixed by {tool}: {err}"
    );
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    assert!(out.stdout.is_empty(), "stdout not empty on error");
}

/// Sorted (name, bytes) of every file in `dir`.
pub fn dir_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Names of the files in `dir` (empty if it does not exist).
pub fn names(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => {
            let mut v: Vec<String> = rd
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }
        Err(_) => Vec::new(),
    }
}

/// Runs `qat-eval` with `args`.
pub fn qat_eval(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qat-eval"))
        .args(args)
        .output()
        .expect("spawn qat-eval")
}

pub fn tinystories() -> PathBuf {
    data_dir().join("corpora/tinystories/TinyStories-valid.first800.txt")
}

/// `qat-eval` (quiet) of `model` on the first `limit` documents of [`tinystories`], with
/// `extra` flags; returns the process output.
pub fn eval_tinystories(model: &Path, limit: usize, extra: &[&str]) -> Output {
    let (corpus, limit) = (tinystories(), limit.to_string());
    let mut args = vec![
        "--model",
        model.to_str().unwrap(),
        "--corpus",
        corpus.to_str().unwrap(),
        "--limit",
        &limit,
        "-q",
    ];
    args.extend_from_slice(extra);
    qat_eval(&args)
}

/// Runs `qat-pack` with `args`.
pub fn qat_pack(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qat-pack"))
        .args(args)
        .output()
        .expect("spawn qat-pack")
}

/// A "student" made of the teacher's files (config, weights, tokenizer.json and `extra` files
/// such as `tokenizer.model`) and `scheme` as its `quant_scheme.json`: a student whose training
/// changed nothing, for the pack and export tests.
pub fn teacher_student(dir: &Path, scheme: &str, extra: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"]
        .iter()
        .chain(extra)
    {
        std::fs::copy(stories_dir().join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("quant_scheme.json"), scheme).unwrap();
}

/// Runs `qat-distill` with `args`.
pub fn qat_distill(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qat-distill"))
        .args(args)
        .output()
        .expect("spawn qat-distill")
}

/// The `qat-distill` settings the CLI and fault tests train with on [`small_shards`]: W4A8KV4,
/// batch 4, 2 warmup steps, lr 1e-3, quiet (each test adds its budget and checkpoints).
pub const SMALL_DISTILL_ARGS: &[&str] = &[
    "--scheme",
    "W4A8KV4",
    "-b",
    "4",
    "--warmup-steps",
    "2",
    "--lr",
    "1e-3",
    "-q",
];

/// The `qat-sample` settings of [`small_shards`]: 32 sequences of up to 48 tokens, K = 16, in 4
/// files of 8.
pub const SMALL_SHARD_ARGS: &[&str] = &[
    "-n",
    "32",
    "--max-len",
    "48",
    "-K",
    "16",
    "--batch-size",
    "8",
    "--seqs-per-file",
    "8",
    "-q",
];

/// Small data-free shards of stories260K in `dir` ([`SMALL_SHARD_ARGS`]).
pub fn small_shards(dir: &Path) {
    let model = stories_dir();
    let mut args = vec![
        "--model",
        model.to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(SMALL_SHARD_ARGS);
    ok_json(&qat_sample(&args));
}

/// Runs `qat-clip` with `args`.
pub fn qat_clip(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qat-clip"))
        .args(args)
        .output()
        .expect("spawn qat-clip")
}

/// Writes a scheme JSON for stories260K: `kind` weights with `bits` in groups of 32, `down_proj`
/// (in_features 172 = 4 · 43) in groups of 43. Returns its path.
pub fn group_scheme(dir: &Path, kind: &str, bits: u8) -> PathBuf {
    let path = dir.join(format!("{kind}{bits}.json"));
    let json = format!(
        r#"{{"format_version": 1, "weight": {{"bits": {bits}, "format": {{"kind": "{kind}", "group_size": 32}}}},
            "overrides": [{{"pattern": "layers.*.mlp.down_proj", "weight": {{"bits": {bits}, "format": {{"kind": "{kind}", "group_size": 43}}}}}}]}}"#
    );
    std::fs::write(&path, json).unwrap();
    path
}

/// A temporary directory on a RAM file system when there is one (`/dev/shm`), else in the
/// default temp dir: the fault tests run dozens of short jobs that fsync every file.
pub fn fast_tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new().prefix("qat-test").tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

/// splitmix64: a tiny seeded generator, so that randomized fault points are reproducible.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n >= 1`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Copies the regular files of `from` into a new directory `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

/// Every file under `dir`, recursively, as (relative path, bytes), sorted.
pub fn tree_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    fn walk(root: &Path, d: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push((
                    p.strip_prefix(root).unwrap().to_string_lossy().into_owned(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

/// Spawns `bin args`, polls `trigger` (about every millisecond) until it returns true, then
/// kills the process with SIGKILL. Returns `true` if the kill landed (the process was still
/// running), `false` if it had already exited (its exit status must then be success).
pub fn kill_when(
    bin: &str,
    args: &[String],
    mut trigger: impl FnMut(std::time::Duration) -> bool,
) -> bool {
    use std::os::unix::process::ExitStatusExt;
    let mut child = Command::new(bin)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            assert!(
                status.success(),
                "{bin} failed on its own ({status}): {err}"
            );
            return false;
        }
        if trigger(started.elapsed()) {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "{bin}: trigger never fired"
        );
        std::thread::sleep(std::time::Duration::from_micros(500));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    match status.signal() {
        Some(9) => true,
        _ => {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            assert!(
                status.success(),
                "{bin} failed on its own ({status}): {err}"
            );
            false
        }
    }
}

/// Runs `bin args` with a file-size limit of `bytes` (RLIMIT_FSIZE) and SIGXFSZ ignored, so a
/// write past the limit fails with EFBIG ("File too large"): a full disk, simulated without
/// root. (`sh -c 'trap "" XFSZ; ulimit -f N; exec ...'` does the same from a shell.)
pub fn run_with_file_size_limit(bin: &str, args: &[&str], bytes: u64) -> Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(bin);
    cmd.args(args);
    // SAFETY: only async-signal-safe calls (signal, setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().expect("spawn")
}

/// One documented field of a summary: its path (`a`, `a[].b`, `a.<key>.b`), JSON type column and
/// whether it may be absent.
struct DocumentedField {
    path: String,
    ty: String,
    optional: bool,
}

/// The rows of section `## {section}` of `spec` (a file of formats/).
fn documented_fields(spec: &str, section: &str) -> Vec<DocumentedField> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(spec);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{spec}: {e}"));
    let mut in_section = false;
    let mut rows = Vec::new();
    for line in text.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            in_section = heading.trim() == section;
        } else if in_section && line.starts_with("| `") {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            rows.push(DocumentedField {
                path: cells[1].trim_matches('`').to_string(),
                ty: cells[2].to_string(),
                optional: cells[3].starts_with("optional"),
            });
        }
    }
    assert!(
        !rows.is_empty(),
        "{spec} has no fields under `## {section}`"
    );
    rows
}

/// Whether `v` has the documented JSON type (`string`, `integer`, `number`, `boolean`,
/// `object`, `array`, `array of strings`, each optionally `or null`).
fn has_documented_type(v: &serde_json::Value, ty: &str) -> bool {
    let (ty, nullable) = match ty.strip_suffix(" or null") {
        Some(t) => (t, true),
        None => (ty, false),
    };
    match ty {
        _ if v.is_null() => nullable,
        "string" => v.is_string(),
        "integer" => v.is_u64() || v.is_i64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "array of strings" => v
            .as_array()
            .is_some_and(|a| a.iter().all(|s| s.is_string())),
        other => panic!("formats/: unknown type {other:?}"),
    }
}

/// Checks `summary` (a tool's stdout JSON) against section `## {section}` of
/// formats/summaries.md (see [`assert_documented_in`]).
pub fn assert_documented(section: &str, summary: &serde_json::Value) {
    assert_documented_in("formats/summaries.md", section, summary);
}

/// Checks `value` against section `## {section}` of `spec` (a file of formats/): every field
/// it has is documented with the right type, every field documented as always present is
/// there; nested `a.b`, `a[].b` and `a.<key>.b` rows likewise, for every element.
pub fn assert_documented_in(spec: &str, section: &str, value: &serde_json::Value) {
    let rows = documented_fields(spec, section);
    check_documented(&format!("{spec} `## {section}`"), "", value, &rows);
}

fn check_documented(
    section: &str,
    prefix: &str,
    obj: &serde_json::Value,
    rows: &[DocumentedField],
) {
    let obj = obj
        .as_object()
        .unwrap_or_else(|| panic!("{section}: `{prefix}` is not an object: {obj}"));
    // The rows of this level: below `prefix`, with no further nesting.
    let here: Vec<(&str, &DocumentedField)> = rows
        .iter()
        .filter_map(|r| {
            let name = r.path.strip_prefix(prefix)?;
            (!name.contains('.') && !name.contains("[]")).then_some((name, r))
        })
        .collect();
    for (key, value) in obj {
        let Some((_, row)) = here.iter().find(|(name, _)| name == key) else {
            panic!("{section}: the JSON has `{prefix}{key}`, which is not documented");
        };
        assert!(
            has_documented_type(value, &row.ty),
            "{section}: `{prefix}{key}` is {value}, documented as {}",
            row.ty
        );
        let in_array = format!("{prefix}{key}[].");
        if rows.iter().any(|r| r.path.starts_with(&in_array)) {
            for element in value.as_array().into_iter().flatten() {
                check_documented(section, &in_array, element, rows);
            }
        }
        let in_object = format!("{prefix}{key}.");
        let nested = rows.iter().find(|r| r.path.starts_with(&in_object));
        match nested.map(|r| &r.path[in_object.len()..]) {
            // `a.<key>.b`: every value of the map.
            Some(rest) if rest.starts_with('<') => {
                let end = in_object.len() + rest.find(">.").expect("`<key>.`") + 2;
                let path = &nested.unwrap().path[..end];
                for entry in value.as_object().into_iter().flat_map(|m| m.values()) {
                    check_documented(section, path, entry, rows);
                }
            }
            // `a.b`: the object itself (when not null).
            Some(_) if value.is_object() => check_documented(section, &in_object, value, rows),
            _ => {}
        }
    }
    for (name, row) in here {
        assert!(
            row.optional || obj.contains_key(name),
            "{section}: `{prefix}{name}` is documented as always present but the JSON has none: {}",
            serde_json::Value::Object(obj.clone())
        );
    }
}
