//! A seeded network impairment model, pure: given a packet and the time it was sent, when
//! (if ever, and how many times) is it delivered?
//!
//! Delay with uniform jitter, independent loss or Gilbert-Elliott burst loss, reordering
//! (an extra delay for a share of packets), duplication, scheduled cuts, and a bottleneck
//! (a rate limit with a drop-tail queue for a while). The same seed gives the same decisions,
//! so runs repeat.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What the link does to packets in one direction.
#[derive(Debug, Clone, Default)]
pub struct Profile {
    /// One-way base delay.
    pub delay: Duration,
    /// Uniform extra delay in `0..=jitter`.
    pub jitter: Duration,
    /// Probability of loss in the good state (independent loss when `burst` is `None`).
    pub loss: f64,
    /// Gilbert-Elliott burst loss: (P(good→bad), P(bad→good), loss in the bad state).
    pub burst: Option<(f64, f64, f64)>,
    /// Share of packets delayed by an extra `reorder_delay` (so later ones overtake them).
    pub reorder: f64,
    /// Extra delay of reordered packets.
    pub reorder_delay: Duration,
    /// Probability that a packet is delivered twice.
    pub duplicate: f64,
    /// Windows (from, to) since the start during which nothing gets through.
    pub cuts: Vec<(Duration, Duration)>,
    /// A narrower path for a while: the sender then offers more than gets through.
    pub bottleneck: Option<Bottleneck>,
}

/// A rate limit with a drop-tail queue in front of it, like a congested router.
#[derive(Debug, Clone)]
pub struct Bottleneck {
    /// Capacity of the path, in bytes (of UDP payload) per second.
    pub bytes_per_sec: u64,
    /// Bytes the queue holds; a packet that would overflow it is dropped.
    pub queue_bytes: u64,
    /// When the limit applies (since the start). Packets still queued when it ends drain
    /// at the same rate, so the end of the window does not reorder them.
    pub during: (Duration, Duration),
}

impl Profile {
    /// A path with `rtt` round trip (half each way) and `loss` independent loss.
    pub fn rtt_loss(rtt: Duration, loss: f64) -> Self {
        Self {
            delay: rtt / 2,
            loss,
            ..Self::default()
        }
    }
}

/// The impairment state of one direction.
pub struct Impairment {
    profile: Profile,
    rng: StdRng,
    bad: bool,
    /// When the bottleneck finishes sending what it has queued (since the start).
    busy_until: Duration,
    /// Packets seen and dropped, for reports.
    pub seen: u64,
    /// Packets dropped.
    pub dropped: u64,
}

impl Impairment {
    /// A direction with `profile`, decisions drawn from `seed`.
    pub fn new(profile: Profile, seed: u64) -> Self {
        Self {
            profile,
            rng: StdRng::seed_from_u64(seed),
            bad: false,
            busy_until: Duration::ZERO,
            seen: 0,
            dropped: 0,
        }
    }

    /// Delivery delays for a packet of `len` bytes sent at `elapsed` since the start: empty
    /// if dropped, two entries if duplicated.
    pub fn decide(&mut self, elapsed: Duration, len: usize) -> Vec<Duration> {
        self.seen += 1;
        let p = &self.profile;
        if p.cuts.iter().any(|(a, b)| (*a..*b).contains(&elapsed)) {
            self.dropped += 1;
            return Vec::new();
        }
        let loss = match p.burst {
            Some((to_bad, to_good, bad_loss)) => {
                let flip = if self.bad { to_good } else { to_bad };
                if self.rng.random_bool(flip.clamp(0.0, 1.0)) {
                    self.bad = !self.bad;
                }
                if self.bad {
                    bad_loss
                } else {
                    p.loss
                }
            }
            None => p.loss,
        };
        if self.rng.random_bool(loss.clamp(0.0, 1.0)) {
            self.dropped += 1;
            return Vec::new();
        }
        let queued = match &p.bottleneck {
            Some(b) => match queue(b, &mut self.busy_until, elapsed, len) {
                Some(wait) => wait,
                None => {
                    self.dropped += 1;
                    return Vec::new();
                }
            },
            None => Duration::ZERO,
        };
        let first = queued + one_delay(p, &mut self.rng);
        if self.rng.random_bool(p.duplicate.clamp(0.0, 1.0)) {
            vec![first, queued + one_delay(p, &mut self.rng)]
        } else {
            vec![first]
        }
    }
}

