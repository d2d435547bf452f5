//! The impairment model as a UDP proxy between one client and a target, on loopback.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::net::UdpSocket;

use crate::impair::{Impairment, Profile};

/// A running proxy. Dropping it stops forwarding.
pub struct Proxy {
    /// Where the client sends.
    pub addr: SocketAddr,
    /// The socket that talks to the target (where the target's replies arrive).
    pub back_addr: SocketAddr,
    /// Upstream (client → target) and downstream counters: (seen, dropped).
    pub stats: Arc<Mutex<[(u64, u64); 2]>>,
    /// UDP payload bytes offered to the proxy, client → target and back (the bytes a sender
    /// put on the wire, before any loss).
    pub bytes: Arc<[AtomicU64; 2]>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts a proxy to `target`: `up` applies to client → target, `down` to the way back.
pub async fn start(
    target: SocketAddr,
    up: Profile,
    down: Profile,
    seed: u64,
) -> std::io::Result<Proxy> {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    back.connect(target).await?;
    let addr = front.local_addr()?;
    let back_addr = back.local_addr()?;
    let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
    let stats: Arc<Mutex<[(u64, u64); 2]>> = Arc::default();
    let bytes: Arc<[AtomicU64; 2]> = Arc::default();
    let start = Instant::now();

    let (f, b, c, s) = (front.clone(), back.clone(), client.clone(), stats.clone());
    let counted = bytes.clone();
    let upstream = tokio::spawn(async move {
        let mut imp = Impairment::new(up, seed);
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = f.recv_from(&mut buf).await {
            // Poisoning would need a panic while holding it, in these few lines.
            *c.lock().unwrap_or_else(|e| e.into_inner()) = Some(from);
            counted[0].fetch_add(n as u64, Ordering::Relaxed);
            let delays = imp.decide(start.elapsed(), n);
            s.lock().unwrap_or_else(|e| e.into_inner())[0] = (imp.seen, imp.dropped);
            for d in delays {
                let (b, pkt) = (b.clone(), buf[..n].to_vec());
                tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    let _ = b.send(&pkt).await;
                });
            }
        }
    });
    let (f, b, c, s) = (front, back, client, stats.clone());
    let counted = bytes.clone();
    let downstream = tokio::spawn(async move {
        let mut imp = Impairment::new(down, seed ^ 0x5eed);
        let mut buf = vec![0u8; 65_536];
        while let Ok(n) = b.recv(&mut buf).await {
            let Some(to) = *c.lock().unwrap_or_else(|e| e.into_inner()) else {
                continue;
            };
            counted[1].fetch_add(n as u64, Ordering::Relaxed);
            let delays = imp.decide(start.elapsed(), n);
            s.lock().unwrap_or_else(|e| e.into_inner())[1] = (imp.seen, imp.dropped);
            for d in delays {
                let (f, pkt) = (f.clone(), buf[..n].to_vec());
                tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    let _ = f.send_to(&pkt, to).await;
                });
            }
        }
    });
    Ok(Proxy {
        addr,
        back_addr,
        stats,
        bytes,
        tasks: vec![upstream, downstream],
    })
}
