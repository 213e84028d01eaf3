//! The request rate limit: one token bucket per API key (per client address when no keys are configured),
//! checked by the auth middleware once the key is known to be valid, so that a stranger's requests never
//! spend a real key's budget.
//!
//! The buckets live in a map with a cap. A bucket that has refilled to its burst is the same as no bucket,
//! so those go first when the map is full; if every bucket is in use (many clients at once), the least
//! recently seen half goes, which at worst gives those clients a fresh burst. Memory stays bounded either
//! way.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::RateLimit;

/// Buckets kept at most (about 100 bytes each).
const MAX_BUCKETS: usize = 10_000;

pub struct RateLimiter {
    limit: RateLimit,
    /// Tokens per second.
    refill: f64,
    max_buckets: usize,
    /// Touched briefly, never across an `.await`.
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    /// When `tokens` was last brought up to date (also: when the client was last seen).
    at: Instant,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        Self::with_capacity(limit, MAX_BUCKETS)
    }

    fn with_capacity(limit: RateLimit, max_buckets: usize) -> Self {
        RateLimiter {
            limit,
            refill: f64::from(limit.per_minute) / 60.0,
            max_buckets: max_buckets.max(2),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Takes a token from `key`'s bucket, or says how long until one is there.
    pub fn check(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let burst = f64::from(self.limit.burst);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if !buckets.contains_key(key) && buckets.len() >= self.max_buckets {
            self.evict(&mut buckets, now);
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket { tokens: burst, at: now });
        bucket.tokens = self.tokens_at(bucket, now);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.refill))
        }
    }

    fn tokens_at(&self, bucket: &Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        (bucket.tokens + elapsed * self.refill).min(f64::from(self.limit.burst))
    }

    /// Drops the buckets that are full again; if that is not enough, the least recently seen half.
    fn evict(&self, buckets: &mut HashMap<String, Bucket>, now: Instant) {
        let burst = f64::from(self.limit.burst);
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

/// The bucket of an unauthenticated client: its address, or its /64 for IPv6 (one host usually has a
/// whole /64, so a per-address bucket would be no limit at all).
pub fn client_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("ip:{v4}"),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("ip:{v4}"),
            None => {
                let s = v6.segments();
                format!("ip:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_minute: u32, burst: u32) -> RateLimiter {
        RateLimiter::new(RateLimit { per_minute, burst })
    }

    #[test]
    fn a_burst_passes_then_the_next_request_waits_for_a_token() {
        let l = limiter(60, 3);
        let t = Instant::now();
        for _ in 0..3 {
            l.check("a", t).unwrap();
        }
        let wait = l.check("a", t).unwrap_err();
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1), "{wait:?}");
        assert!(l.check("a", t + Duration::from_millis(500)).is_err());
        l.check("a", t + Duration::from_millis(1001)).unwrap();
    }

    #[test]
    fn each_key_has_its_own_bucket() {
        let l = limiter(60, 1);
        let t = Instant::now();
        l.check("a", t).unwrap();
        assert!(l.check("a", t).is_err());
        l.check("b", t).unwrap();
    }

    #[test]
    fn tokens_never_pile_up_beyond_the_burst() {
        let l = limiter(600, 2);
        let t = Instant::now();
        l.check("a", t).unwrap();
        let later = t + Duration::from_secs(3600);
        l.check("a", later).unwrap();
        l.check("a", later).unwrap();
        assert!(l.check("a", later).is_err());
    }

    #[test]
    fn the_map_stays_bounded_even_when_every_client_is_new() {
        let l = RateLimiter::with_capacity(RateLimit { per_minute: 60, burst: 2 }, 100);
        let t = Instant::now();
        for i in 0..10_000 {
            l.check(&format!("c{i}"), t + Duration::from_micros(i)).unwrap();
            assert!(l.len() <= 100);
        }
    }

    #[test]
    fn buckets_that_refilled_are_evicted_before_busy_ones() {
        let l = RateLimiter::with_capacity(RateLimit { per_minute: 60, burst: 2 }, 4);
        let t = Instant::now();
        l.check("busy", t).unwrap();
        l.check("busy", t).unwrap();
        l.check("idle0", t).unwrap();
        l.check("idle1", t).unwrap();
        // 1.5 s on, the idle buckets are full again (1 + 1.5, capped at 2); "busy" has 1.5 tokens.
        let later = t + Duration::from_millis(1500);
        l.check("new0", later).unwrap();
        l.check("new1", later).unwrap();
        assert_eq!(l.len(), 3, "the two refilled buckets made room");
        l.check("busy", later).unwrap();
        assert!(l.check("busy", later).is_err(), "the busy client kept its (nearly empty) bucket");
    }

    #[test]
    fn unauthenticated_clients_are_keyed_by_address_or_ipv6_prefix() {
        assert_eq!(client_key("192.0.2.7".parse().unwrap()), "ip:192.0.2.7");
        assert_eq!(client_key("::ffff:192.0.2.7".parse().unwrap()), "ip:192.0.2.7");
        assert_eq!(
            client_key("2001:db8:1:2:3:4:5:6".parse().unwrap()),
            client_key("2001:db8:1:2:ffff::1".parse().unwrap())
        );
        assert_ne!(client_key("2001:db8:1:2::1".parse().unwrap()), client_key("2001:db8:1:3::1".parse().unwrap()));
    }
}
