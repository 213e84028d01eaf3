//! What costs the service, limited per API key: session creates (every API's, the compatibility APIs'
//! one-shot executions and MCP's included), package installs, and the bytes clients upload. Executes,
//! reads and lists are not limited here: an execution already waits in its session's one-at-a-time
//! queue, within the session quota.
//!
//! Each limit is a token bucket per owner ([`crate::rate::Buckets`]); one that is met is [`Limited`],
//! which names the limit and says when to retry. An upload of unknown size reserves the upload limit's
//! worth and gets back what it did not move ([`UploadCharge`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};

use crate::config::CostLimits;
use crate::rate::{Buckets, RateLimit, retry_after_secs};

use super::model::Owner;

/// A limit of what costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Creates,
    Installs,
    UploadBytes,
}

impl Limit {
    /// What the limit counts, as a client reads it.
    pub fn name(self) -> &'static str {
        match self {
            Limit::Creates => "session creates",
            Limit::Installs => "package installs",
            Limit::UploadBytes => "upload bytes",
        }
    }

    /// The label of the limit in metrics and error codes.
    pub fn label(self) -> &'static str {
        match self {
            Limit::Creates => "creates",
            Limit::Installs => "installs",
            Limit::UploadBytes => "upload_bytes",
        }
    }
}

/// A limit was met: which, how it is set, and how long until the request would pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Limited {
    pub limit: Limit,
    pub rate: RateLimit,
    pub retry_after: Duration,
}

impl std::fmt::Display for Limited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (per_minute, burst) = match self.limit {
            Limit::UploadBytes => {
                (format!("{} MiB", self.rate.per_minute >> 20), format!("{} MiB", self.rate.burst >> 20))
            }
            _ => (self.rate.per_minute.to_string(), self.rate.burst.to_string()),
        };
        write!(
            f,
            "too many {} for this API key: at most {per_minute} a minute (bursts of {burst}); retry after {} s",
            self.limit.name(),
            retry_after_secs(self.retry_after)
        )
    }
}

impl std::error::Error for Limited {}

/// The per-owner buckets of each limit that is on.
pub struct Costs {
    creates: Option<Buckets>,
    installs: Option<Buckets>,
    /// Shared with the [`UploadCharge`]s under way, which give back what they did not move.
    upload_bytes: Option<Arc<Buckets>>,
}

impl Costs {
    pub fn new(limits: &CostLimits) -> Self {
        Costs {
            creates: limits.creates.map(Buckets::new),
            installs: limits.installs.map(Buckets::new),
            upload_bytes: limits.upload_bytes.map(|l| Arc::new(Buckets::new(l))),
        }
    }

    /// Spends one create or one install of `owner`'s.
    pub fn spend(&self, owner: &Owner, limit: Limit) -> Result<(), Limited> {
        self.charge(owner, limit, 1)
    }

    /// Spends `amount` of `owner`'s budget for `limit` (bytes for uploads whose size is known and final;
    /// an upload still to come is [`reserve_upload`](Self::reserve_upload)).
    pub fn charge(&self, owner: &Owner, limit: Limit, amount: u64) -> Result<(), Limited> {
        let buckets = match limit {
            Limit::Creates => self.creates.as_ref(),
            Limit::Installs => self.installs.as_ref(),
            Limit::UploadBytes => self.upload_bytes.as_deref(),
        };
        match buckets {
            Some(b) => take(b, limit, owner, amount),
            None => Ok(()),
        }
    }

    /// Takes `bytes` of `owner`'s upload budget for an upload of up to that size; what the upload does not
    /// move comes back when the charge is dropped.
    pub fn reserve_upload(&self, owner: &Owner, bytes: u64) -> Result<UploadCharge, Limited> {
        if let Some(b) = &self.upload_bytes {
            take(b, Limit::UploadBytes, owner, bytes)?;
        }
        Ok(UploadCharge {
            buckets: self.upload_bytes.clone(),
            owner: owner.0.clone(),
            reserved: bytes,
            moved: Arc::new(AtomicU64::new(0)),
        })
    }
}

