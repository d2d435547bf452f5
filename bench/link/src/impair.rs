//! A seeded network impairment model, pure: given a packet and the time it was sent, when
//! (if ever, and how many times) is it delivered?
//!
//! Delay with uniform jitter, independent loss or Gilbert-Elliott burst loss, reordering
//! (an extra delay for a share of packets), duplication, and scheduled cuts. The same seed
//! gives the same decisions, so runs repeat.

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
            seen: 0,
            dropped: 0,
        }
    }

    /// Delivery delays for a packet sent at `elapsed` since the start: empty if dropped,
    /// two entries if duplicated.
    pub fn decide(&mut self, elapsed: Duration) -> Vec<Duration> {
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
        let first = one_delay(p, &mut self.rng);
        if self.rng.random_bool(p.duplicate.clamp(0.0, 1.0)) {
            vec![first, one_delay(p, &mut self.rng)]
        } else {
            vec![first]
        }
    }
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
                .map(|k| i.decide(Duration::from_millis(k)))
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
            for d in i.decide(Duration::from_micros(k)) {
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
            if i.decide(t).is_empty() {
                run += 1;
            } else if run > 0 {
                runs.push(run);
                run = 0;
            }
        }
        let mean = runs.iter().sum::<u64>() as f64 / runs.len() as f64;
        assert!(mean > 2.0, "losses come in bursts (mean run {mean})");
        assert!(i.decide(Duration::from_millis(5500)).is_empty());
    }
}
