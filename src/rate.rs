//! Token buckets keyed by a string (an API key's digest, a client address): what every rate limit of the
//! service is made of: the request limit in `api::rate_limit`, the per-key limits on what costs in
//! `session::costs`.
//!
//! A bucket holds at most `burst` tokens and refills at `per_minute`; taking `n` tokens needs `n` in the
//! bucket (a request is one token, an upload one per byte). The buckets live in a map with a cap. A bucket
//! that has refilled to its burst is the same as no bucket, so those go first when the map is full; if
//! every bucket is in use (many clients at once), the least recently seen half goes, which at worst gives
//! those clients a fresh burst. Memory stays bounded either way.
//!
//! A leaf: it imports nothing of the crate.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Buckets kept at most (about 100 bytes each).
const MAX_BUCKETS: usize = 10_000;

/// A token bucket's shape: `burst` tokens at once, refilled at `per_minute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_minute: u64,
    pub burst: u64,
}

/// One bucket per key, at most [`MAX_BUCKETS`] of them.
pub struct Buckets {
    limit: RateLimit,
    /// Tokens per second.
    refill: f64,
    max_buckets: usize,
    /// Touched briefly, never across an `.await`.
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Below zero after an amount larger than the burst was taken (the key owes it).
    tokens: f64,
    /// When `tokens` was last brought up to date (also: when the client was last seen).
    at: Instant,
}

impl Buckets {
    pub fn new(limit: RateLimit) -> Self {
        Self::with_capacity(limit, MAX_BUCKETS)
    }

    fn with_capacity(limit: RateLimit, max_buckets: usize) -> Self {
        Buckets {
            limit,
            refill: limit.per_minute.max(1) as f64 / 60.0,
            max_buckets: max_buckets.max(2),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Takes `amount` tokens from `key`'s bucket, or says how long until they are there. An amount larger
    /// than the burst is taken from a full bucket (the bucket then owes the rest), so it waits, but passes.
    pub fn take(&self, key: &str, amount: u64, now: Instant) -> Result<(), Duration> {
        let burst = self.limit.burst as f64;
        let amount = amount as f64;
        let needed = amount.min(burst);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if !buckets.contains_key(key) && buckets.len() >= self.max_buckets {
            self.evict(&mut buckets, now);
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket { tokens: burst, at: now });
        bucket.tokens = self.tokens_at(bucket, now);
        bucket.at = now;
        if bucket.tokens >= needed {
            bucket.tokens -= amount;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((needed - bucket.tokens) / self.refill))
        }
    }

    /// Gives back tokens taken for something that did not happen (an upload that moved fewer bytes than
    /// it announced), never beyond the burst.
    pub fn give_back(&self, key: &str, amount: u64, now: Instant) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bucket) = buckets.get_mut(key) {
            bucket.tokens = (self.tokens_at(bucket, now) + amount as f64).min(self.limit.burst as f64);
            bucket.at = now;
        }
    }

    fn tokens_at(&self, bucket: &Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        (bucket.tokens + elapsed * self.refill).min(self.limit.burst as f64)
    }

    /// Drops the buckets that are full again; if that is not enough, the least recently seen half.
    fn evict(&self, buckets: &mut HashMap<String, Bucket>, now: Instant) {
        let burst = self.limit.burst as f64;
        buckets.retain(|_, b| self.tokens_at(b, now) < burst);
        if buckets.len() >= self.max_buckets {
            let mut seen: Vec<Instant> = buckets.values().map(|b| b.at).collect();
            seen.sort_unstable();
            let cutoff = seen[seen.len() / 2];
            buckets.retain(|_, b| b.at > cutoff);
        }
        tracing::debug!(buckets = buckets.len(), "rate limiter: evicted idle buckets");
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.lock().unwrap().len()
    }
}

