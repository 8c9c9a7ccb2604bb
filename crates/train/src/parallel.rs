//! Data parallelism on the CPU: a batch is split into parts that train concurrently, one
//! thread each, and their gradients are summed in part order.
//!
//! A training step of a small model is a chain of small matmuls and element-wise ops; spreading
//! each op over the cores (gemm's own threading) costs more in synchronization than it gains
//! (`make bench`: 2 threads were slower than 1). Whole sequences per thread scale instead.
//! Each part runs on its own single-thread rayon pool, so that the matmuls and qat's kernels
//! inside it (which use rayon) stay on that thread instead of competing for the other parts'.
//!
//! The parts are contiguous runs of the batch, sizes differing by at most one; the result
//! depends on the number of parts (it changes how sums are rounded), never on thread timing.

use candle_core::Device;
use rayon::{ThreadPool, ThreadPoolBuilder};

/// The number of parts when the user does not choose: one per rayon thread (the
/// `RAYON_NUM_THREADS` variable, else the cores), at most one per sequence; 1 on a GPU, which
/// parallelizes each op itself.
pub fn auto_parts(dev: &Device, batch_size: usize) -> usize {
    if dev.is_cpu() {
        rayon::current_num_threads().min(batch_size).max(1)
    } else {
        1
    }
}

/// `items` in `parts` contiguous runs whose lengths differ by at most one, the longer ones
/// first; empty runs are left out (fewer items than parts).
pub fn split_even<T>(items: &[T], parts: usize) -> Vec<&[T]> {
    let parts = parts.max(1);
    let (base, extra) = (items.len() / parts, items.len() % parts);
    let mut out = Vec::with_capacity(parts);
    let mut start = 0;
    for i in 0..parts {
        let len = base + usize::from(i < extra);
        if len > 0 {
            out.push(&items[start..start + len]);
        }
        start += len;
    }
    out
}

/// One single-thread pool per part.
pub struct PartPools {
    pools: Vec<ThreadPool>,
}

impl std::fmt::Debug for PartPools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartPools")
            .field("parts", &self.pools.len())
            .finish()
    }
}

impl PartPools {
    /// Pools for `parts` concurrent parts; with one part, none (it runs on the calling thread
    /// and its ops use the global rayon pool as usual).
    pub fn new(parts: usize) -> std::io::Result<Self> {
        let pools = if parts <= 1 {
            Vec::new()
        } else {
            (0..parts)
                .map(|i| {
                    ThreadPoolBuilder::new()
                        .num_threads(1)
                        .thread_name(move |_| format!("qat-part-{i}"))
                        .build()
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(std::io::Error::other)?
        };
        Ok(Self { pools })
    }

    /// Runs `f(part)` for every part, concurrently when there are pools, and returns the
    /// results in part order.
    pub fn run<T: Sync, R: Send>(&self, parts: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
        if self.pools.is_empty() || parts.len() <= 1 {
            return parts.iter().map(&f).collect();
        }
        assert!(
            parts.len() <= self.pools.len(),
            "{} parts for {} pools",
            parts.len(),
            self.pools.len()
        );
        let f = &f;
        std::thread::scope(|scope| {
            let handles: Vec<_> = parts
                .iter()
                .zip(&self.pools)
                .skip(1)
                .map(|(part, pool)| scope.spawn(move || pool.install(|| f(part))))
                .collect();
            let first = self.pools[0].install(|| f(&parts[0]));
            let mut out = vec![first];
            out.extend(
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))),
            );
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_even_keeps_order_and_balances_lengths() {
        let v: Vec<u32> = (0..7).collect();
        let parts = split_even(&v, 3);
        assert_eq!(parts, vec![&[0, 1, 2][..], &[3, 4], &[5, 6]]);
        assert_eq!(split_even(&v[..2], 4), vec![&[0][..], &[1]]);
        assert_eq!(split_even(&v, 1), vec![&v[..]]);
        assert!(split_even::<u32>(&[], 2).is_empty());
    }

    #[test]
    fn runs_every_part_on_its_own_single_thread_pool_in_order() {
        let pools = PartPools::new(3).unwrap();
        let parts = [10usize, 20, 30];
        let out = pools.run(&parts, |&x| {
            (
                x + 1,
                rayon::current_num_threads(),
                std::thread::current().name().map(String::from),
            )
        });
        assert_eq!(
            out.iter().map(|o| o.0).collect::<Vec<_>>(),
            vec![11, 21, 31]
        );
        assert!(
            out.iter().all(|o| o.1 == 1),
            "each part sees a one-thread pool: {out:?}"
        );
        let names: Vec<_> = out
            .iter()
            .map(|o| o.2.clone().unwrap_or_default())
            .collect();
        assert_eq!(names, vec!["qat-part-0", "qat-part-1", "qat-part-2"]);
    }

    #[test]
    fn one_part_runs_on_the_calling_thread() {
        let pools = PartPools::new(1).unwrap();
        let me = std::thread::current().id();
        assert_eq!(pools.run(&[()], |_| std::thread::current().id()), vec![me]);
    }
}
