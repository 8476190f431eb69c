//! [`RetryPolicy`]: exponential backoff with ±20 % jitter and a cap. The one schedule behind task
//! retries, the default deadline of calls (which must outlast every retry a task may make) and
//! both reconnect loops (the client's and the worker's). Pure arithmetic and a random factor.

use super::trace::random_u64;
use std::time::Duration;

/// The jitter: every delay is its base × a random factor in [1 − JITTER, 1 + JITTER].
const JITTER: f64 = 0.2;

/// Delays that double from `first`, never longer than `max`, each jittered by ±20 %.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RetryPolicy {
    /// The base delay before the first retry.
    pub(crate) first: Duration,
    /// No base delay is longer.
    pub(crate) max: Duration,
}

impl RetryPolicy {
    /// Reconnecting to the broker: 100 ms, doubling, at most 2 s between attempts (so a call
    /// waiting for the broker notices it back within about 2 s).
    pub(crate) const RECONNECT: RetryPolicy = RetryPolicy {
        first: Duration::from_millis(100),
        max: Duration::from_secs(2),
    };

    /// A task's retries (`backoff = ...`).
    pub(crate) const fn task(backoff: Duration) -> RetryPolicy {
        RetryPolicy {
            first: backoff,
            max: Duration::MAX,
        }
    }

    /// The base delay before retry `n` (1-based): `first × 2^(n−1)`, capped.
    pub(crate) fn base(&self, n: u32) -> Duration {
        let doublings = n.saturating_sub(1).min(30);
        self.first.saturating_mul(1u32 << doublings).min(self.max)
    }

    /// The delay before retry `n`, jittered.
    pub(crate) fn delay(&self, n: u32) -> Duration {
        let unit = (random_u64() >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
        let factor = 1.0 - JITTER + 2.0 * JITTER * unit;
        let base = self.base(n);
        Duration::try_from_secs_f64(base.as_secs_f64() * factor).unwrap_or(base)
    }

    /// The longest [`delay`](Self::delay)`(n)` can be.
    pub(crate) fn longest(&self, n: u32) -> Duration {
        let base = self.base(n);
        Duration::try_from_secs_f64(base.as_secs_f64() * (1.0 + JITTER)).unwrap_or(Duration::MAX)
    }

    /// How long retries 1 to `n` may wait in all.
    pub(crate) fn longest_total(&self, n: u32) -> Duration {
        (1..=n.min(64))
            .map(|retry| self.longest(retry))
            .fold(Duration::ZERO, Duration::saturating_add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_within_twenty_percent_and_stop_at_the_cap() {
        let policy = RetryPolicy {
            first: Duration::from_millis(300),
            max: Duration::from_secs(2),
        };
        for (n, base_ms) in [
            (1, 300.0),
            (2, 600.0),
            (3, 1_200.0),
            (4, 2_000.0),
            (9, 2_000.0),
        ] {
            assert_eq!(policy.base(n), Duration::from_secs_f64(base_ms / 1_000.0));
            let delays: Vec<f64> = (0..2_000)
                .map(|_| policy.delay(n).as_secs_f64() * 1_000.0)
                .collect();
            let (min, max) = delays
                .iter()
                .fold((f64::MAX, f64::MIN), |(lo, hi), d| (lo.min(*d), hi.max(*d)));
            assert!(
                min >= base_ms * 0.8 - 0.001 && max <= base_ms * 1.2 + 0.001,
                "retry {n}: {min}..{max} ms, expected {base_ms} ms ± 20 %"
            );
            // The jitter spreads the delays over the whole range, not around one value.
            assert!(
                min < base_ms * 0.85 && max > base_ms * 1.15,
                "retry {n}: {min}..{max} ms"
            );
            assert!(policy.longest(n).as_secs_f64() * 1_000.0 >= max);
        }
    }

    #[test]
    fn totals_and_extremes_saturate_instead_of_overflowing() {
        let policy = RetryPolicy::task(Duration::from_millis(100));
        // 100 + 200 + 400 ms, each at most +20 %.
        assert_eq!(policy.longest_total(3), Duration::from_millis(840));
        assert_eq!(policy.longest_total(0), Duration::ZERO);
        let huge = RetryPolicy::task(Duration::MAX);
        assert_eq!(huge.base(40), Duration::MAX);
        assert_eq!(huge.longest_total(u32::MAX), Duration::MAX);
        let _ = huge.delay(u32::MAX);
    }
}
