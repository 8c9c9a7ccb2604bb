//! Where a tool's time goes (`--profile` of `qat-distill`, `qat-sample`, `qat-eval`): the wall
//! time of each phase of a step (a training step, a batch of sequences), with the device
//! synchronized before and after the phase, so that asynchronous work (CUDA kernels queued by
//! the phase) is charged to the phase that queued it. Each tool names its phases.
//!
//! The synchronizations remove the overlap between the host queuing work and the device running
//! it, so a profiled run is a little slower than a plain one: measure speed without `--profile`,
//! and read the profile for the shares. Phases timed on several threads at once (the parts of a
//! micro-batch with `--data-parallel` on the CPU) add up thread-seconds. The first step of a
//! process is not counted: it holds one-time costs (cuBLAS handles, kernel loading, the
//! allocator's growth).

use candle_core::Device;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

/// Accumulated phase times of the profiled steps; a disabled profile times nothing and costs
/// nothing.
#[derive(Debug)]
pub struct StepProfile {
    device: Option<Device>,
    /// The phases, in step order.
    phases: &'static [&'static str],
    counts: Mutex<Counts>,
}

/// What the counted steps (all after the first) add up to.
#[derive(Debug, Default)]
struct Counts {
    /// The end of the first step and of the latest one; `None` during the first step, which
    /// is not counted.
    span: Option<(Instant, Instant)>,
    seconds: BTreeMap<&'static str, f64>,
    steps: u64,
}

/// The profile in the JSON summary: seconds per phase over `steps` steps, and the steps' wall
/// time (phases and what lies between them, such as the progress bar).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProfileSummary {
    pub steps: u64,
    pub wall_s: f64,
    pub phases: BTreeMap<&'static str, f64>,
}

impl StepProfile {
    /// A profile that times nothing.
    pub fn disabled() -> Self {
        Self::with_device(None, &[])
    }

    /// A profile of steps on `device`, with these phases (in step order).
    pub fn new(device: &Device, phases: &'static [&'static str]) -> Self {
        Self::with_device(Some(device.clone()), phases)
    }

    /// [`Self::new`] when `enabled`, else [`Self::disabled`].
    pub fn new_if(enabled: bool, device: &Device, phases: &'static [&'static str]) -> Self {
        if enabled {
            Self::new(device, phases)
        } else {
            Self::disabled()
        }
    }

    fn with_device(device: Option<Device>, phases: &'static [&'static str]) -> Self {
        Self {
            device,
            phases,
            counts: Mutex::default(),
        }
    }

    /// Runs `f` as `phase` (one of the profile's phases), timing it when the profile is enabled.
    pub fn time<T, E: From<candle_core::Error>>(
        &self,
        phase: &'static str,
        f: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let Some(dev) = &self.device else {
            return f();
        };
        debug_assert!(self.phases.contains(&phase), "unknown phase {phase}");
        dev.synchronize()?;
        let started = Instant::now();
        let out = f()?;
        dev.synchronize()?;
        let elapsed = started.elapsed().as_secs_f64();
        let mut counts = self.counts.lock().expect("profile lock");
        if counts.span.is_some() {
            *counts.seconds.entry(phase).or_default() += elapsed;
        }
        Ok(out)
    }

    /// Marks the end of a step: the steps after the first are counted.
    pub fn end_step(&self) {
        if self.device.is_none() {
            return;
        }
        let now = Instant::now();
        let mut counts = self.counts.lock().expect("profile lock");
        counts.span = Some(match counts.span {
            Some((first, _)) => {
                counts.steps += 1;
                (first, now)
            }
            None => (now, now),
        });
    }

    /// The counted steps' phase times (every phase named, 0 when it did not run) and wall time
    /// (from the end of the first step to the end of the last); `None` when disabled.
    pub fn summary(&self) -> Option<ProfileSummary> {
        self.device.as_ref()?;
        let counts = self.counts.lock().expect("profile lock");
        Some(ProfileSummary {
            steps: counts.steps,
            wall_s: counts
                .span
                .map_or(0.0, |(first, last)| (last - first).as_secs_f64()),
            phases: self
                .phases
                .iter()
                .map(|p| (*p, counts.seconds.get(p).copied().unwrap_or(0.0)))
                .collect(),
        })
    }
}

impl ProfileSummary {
    /// One line for stderr: each phase's share of the phases' total, largest first. (The
    /// total exceeds the wall time when parts of a micro-batch run on several threads.)
    pub fn line(&self, unit: &str) -> String {
        let mut phases: Vec<_> = self.phases.iter().filter(|(_, s)| **s > 0.0).collect();
        phases.sort_by(|a, b| b.1.total_cmp(a.1));
        let total: f64 = self.phases.values().sum();
        let shares: Vec<String> = phases
            .iter()
            .map(|(p, s)| format!("{p} {:.1}% ({s:.3} s)", 100.0 * **s / total.max(1e-12)))
            .collect();
        format!(
            "profile of {} {unit}: {:.3} s wall, {:.3} s in phases: {}",
            self.steps,
            self.wall_s,
            total,
            shares.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Result<T> = candle_core::Result<T>;
    const PHASES: &[&str] = &["student_forward", "backward", "teacher_forward"];

    #[test]
    fn the_first_step_is_not_counted_and_every_phase_is_named() -> Result<()> {
        let p = StepProfile::new(&Device::Cpu, PHASES);
        let sleep = |ms| -> Result<()> {
            std::thread::sleep(std::time::Duration::from_millis(ms));
            Ok(())
        };
        p.time("teacher_forward", || sleep(1))?; // the first step: not counted
        p.end_step();
        for _ in 0..2 {
            p.time("student_forward", || sleep(10))?;
            p.time("backward", || sleep(40))?;
            p.end_step();
        }
        let s = p.summary().unwrap();
        assert_eq!(s.steps, 2);
        assert_eq!(s.phases.len(), 3);
        // Sleeps last at least as long as asked (longer on a loaded machine).
        assert!(s.phases["student_forward"] >= 0.020, "{s:?}");
        assert!(s.phases["backward"] >= 0.080, "{s:?}");
        assert_eq!(
            s.phases["teacher_forward"], 0.0,
            "the first step is not counted"
        );
        assert!(
            s.line("steps").starts_with("profile of 2 steps: "),
            "{}",
            s.line("steps")
        );
        assert!(
            s.line("steps").contains("s in phases: backward "),
            "{}",
            s.line("steps")
        );
        Ok(())
    }

    #[test]
    fn a_disabled_profile_runs_the_phase_and_reports_nothing() -> Result<()> {
        let p = StepProfile::disabled();
        assert_eq!(p.time("loss", || Result::Ok(7))?, 7);
        p.end_step();
        assert!(p.summary().is_none());
        Ok(())
    }
}
