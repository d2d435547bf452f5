//! Per-client rate limit on new WHEP sessions: a token bucket per address, time passed in.
//!
//! IPv6 clients are keyed by their /64, since one host commonly owns a whole /64. The table is
//! bounded: when full, buckets that have refilled completely (idle clients) are dropped first,
//! and if none have, new clients share one overflow bucket rather than grow memory.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

/// Buckets kept at most.
const MAX_CLIENTS: usize = 100_000;

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets for new sessions per client.
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: HashMap<IpAddr, Bucket>,
    overflow: Option<Bucket>,
}

impl RateLimiter {
    /// `per_minute` sessions per minute sustained, `burst` at once.
    pub fn new(per_minute: u32, burst: u32) -> Self {
        Self {
            per_second: f64::from(per_minute) / 60.0,
            burst: f64::from(burst.max(1)),
            buckets: HashMap::new(),
            overflow: None,
        }
    }

    /// Changes the rates (on reload); clients keep the tokens they have, up to the new burst.
    pub fn reconfigure(&mut self, per_minute: u32, burst: u32) {
        self.per_second = f64::from(per_minute) / 60.0;
        self.burst = f64::from(burst.max(1));
    }

    /// Takes one token for `ip`; false means "too many requests".
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        let key = key(ip);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= MAX_CLIENTS {
            self.evict(now);
        }
        let (per_second, burst) = (self.per_second, self.burst);
        let bucket = if self.buckets.len() < MAX_CLIENTS || self.buckets.contains_key(&key) {
            self.buckets.entry(key).or_insert(Bucket {
                tokens: burst,
                at: now,
            })
        } else {
            self.overflow.get_or_insert(Bucket {
                tokens: burst,
                at: now,
            })
        };
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * per_second).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Seconds until `ip` may start another session.
    pub fn retry_after(&self, ip: IpAddr) -> u64 {
        let tokens = self.buckets.get(&key(ip)).map_or(0.0, |b| b.tokens);
        if self.per_second <= 0.0 {
            return 60;
        }
        ((1.0 - tokens).max(0.0) / self.per_second).ceil() as u64
    }

    fn evict(&mut self, now: Instant) {
        let (per_second, burst) = (self.per_second, self.burst);
        self.buckets.retain(|_, b| {
            let refilled =
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_second;
            refilled < burst
        });
    }

    /// Clients tracked now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// True when no client is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let mut o = v6.octets();
            o[8..].fill(0);
            IpAddr::V6(o.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_sustained_rate() {
        let mut rl = RateLimiter::new(60, 3);
        let t0 = Instant::now();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(rl.allow(ip, t0) && rl.allow(ip, t0) && rl.allow(ip, t0));
        assert!(!rl.allow(ip, t0), "burst exhausted");
        assert_eq!(rl.retry_after(ip), 1);
        assert!(!rl.allow(ip, t0 + Duration::from_millis(500)));
        assert!(
            rl.allow(ip, t0 + Duration::from_millis(1600)),
            "one per second refills"
        );
        // Another client is unaffected.
        assert!(rl.allow("192.0.2.2".parse().unwrap(), t0));
    }

    #[test]
    fn ipv6_shares_a_bucket_per_slash_64() {
        let mut rl = RateLimiter::new(60, 1);
        let t0 = Instant::now();
        assert!(rl.allow("2001:db8:1:2::1".parse().unwrap(), t0));
        assert!(!rl.allow("2001:db8:1:2::ffff".parse().unwrap(), t0));
        assert!(rl.allow("2001:db8:1:3::1".parse().unwrap(), t0));
        // A v4-mapped address is the v4 client.
        assert!(rl.allow("198.51.100.1".parse().unwrap(), t0));
        assert!(!rl.allow("::ffff:198.51.100.1".parse().unwrap(), t0));
    }

    #[test]
    fn memory_stays_bounded() {
        let mut rl = RateLimiter::new(60, 5);
        let t0 = Instant::now();
        for i in 0..(MAX_CLIENTS as u32 + 5_000) {
            rl.allow(IpAddr::V4(i.into()), t0);
        }
        assert!(rl.len() <= MAX_CLIENTS);
        // Later, idle clients are evicted to make room for new ones.
        let later = t0 + Duration::from_secs(60);
        assert!(rl.allow("203.0.113.7".parse().unwrap(), later));
        assert!(rl.len() < MAX_CLIENTS);
    }
}