fn take(buckets: &Buckets, limit: Limit, owner: &Owner, amount: u64) -> Result<(), Limited> {
    buckets.take(&owner.0, amount, Instant::now()).map_err(|retry_after| {
        metrics::counter!("kernelbox_rate_limited_total", "limit" => limit.label()).increment(1);
        Limited { limit, rate: buckets.limit(), retry_after }
    })
}

/// Upload bytes taken from an owner's budget before the upload ran: when dropped, what the body did
/// not carry through [`count`](Self::count) goes back.
pub struct UploadCharge {
    buckets: Option<Arc<Buckets>>,
    owner: String,
    reserved: u64,
    /// Bytes the body has carried so far.
    moved: Arc<AtomicU64>,
}

impl UploadCharge {
    /// `body`, counting the bytes it carries against this charge.
    pub fn count<S, E>(&self, body: S) -> impl Stream<Item = Result<bytes::Bytes, E>> + Send + use<S, E>
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Send,
    {
        let moved = self.moved.clone();
        body.inspect(move |chunk| {
            if let Ok(bytes) = chunk {
                moved.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            }
        })
    }
}

impl Drop for UploadCharge {
    fn drop(&mut self) {
        let unused = self.reserved.saturating_sub(self.moved.load(Ordering::Relaxed));
        if let Some(b) = &self.buckets
            && unused > 0
        {
            b.give_back(&self.owner, unused, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(name: &str) -> Owner {
        Owner(name.into())
    }

    fn costs(creates: Option<(u64, u64)>, upload_mib: Option<(u64, u64)>) -> Costs {
        let rate = |(per_minute, burst)| RateLimit { per_minute, burst };
        Costs::new(&CostLimits {
            creates: creates.map(rate),
            installs: None,
            upload_bytes: upload_mib.map(|(m, b)| rate((m << 20, b << 20))),
        })
    }

    #[test]
    fn creates_past_the_burst_are_limited_per_key_and_the_refusal_names_the_limit() {
        let c = costs(Some((60, 2)), None);
        c.spend(&owner("a"), Limit::Creates).unwrap();
        c.spend(&owner("a"), Limit::Creates).unwrap();
        let limited = c.spend(&owner("a"), Limit::Creates).unwrap_err();
        assert_eq!(limited.limit, Limit::Creates);
        assert!(limited.retry_after > Duration::ZERO && limited.retry_after <= Duration::from_secs(1));
        assert_eq!(
            limited.to_string(),
            "too many session creates for this API key: at most 60 a minute (bursts of 2); retry after 1 s"
        );
        c.spend(&owner("b"), Limit::Creates).unwrap();
    }

    #[test]
    fn a_limit_that_is_off_never_refuses() {
        let c = costs(None, None);
        for _ in 0..10_000 {
            c.spend(&owner("a"), Limit::Creates).unwrap();
            c.spend(&owner("a"), Limit::Installs).unwrap();
            drop(c.reserve_upload(&owner("a"), 1 << 30).unwrap());
        }
    }

    #[tokio::test]
    async fn an_upload_pays_for_the_bytes_it_moved_and_gets_back_the_rest() {
        let c = costs(None, Some((60, 10)));
        // Reserved 10 MiB (an upload of unknown size), moved 3.
        let charge = c.reserve_upload(&owner("a"), 10 << 20).unwrap();
        let chunks = (0..3).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![0u8; 1 << 20])));
        let moved: Vec<_> = charge.count(futures::stream::iter(chunks)).collect().await;
        assert_eq!(moved.len(), 3);
        assert!(c.reserve_upload(&owner("a"), 1 << 20).is_err(), "the whole reservation is held while it runs");
        drop(charge);
        let _second = c.reserve_upload(&owner("a"), 7 << 20).unwrap();
        let limited = c.reserve_upload(&owner("a"), 1 << 20).err().expect("the 3 MiB moved stay spent");
        assert_eq!(limited.limit, Limit::UploadBytes);
        assert!(
            limited.to_string().contains("upload bytes for this API key: at most 60 MiB a minute (bursts of 10 MiB)")
        );
    }
}
