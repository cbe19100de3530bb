//! Reconnect delays: exponential backoff with full jitter.
//!
//! Full jitter (a delay drawn uniformly from `[0, min(cap, base * 2^n)]`) rather than a fixed
//! exponential sequence, because a fleet of devices that lost the server at the same moment must
//! not come back at the same moment. The type is pure (no clock, no I/O) and takes its random
//! number generator as a parameter so that tests can seed it.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Reconnect policy of a [`Client`](crate::Client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// The ceiling of the first retry; doubles with every failed attempt. Default 1 s.
    pub base: Duration,
    /// The largest ceiling. Default 60 s.
    pub cap: Duration,
    /// A connection that stayed up at least this long resets the backoff, so the next outage
    /// starts again from `base`. Default 30 s.
    pub stable_after: Duration,
    /// After a close with 1001 (server going away) the delay is drawn from at least
    /// `[0, going_away_spread]`, so that a restarted server is not hit by its whole fleet at once.
    /// Default 10 s.
    pub going_away_spread: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
            stable_after: Duration::from_secs(30),
            going_away_spread: Duration::from_secs(10),
        }
    }
}

/// Exponential backoff with full jitter.
///
/// `next_delay` returns a delay uniformly distributed in `[0, ceiling(n)]` where
/// `ceiling(n) = min(cap, base * 2^n)` and `n` counts the calls since the last [`reset`](Self::reset).
#[derive(Debug, Clone)]
pub struct Backoff<R = StdRng> {
    base: Duration,
    cap: Duration,
    attempt: u32,
    rng: R,
}

impl Backoff<StdRng> {
    /// A backoff seeded from the operating system.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self::with_rng(base, cap, StdRng::from_entropy())
    }
}

impl<R: Rng> Backoff<R> {
    /// A backoff drawing from `rng` (seed it in tests).
    pub fn with_rng(base: Duration, cap: Duration, rng: R) -> Self {
        Self {
            base,
            cap: cap.max(base),
            attempt: 0,
            rng,
        }
    }

    /// How many delays were handed out since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The ceiling of the next delay: `min(cap, base * 2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        1u32.checked_shl(self.attempt)
            .and_then(|factor| self.base.checked_mul(factor))
            .map_or(self.cap, |d| d.min(self.cap))
    }

    /// The next delay; advances the attempt counter.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        self.jitter(ceiling)
    }

    /// Like [`next_delay`](Self::next_delay), but the ceiling is at least `floor`: used after
    /// "server going away", when the whole fleet reconnects at once and must spread out even if
    /// each device's own backoff is still small.
    pub fn next_delay_with_floor(&mut self, floor: Duration) -> Duration {
        let ceiling = self.ceiling().max(floor);
        self.attempt = self.attempt.saturating_add(1);
        self.jitter(ceiling)
    }

    /// A delay uniformly distributed in `[0, ceiling]`, without touching the attempt counter.
    pub fn jitter(&mut self, ceiling: Duration) -> Duration {
        let max = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.rng.gen_range(0..=max))
    }

    /// Starts over from `base` (after a stable connection).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_secs(1);
    const CAP: Duration = Duration::from_secs(60);
    const MS: Duration = Duration::from_millis(1);

    fn seeded() -> Backoff {
        Backoff::with_rng(BASE, CAP, StdRng::seed_from_u64(7))
    }

    #[test]
    fn ceiling_doubles_up_to_cap() {
        let mut b = seeded();
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            ceilings.push(b.ceiling().as_secs());
            b.next_delay();
        }
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = seeded();
        for _ in 0..200 {
            assert!(b.next_delay() <= CAP);
        }
        assert_eq!(b.ceiling(), CAP);
        assert_eq!(b.attempt(), 200);
    }

    #[test]
    fn every_delay_is_within_its_ceiling() {
        let mut b = seeded();
        for _ in 0..1000 {
            let ceiling = b.ceiling();
            let d = b.next_delay();
            assert!(d <= ceiling, "{d:?} > {ceiling:?}");
            if b.attempt() > 12 {
                b.reset();
            }
        }
    }

    #[test]
    fn jitter_is_full_and_uniform() {
        // 20 000 draws under a 8 s ceiling: all in [0, 8 s], the mean near 4 s, and both ends of
        // the range reached (full jitter, not "half jitter" or a fixed exponential delay).
        let mut b = seeded();
        let ceiling = Duration::from_secs(8);
        let n = 20_000u32;
        let mut buckets = [0u32; 10];
        let mut sum = Duration::ZERO;
        for _ in 0..n {
            let d = b.jitter(ceiling);
            assert!(d <= ceiling);
            sum += d;
            let bucket = ((d.as_secs_f64() / ceiling.as_secs_f64()) * 10.0) as usize;
            buckets[bucket.min(9)] += 1;
        }
        let mean = (sum / n).as_secs_f64();
        assert!((mean - 4.0).abs() < 0.1, "mean {mean}");
        for (i, count) in buckets.iter().enumerate() {
            assert!((1700..2300).contains(count), "bucket {i}: {count}");
        }
    }

    #[test]
    fn reset_starts_over_from_base() {
        let mut b = seeded();
        for _ in 0..8 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), CAP);
        b.reset();
        assert_eq!(b.attempt(), 0);
        assert_eq!(b.ceiling(), BASE);
        assert!(b.next_delay() <= BASE);
    }

    #[test]
    fn floor_widens_the_spread_but_counts_as_an_attempt() {
        let mut b = seeded();
        let floor = Duration::from_secs(10);
        let draws: Vec<_> = (0..200)
            .map(|_| {
                b.reset();
                b.next_delay_with_floor(floor)
            })
            .collect();
        assert!(draws.iter().all(|d| *d <= floor));
        // With a 1 s base alone every draw would be <= 1 s; the floor spreads them to 10 s.
        assert!(draws.iter().filter(|d| **d > BASE).count() > 150);
        assert_eq!(b.attempt(), 1);
        // A floor below the current ceiling changes nothing.
        for _ in 0..6 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), CAP);
        assert!(b.next_delay_with_floor(floor) <= CAP);
    }

    #[test]
    fn same_seed_same_delays() {
        let (mut a, mut b) = (seeded(), seeded());
        for _ in 0..20 {
            assert_eq!(a.next_delay(), b.next_delay());
        }
    }

    #[test]
    fn cap_below_base_is_raised_to_base() {
        let b = Backoff::with_rng(BASE, Duration::ZERO, StdRng::seed_from_u64(1));
        assert_eq!(b.ceiling(), BASE);
    }

    /// Drives real (paused) timers with the delays, as the reconnect loop does: the time spent in
    /// n retries is bounded by the sum of the ceilings and the clock only moves by what was slept.
    #[tokio::test(start_paused = true)]
    async fn retries_sleep_within_bounds_in_paused_time() {
        let mut b = seeded();
        let start = tokio::time::Instant::now();
        let mut bound = Duration::ZERO;
        let mut slept = Duration::ZERO;
        for _ in 0..10 {
            bound += b.ceiling();
            let d = b.next_delay();
            let before = tokio::time::Instant::now();
            tokio::time::sleep(d).await;
            // The timer wheel has millisecond resolution and rounds up.
            let took = before.elapsed();
            assert!(took >= d && took <= d + MS, "slept {took:?} for {d:?}");
            slept += took;
        }
        assert_eq!(start.elapsed(), slept);
        assert!(slept <= bound + 10 * MS, "{slept:?} > {bound:?}");
        // 1+2+4+...+32 + 4*60 = 303 s: the bound is what the docs promise.
        assert_eq!(bound, Duration::from_secs(303));
    }
}
