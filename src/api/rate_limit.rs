//! The request limit, off by default: one token bucket ([`crate::rate::Buckets`]) per API key (per client
//! address when no keys are configured), checked by the auth middleware once the key is known to be
//! valid, so that a stranger's requests never spend a real key's budget. What costs the service (creates,
//! installs, upload bytes) has limits of its own, per key and on by default (`session::costs`); this one
//! is for an operator who also wants every request counted.

use std::net::IpAddr;
use std::time::Instant;

use axum::http::StatusCode;

use crate::error::ApiError;
use crate::rate::{Buckets, RateLimit, retry_after_secs};

/// The request limit's buckets.
pub struct RateLimiter {
    buckets: Buckets,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        RateLimiter { buckets: Buckets::new(limit) }
    }

    /// Spends a request of `bucket`'s, or says why not: a 429 naming the limit (`who`: the API key or
    /// the client address) and when to retry.
    pub fn check(&self, bucket: &str, who: &str, now: Instant) -> Result<(), ApiError> {
        self.buckets.take(bucket, 1, now).map_err(|wait| {
            let limit = self.buckets.limit();
            metrics::counter!("kernelbox_rate_limited_total", "limit" => "requests").increment(1);
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "too many requests: at most {} a minute (bursts of {}) per {who} (the request limit); retry \
                     after {} s",
                    limit.per_minute,
                    limit.burst,
                    retry_after_secs(wait)
                ),
            )
            .retry_after(wait)
        })
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
    use axum::http::header;

    #[test]
    fn a_request_over_the_limit_is_a_429_that_names_the_limit_and_says_when_to_retry() {
        let l = RateLimiter::new(RateLimit { per_minute: 6, burst: 1 });
        let t = Instant::now();
        l.check("key:a", "API key", t).unwrap();
        let refused = l.check("key:a", "API key", t).unwrap_err();
        assert!(refused.message.contains("at most 6 a minute (bursts of 1) per API key"), "{}", refused.message);
        let refused = axum::response::IntoResponse::into_response(refused);
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.headers()[header::RETRY_AFTER], "10");
        l.check("key:b", "API key", t).unwrap();
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