/// Time a packet of `len` bytes arriving at `now` spends in the bottleneck (queueing and
/// serialisation), or `None` if the queue is full. `busy_until` is the bottleneck's state.
fn queue(b: &Bottleneck, busy_until: &mut Duration, now: Duration, len: usize) -> Option<Duration> {
    let (from, to) = b.during;
    if !(from..to).contains(&now) && now >= *busy_until {
        return Some(Duration::ZERO);
    }
    let start = now.max(*busy_until);
    let backlog = (start - now).as_secs_f64() * b.bytes_per_sec as f64;
    if backlog + len as f64 > b.queue_bytes as f64 {
        return None;
    }
    *busy_until = start + Duration::from_secs_f64(len as f64 / b.bytes_per_sec as f64);
    Some(*busy_until - now)
}

fn one_delay(p: &Profile, rng: &mut StdRng) -> Duration {
    let jitter = if p.jitter.is_zero() {
        Duration::ZERO
    } else {
        p.jitter.mul_f64(rng.random::<f64>())
    };
    let reorder = if rng.random_bool(p.reorder.clamp(0.0, 1.0)) {
        p.reorder_delay
    } else {
        Duration::ZERO
    };
    p.delay + jitter + reorder
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_decisions() {
        let p = Profile {
            delay: Duration::from_millis(25),
            jitter: Duration::from_millis(10),
            loss: 0.05,
            duplicate: 0.01,
            reorder: 0.02,
            reorder_delay: Duration::from_millis(30),
            ..Profile::default()
        };
        let run = |seed| {
            let mut i = Impairment::new(p.clone(), seed);
            (0..1000)
                .map(|k| i.decide(Duration::from_millis(k), 100))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn loss_rate_and_delay_bounds() {
        let mut i = Impairment::new(
            Profile {
                delay: Duration::from_millis(50),
                jitter: Duration::from_millis(20),
                loss: 0.05,
                ..Profile::default()
            },
            1,
        );
        let mut delivered = 0;
        for k in 0..100_000 {
            for d in i.decide(Duration::from_micros(k), 100) {
                assert!((Duration::from_millis(50)..=Duration::from_millis(70)).contains(&d));
                delivered += 1;
            }
        }
        let loss = 1.0 - f64::from(delivered) / 100_000.0;
        assert!((0.045..0.055).contains(&loss), "{loss}");
        assert_eq!(i.dropped, 100_000 - u64::from(delivered as u32));
    }

    #[test]
    fn bursts_cluster_losses_and_cuts_drop_everything() {
        let mut i = Impairment::new(
            Profile {
                burst: Some((0.01, 0.2, 0.8)),
                cuts: vec![(Duration::from_secs(5), Duration::from_secs(6))],
                ..Profile::default()
            },
            3,
        );
        let mut runs = Vec::new();
        let mut run = 0;
        for k in 0..50_000u64 {
            let t = Duration::from_millis(k % 4000);
            if i.decide(t, 100).is_empty() {
                run += 1;
            } else if run > 0 {
                runs.push(run);
                run = 0;
            }
        }
        let mean = runs.iter().sum::<u64>() as f64 / runs.len() as f64;
        assert!(mean > 2.0, "losses come in bursts (mean run {mean})");
        assert!(i.decide(Duration::from_millis(5500), 100).is_empty());
    }

    #[test]
    fn a_bottleneck_delays_then_drops_and_drains_after_its_window() {
        let b = Bottleneck {
            bytes_per_sec: 10_000,
            queue_bytes: 2_000,
            during: (Duration::from_secs(1), Duration::from_secs(2)),
        };
        let mut i = Impairment::new(
            Profile {
                delay: Duration::from_millis(10),
                bottleneck: Some(b),
                ..Profile::default()
            },
            1,
        );
        let ms = Duration::from_millis;
        // Before the window: no queueing.
        assert_eq!(i.decide(ms(500), 1000), vec![ms(10)]);
        // In the window, 1000 bytes every 50 ms offered to a 10 kB/s path (500 B per 50 ms):
        // the queue grows by 50 ms per packet until 2000 bytes are waiting, then drops.
        let mut waits = Vec::new();
        let mut dropped = 0;
        for k in 0..20 {
            match i.decide(ms(1000 + 50 * k), 1000).as_slice() {
                [d] => waits.push(*d - ms(10)),
                [] => dropped += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(waits[0], ms(100), "serialisation of 1000 B at 10 kB/s");
        assert!(waits.windows(2).all(|w| w[1] >= w[0]), "FIFO: {waits:?}");
        assert!(
            waits.iter().all(|w| *w <= ms(300)),
            "bounded by the queue: {waits:?}"
        );
        assert!(
            dropped >= 8,
            "about half the offered load is dropped ({dropped})"
        );
        // Just after the window, what is queued still drains: the next packet waits.
        let after = i.decide(ms(2000), 1000);
        assert!(after[0] > ms(10), "{after:?}");
        // Long after, the path is free again.
        assert_eq!(i.decide(ms(3000), 1000), vec![ms(10)]);
    }
}
