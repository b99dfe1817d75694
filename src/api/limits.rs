//! Rate limits per identity (API key or user, else client address), one bucket per route class.
//!
//! `governor`'s GCRA: a limit of N per window lets a burst of N through, then one more request
//! every window / N. The headers say how many are left now and when the bucket is full again.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::config::RateLimitConfig;

/// Which limit a route counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    Management,
    Heavy,
    Inference,
    /// Not limited (liveness checks).
    Unlimited,
}

pub struct RateLimits {
    pub window_secs: u64,
    management: Option<Limiter>,
    heavy: Option<Limiter>,
    inference: Option<Limiter>,
}

impl RateLimits {
    pub fn new(config: &RateLimitConfig) -> Self {
        let window = Duration::from_secs(config.window_secs.max(1));
        let make = |limit: Option<u32>| limit.and_then(NonZeroU32::new).map(|n| Limiter::new(n, window));
        RateLimits {
            window_secs: window.as_secs(),
            management: make(config.management),
            heavy: make(config.heavy),
            inference: make(config.inference),
        }
    }

    /// Counts one request of `identity` against `bucket`.
    pub fn check(&self, bucket: Bucket, identity: &str) -> Option<Verdict> {
        let limiter = match bucket {
            Bucket::Management => self.management.as_ref(),
            Bucket::Heavy => self.heavy.as_ref(),
            Bucket::Inference => self.inference.as_ref(),
            Bucket::Unlimited => None,
        }?;
        Some(limiter.check(identity))
    }
}

struct Limiter {
    limit: NonZeroU32,
    /// Time for one request's allowance to come back.
    period: Duration,
    inner: DefaultKeyedRateLimiter<String, StateInformationMiddleware>,
    checks: AtomicU64,
}

/// One request's outcome and the headers that tell the client about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub limit: u32,
    pub remaining: u32,
    /// Unix time when the identity's allowance is whole again (or, when refused, when the next
    /// request is allowed).
    pub reset: u64,
    /// Refused: seconds until a request is allowed.
    pub retry_after: Option<u64>,
}

/// Every this many checks, identities whose bucket is full again are forgotten.
const PRUNE_EVERY: u64 = 4096;

impl Limiter {
    fn new(limit: NonZeroU32, window: Duration) -> Self {
        let period = (window / limit.get()).max(Duration::from_nanos(1));
        let quota = Quota::with_period(period).expect("period is positive").allow_burst(limit);
        Limiter {
            limit,
            period,
            inner: DefaultKeyedRateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>(),
            checks: AtomicU64::new(0),
        }
    }

    fn check(&self, identity: &str) -> Verdict {
        if self.checks.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            self.inner.retain_recent();
            self.inner.shrink_to_fit();
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let unix_after = |d: Duration| (now + d).as_secs_f64().ceil() as u64;
        let limit = self.limit.get();
        match self.inner.check_key(&identity.to_string()) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                Verdict { limit, remaining, reset: unix_after(self.period * (limit - remaining)), retry_after: None }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                Verdict { limit, remaining: 0, reset: unix_after(wait), retry_after: Some(secs) }
            }
        }
    }
}

impl Verdict {
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        headers.insert("x-ratelimit-limit", HeaderValue::from(self.limit));
        headers.insert("x-ratelimit-remaining", HeaderValue::from(self.remaining));
        headers.insert("x-ratelimit-reset", HeaderValue::from(self.reset));
        if let Some(s) = self.retry_after {
            headers.insert(axum::http::header::RETRY_AFTER, HeaderValue::from(s));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_past_the_limit_is_refused_per_identity_and_comes_back() {
        let config = RateLimitConfig { management: Some(3), heavy: None, inference: None, window_secs: 1 };
        let limits = RateLimits::new(&config);
        let remaining: Vec<u32> = (0..3).map(|_| limits.check(Bucket::Management, "a").unwrap().remaining).collect();
        assert_eq!(remaining, [2, 1, 0]);
        let refused = limits.check(Bucket::Management, "a").unwrap();
        assert_eq!(refused.retry_after, Some(1));
        assert_eq!(limits.check(Bucket::Management, "b").unwrap().remaining, 2, "another identity has its own");
        assert!(limits.check(Bucket::Heavy, "a").is_none(), "a limit of null is off");
        std::thread::sleep(Duration::from_millis(400));
        assert!(limits.check(Bucket::Management, "a").unwrap().retry_after.is_none(), "a third of the window later");
    }
}
