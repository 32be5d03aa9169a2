//! Where the host's time goes in a loader call: what a user tuning the
//! staging ring, or choosing between a mapped and a page-locked delta,
//! needs to see.

use std::time::{Duration, Instant};

/// The host's time in the last loader call, by phase, summed over its
/// batches ([`super::Loader::last_timings`]). A phase that the device's work
/// hides costs nothing but CPU; `slot_waits` and `device_wait` are the time
/// the host spent waiting for the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadTimings {
    /// Before any batch: checking the call's inputs, allocating its outputs
    /// and queueing the copies of the base into them.
    pub setup: Duration,
    /// Checking the chunk checksums left to the loader
    /// ([`super::Checksums::OnUpload`]) and reading a byte of every page of
    /// other stored bytes that are not page-locked, in one parallel pass,
    /// so that a fresh map faults on every thread at once.
    pub checksums: Duration,
    /// Placing each batch's streams in a slot.
    pub planning: Duration,
    /// Waiting for a slot's last upload to finish before reusing it.
    pub slot_waits: Duration,
    /// The CPU's work on each batch: decoding zstd streams, and copying
    /// stored bytes into the page-locked slot when the delta is not
    /// page-locked itself.
    pub staging: Duration,
    /// Writing descriptor tables and queueing the copies and kernels.
    pub queueing: Duration,
    /// The end of the call: queueing the digest passes and waiting for the
    /// device to finish.
    pub device_wait: Duration,
    /// Batches run.
    pub batches: usize,
    /// Chunks whose leaf digest terms the apply kernels computed as they
    /// wrote them (dense chunks): the digest pass read only their last 1 KiB.
    pub hashed_by_apply: usize,
}

impl LoadTimings {
    /// The sum of the phases.
    #[must_use]
    pub fn total(&self) -> Duration {
        self.setup + self.checksums + self.planning + self.slot_waits + self.staging + self.queueing + self.device_wait
    }

    /// Adds the time since `*since` to `phase` and restarts the clock.
    pub(super) fn lap(phase: &mut Duration, since: &mut Instant) {
        let now = Instant::now();
        *phase += now - *since;
        *since = now;
    }
}

impl std::fmt::Display for LoadTimings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        write!(
            f,
            "{} batches: setup {:.2} ms, checksums {:.2} ms, planning {:.2} ms, slot waits {:.2} ms, staging {:.2} ms, queueing \
             {:.2} ms, device wait {:.2} ms; {} chunks hashed by the apply kernels",
            self.batches,
            ms(self.setup),
            ms(self.checksums),
            ms(self.planning),
            ms(self.slot_waits),
            ms(self.staging),
            ms(self.queueing),
            ms(self.device_wait),
            self.hashed_by_apply
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Laps add up phase by phase, the total is their sum, and the line a
    /// benchmark prints names every phase with its time.
    #[test]
    fn laps_add_up_and_every_phase_is_printed() {
        let ms = Duration::from_millis;
        let mut t = LoadTimings {
            setup: ms(1),
            checksums: ms(2),
            device_wait: ms(7),
            batches: 3,
            hashed_by_apply: 8,
            ..LoadTimings::default()
        };
        let mut clock = Instant::now().checked_sub(ms(3)).expect("a clock 3 ms past its start");
        LoadTimings::lap(&mut t.planning, &mut clock);
        assert!(t.planning >= ms(3) && clock.elapsed() < ms(3), "{t:?}");
        t.planning = ms(3);
        (t.slot_waits, t.staging, t.queueing) = (ms(4), ms(5), ms(6));
        assert_eq!(t.total(), ms(28));
        let line = t.to_string();
        for phase in [
            "3 batches",
            "setup 1.00",
            "checksums 2.00",
            "planning 3.00",
            "slot waits 4.00",
            "staging 5.00",
            "queueing 6.00",
            "device wait 7.00",
            "8 chunks hashed",
        ] {
            assert!(line.contains(phase), "{phase:?} missing from {line:?}");
        }
    }
}
