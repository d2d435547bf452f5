//! Frame latency from capture at the origin to arrival at a subscriber, through the proxy.

use std::time::Duration;

use bytes::Bytes;
use tern_origin_link::tls::Identity;
use tern_origin_link::wire::Frame;
use tern_origin_link::{unix_micros_now, BroadcastId, Origin, Registry, Upstream};

use crate::impair::Profile;
use crate::nft::NftLoss;

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// Frames the origin sent.
    pub sent: u64,
    /// Frames the subscriber received.
    pub received: u64,
    /// Capture → arrival latency of each received frame.
    pub latencies: Vec<Duration>,
    /// Datagrams seen and dropped, client → origin and back: by the proxy, or by nftables
    /// when it injected the loss.
    pub datagrams: [(u64, u64); 2],
}

impl Report {
    /// The `q` quantile (0..=1) of the latencies.
    pub fn quantile(&self, q: f64) -> Duration {
        let mut v = self.latencies.clone();
        v.sort();
        if v.is_empty() {
            return Duration::ZERO;
        }
        v[((v.len() - 1) as f64 * q).round() as usize]
    }

    /// Frames sent but never received.
    pub fn missing(&self) -> u64 {
        self.sent.saturating_sub(self.received)
    }
}

/// Publishes 20 ms frames of `payload` bytes for `duration` and measures them at a
/// subscriber behind a proxy that applies `profile` in both directions.
///
/// With `nft_loss`, nftables also drops that share of the datagrams arriving at the proxy
/// (see [`crate::nft`]; only inside a network namespace of its own); give the profile no
/// loss of its own to compare the two loss models.
pub async fn run(
    profile: Profile,
    duration: Duration,
    payload: usize,
    seed: u64,
    nft_loss: Option<f64>,
) -> anyhow::Result<Report> {
    let id = Identity::self_signed(&["localhost"])?;
    let cert = id.chain[0].clone();
    let registry = Registry::new();
    let origin = Origin::bind("127.0.0.1:0".parse()?, id, registry.clone())?;
    let origin_addr = origin.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(origin.run(async move {
        let _ = stop_rx.await;
    }));
    let proxy = crate::proxy::start(origin_addr, profile.clone(), profile, seed).await?;
    let nft = match nft_loss {
        Some(loss) => Some(NftLoss::install(
            [proxy.addr.port(), proxy.back_addr.port()],
            loss,
        )?),
        None => None,
    };
    let broadcast: BroadcastId = "bench".parse()?;
    let publisher = registry.publish(broadcast.clone(), 2);
    let up = Upstream::new(proxy.addr, "localhost", std::slice::from_ref(&cert))?;
    let mut sub = up.subscribe(&broadcast).await?;

    let frames = (duration.as_millis() / 20) as u64;
    let producer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let body = Bytes::from(vec![0x5a; payload]);
        for seq in 0..frames {
            tick.tick().await;
            publisher.send(Frame {
                seq,
                timestamp: seq * 960,
                capture_time_us: unix_micros_now(),
                payload: body.clone(),
            });
        }
        // Let the tail arrive before the broadcast ends.
        tokio::time::sleep(Duration::from_secs(2)).await;
    });
    let mut latencies = Vec::new();
    let mut received = 0;
    while let Ok(Ok(Some(f))) =
        tokio::time::timeout(Duration::from_secs(10), sub.next_frame()).await
    {
        received += 1;
        latencies.push(Duration::from_micros(
            unix_micros_now().saturating_sub(f.capture_time_us),
        ));
        if f.seq + 1 == frames {
            break;
        }
    }
    producer.abort();
    let datagrams = match &nft {
        Some(nft) => nft.stats()?,
        None => *proxy.stats.lock().unwrap_or_else(|e| e.into_inner()),
    };
    let _ = stop_tx.send(());
    Ok(Report {
        sent: frames,
        received,
        latencies,
        datagrams,
    })
}
