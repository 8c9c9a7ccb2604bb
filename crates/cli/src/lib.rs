//! What every `qat-*` binary shares: error printing and exit codes.
//!
//! Exit 0: success. Exit 1: a check failed (the tool's own verdict). Exit 2: an error (bad
//! input, I/O, ...), printed once on stderr as `qat-<tool>: <error>: <cause>: ...`.

use std::process::ExitCode;

/// Outcome of a tool that ran to the end.
pub enum Outcome {
    Ok,
    CheckFailed,
}

/// Keeps freed large buffers in the process instead of returning them to the OS at once.
///
/// Tensor code allocates and frees many buffers of megabytes per step; glibc serves those with
/// mmap/munmap by default, so every step pays page faults and zeroing (measured on qat-distill,
/// stories260K, batch 16 x 256: 1,130 tokens/s with 22 s of system time per 21 s run, against
/// 2,020 tokens/s with 2 s once large blocks stay on the heap).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator thresholds; called before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

/// Runs candle's element-wise ops on the calling thread unless `CANDLE_NUM_THREADS` is set.
///
/// candle 0.11's element-wise thread pool waits for its workers by spinning; on a busy machine
/// (or next to rayon, which runs qat's attention and fake-quant kernels and gemm's matmuls) the
/// spinning threads take the cores from the ones doing the work. Measured by `make bench`
/// (bench/RESULTS.md) at load ~8: qat-distill 1,635 → 4,479 tokens/s, qat-eval 6,327 → 8,985.
/// Matmuls and qat's own kernels still use all rayon threads (`RAYON_NUM_THREADS`).
///
/// `RAYON_NUM_THREADS` is also pinned (to the available parallelism, rayon's own default):
/// without it candle looks up its default thread count on every matmul, by reading and
/// parsing `/proc/cpuinfo` (~5% of a `qat-sample` run in `perf`).
pub fn tune_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Before any candle op (the pool reads the variable once, when it starts).
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Runs `body`, prints an error chain once prefixed by `tool`, and maps the result to an exit code.
pub fn main_with(tool: &str, body: impl FnOnce() -> anyhow::Result<Outcome>) -> ExitCode {
    tune_allocator();
    tune_threads();
    match body() {
        Ok(Outcome::Ok) => ExitCode::SUCCESS,
        Ok(Outcome::CheckFailed) => ExitCode::from(1),
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            let chain: Vec<String> = err.chain().map(|c| c.to_string()).collect();
            eprintln!("{tool}: {}", dedup_chain(&chain).join(": "));
            ExitCode::from(2)
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Drops chain entries already contained in the previous one (thiserror `transparent` and
/// `{source}` formatting repeat their cause).
fn dedup_chain(chain: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for msg in chain {
        if out.last().is_some_and(|prev| prev.contains(msg.as_str())) {
            continue;
        }
        out.push(msg.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn repeated_causes_are_printed_once() {
        let chain = vec!["a: b: c".to_string(), "b: c".to_string(), "c".to_string()];
        assert_eq!(super::dedup_chain(&chain), vec!["a: b: c".to_string()]);
        let chain = vec!["loading x".to_string(), "bad y".to_string()];
        assert_eq!(super::dedup_chain(&chain).len(), 2);
    }
}