/// Whole seconds to tell a client to wait (`Retry-After`): rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buckets(per_minute: u64, burst: u64) -> Buckets {
        Buckets::new(RateLimit { per_minute, burst })
    }

    #[test]
    fn a_burst_passes_then_the_next_request_waits_for_a_token() {
        let l = buckets(60, 3);
        let t = Instant::now();
        for _ in 0..3 {
            l.take("a", 1, t).unwrap();
        }
        let wait = l.take("a", 1, t).unwrap_err();
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1), "{wait:?}");
        assert!(l.take("a", 1, t + Duration::from_millis(500)).is_err());
        l.take("a", 1, t + Duration::from_millis(1001)).unwrap();
    }

    #[test]
    fn each_key_has_its_own_bucket() {
        let l = buckets(60, 1);
        let t = Instant::now();
        l.take("a", 1, t).unwrap();
        assert!(l.take("a", 1, t).is_err());
        l.take("b", 1, t).unwrap();
    }

    #[test]
    fn tokens_never_pile_up_beyond_the_burst() {
        let l = buckets(600, 2);
        let t = Instant::now();
        l.take("a", 1, t).unwrap();
        let later = t + Duration::from_secs(3600);
        l.take("a", 1, later).unwrap();
        l.take("a", 1, later).unwrap();
        assert!(l.take("a", 1, later).is_err());
    }

    #[test]
    fn amounts_are_taken_whole_and_the_wait_is_for_the_whole_amount() {
        // 60 MiB a minute: 1 MiB a second.
        let l = buckets(60 << 20, 100 << 20);
        let t = Instant::now();
        l.take("a", 70 << 20, t).unwrap();
        let wait = l.take("a", 40 << 20, t).unwrap_err();
        assert_eq!(retry_after_secs(wait), 10, "30 MiB are left, 10 more to come at 1 MiB/s");
        l.take("a", 30 << 20, t).unwrap();
        l.take("a", 10 << 20, t + Duration::from_secs(10)).unwrap();
    }

    #[test]
    fn what_did_not_happen_is_given_back_up_to_the_burst() {
        let l = buckets(60, 10);
        let t = Instant::now();
        l.take("a", 10, t).unwrap();
        assert!(l.take("a", 1, t).is_err());
        l.give_back("a", 4, t);
        l.take("a", 4, t).unwrap();
        assert!(l.take("a", 1, t).is_err());
        l.give_back("a", 1000, t);
        l.take("a", 10, t).unwrap();
        assert!(l.take("a", 1, t).is_err(), "no more than the burst came back");
    }

    #[test]
    fn an_amount_over_the_burst_waits_for_a_full_bucket_then_leaves_a_debt() {
        let l = buckets(60, 10);
        let t = Instant::now();
        l.take("a", 1, t).unwrap();
        assert!(l.take("a", 25, t).is_err(), "a full bucket is needed first");
        l.take("a", 25, t + Duration::from_secs(1)).unwrap();
        let wait = l.take("a", 1, t + Duration::from_secs(1)).unwrap_err();
        assert_eq!(retry_after_secs(wait), 16, "15 tokens owed, then one");
    }

    #[test]
    fn the_map_stays_bounded_even_when_every_client_is_new() {
        let l = Buckets::with_capacity(RateLimit { per_minute: 60, burst: 2 }, 100);
        let t = Instant::now();
        for i in 0..10_000 {
            l.take(&format!("c{i}"), 1, t + Duration::from_micros(i)).unwrap();
            assert!(l.len() <= 100);
        }
    }

    #[test]
    fn buckets_that_refilled_are_evicted_before_busy_ones() {
        let l = Buckets::with_capacity(RateLimit { per_minute: 60, burst: 2 }, 4);
        let t = Instant::now();
        l.take("busy", 1, t).unwrap();
        l.take("busy", 1, t).unwrap();
        l.take("idle0", 1, t).unwrap();
        l.take("idle1", 1, t).unwrap();
        // 1.5 s on, the idle buckets are full again (1 + 1.5, capped at 2); "busy" has 1.5 tokens.
        let later = t + Duration::from_millis(1500);
        l.take("new0", 1, later).unwrap();
        l.take("new1", 1, later).unwrap();
        assert_eq!(l.len(), 3, "the two refilled buckets made room");
        l.take("busy", 1, later).unwrap();
        assert!(l.take("busy", 1, later).is_err(), "the busy client kept its (nearly empty) bucket");
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_never_zero() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(7)), 7);
    }
}
