//! Exponential backoff with jitter, the one pause schedule every retry loop uses: the
//! runtime's redelivery pause, reconnects and connect retries in the backends.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Pauses that double from `base` up to `max`, each drawn at random from the upper half
/// of its step, so clients cut off together do not come back in lockstep.
///
/// ```
/// use std::time::Duration;
/// use switchyard_core::backend::Backoff;
///
/// let backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
/// let third = backoff.pause(3); // the step is 200 ms
/// assert!(third >= Duration::from_millis(100) && third <= Duration::from_millis(200));
/// let mut pauses = backoff.pauses();
/// assert!(pauses.next().unwrap() <= Duration::from_millis(50));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
}

impl Backoff {
    /// Steps of `base`, `2·base`, `4·base`… capped at `max`.
    pub const fn new(base: Duration, max: Duration) -> Self {
        Self { base, max }
    }

    /// The pause before try number `attempt + 1`: attempt 1 waits about `base`, each
    /// later one twice the last, never more than `max`. Zero when `base` is zero.
    pub fn pause(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let step = self.base.saturating_mul(1 << exp).min(self.max);
        step.mul_f64(0.5 + 0.5 * random_fraction())
    }

    /// The pauses for attempts 1, 2, 3… as an endless iterator.
    pub fn pauses(self) -> impl Iterator<Item = Duration> {
        (1u32..).map(move |attempt| self.pause(attempt))
    }
}

/// A number in [0, 1). Jitter needs no quality, and every `RandomState` is keyed
/// afresh, so hashing nothing with one gives new bits without a dependency.
fn random_fraction() -> f64 {
    let bits = RandomState::new().build_hasher().finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn pauses_double_to_the_ceiling_within_the_upper_half() {
        let b = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        let pauses: Vec<Duration> = b.pauses().take(8).collect();
        let steps = [50, 100, 200, 400, 800, 1000, 1000, 1000];
        for (pause, ms) in pauses.iter().zip(steps) {
            let step = Duration::from_millis(ms);
            assert!(*pause >= step / 2 && *pause <= step, "{pauses:?}");
        }
        assert!(b.pause(u32::MAX) <= Duration::from_secs(1));
    }

    #[test]
    fn pauses_are_jittered() {
        let b = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        let spread: HashSet<Duration> = (0..16).map(|_| b.pause(1)).collect();
        assert!(spread.len() > 1, "no jitter: {spread:?}");
    }

    #[test]
    fn a_zero_base_never_waits() {
        let b = Backoff::new(Duration::ZERO, Duration::from_secs(1));
        assert_eq!(b.pause(5), Duration::ZERO);
    }
}
