//! RTP ingest endpoints at the origin: one UDP socket per broadcast, like an SFU's plain
//! transport. Datagrams go through the pure [`RtpIngest`] and out to the broadcast's
//! subscribers.
//!
//! An endpoint locks onto the first source address that sends to it; packets from any other
//! address are dropped until that source has been silent for [`SOURCE_TAKEOVER`], so a stray
//! or spoofed sender cannot interleave with the real one. Ingest ports still belong behind
//! a firewall that admits only the SFU.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::origin::Registry;
use crate::rtp::RtpIngest;
use crate::{unix_micros_now, BroadcastId, Error};

/// A silent source may be replaced by another after this long.
pub const SOURCE_TAKEOVER: Duration = Duration::from_secs(2);

/// One running ingest endpoint, as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The broadcast it feeds.
    pub broadcast: BroadcastId,
    /// Where to send RTP.
    pub addr: SocketAddr,
}

struct Running {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
}

/// Creates, lists and removes ingest endpoints.
pub struct IngestManager {
    registry: Registry,
    channels: u8,
    running: Mutex<HashMap<BroadcastId, Running>>,
}

impl IngestManager {
    /// A manager publishing into `registry`; sources are taken to have `channels` channels.
    pub fn new(registry: Registry, channels: u8) -> Arc<Self> {
        Arc::new(Self {
            registry,
            channels,
            running: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<BroadcastId, Running>> {
        // The map stays consistent across a panic elsewhere (single inserts and removes).
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens an endpoint for `broadcast` on `bind` (port 0 picks a free one).
    pub async fn create(
        &self,
        broadcast: BroadcastId,
        bind: SocketAddr,
    ) -> Result<Endpoint, Error> {
        if self.lock().contains_key(&broadcast) || self.registry.subscribe(&broadcast).is_some() {
            return Err(Error::Refused(format!(
                "broadcast {broadcast} already exists"
            )));
        }
        let socket = UdpSocket::bind(bind).await?;
        let addr = socket.local_addr()?;
        let publisher = self.registry.publish(broadcast.clone(), self.channels);
        let (stop, stopped) = oneshot::channel();
        {
            let mut running = self.lock();
            if running.contains_key(&broadcast) {
                return Err(Error::Refused(format!(
                    "broadcast {broadcast} already exists"
                )));
            }
            running.insert(broadcast.clone(), Running { addr, stop });
        }
        info!(%broadcast, %addr, "RTP ingest open");
        tokio::spawn(async move {
            run(socket, publisher, async {
                let _ = stopped.await;
            })
            .await;
        });
        Ok(Endpoint { broadcast, addr })
    }

    /// The running endpoints, by broadcast id.
    pub fn list(&self) -> Vec<Endpoint> {
        let mut v: Vec<Endpoint> = self
            .lock()
            .iter()
            .map(|(b, r)| Endpoint {
                broadcast: b.clone(),
                addr: r.addr,
            })
            .collect();
        v.sort_by(|a, b| a.broadcast.cmp(&b.broadcast));
        v
    }

    /// Closes the endpoint of `broadcast`, ending the broadcast. False if there was none.
    pub fn delete(&self, broadcast: &BroadcastId) -> bool {
        match self.lock().remove(broadcast) {
            Some(r) => {
                let _ = r.stop.send(());
                info!(%broadcast, "RTP ingest closed");
                true
            }
            None => false,
        }
    }
}

/// Receives RTP on `socket` into `publisher` until `shutdown` resolves.
pub async fn run(
    socket: UdpSocket,
    publisher: crate::origin::Publisher,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut ingest = RtpIngest::new(None);
    let mut buf = vec![0u8; 2048];
    let mut source: Option<(SocketAddr, u64)> = None;
    loop {
        let timer = ingest.poll_timeout();
        let wake = async {
            match timer {
                Some(at) => {
                    let wait = at.saturating_sub(unix_micros_now());
                    tokio::time::sleep(Duration::from_micros(wait)).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let (n, from) = match r {
                    Ok(x) => x,
                    Err(e) => { debug!("ingest receive: {e}"); continue; }
                };
                let now = unix_micros_now();
                match source {
                    Some((addr, last)) if addr != from
                        && now.saturating_sub(last) < SOURCE_TAKEOVER.as_micros() as u64 => {
                        metrics::counter!("tern_origin_ingest_foreign_packets_total").increment(1);
                        continue;
                    }
                    Some((addr, _)) if addr != from => {
                        warn!(broadcast = %publisher.id(), %from, "RTP source changed");
                    }
                    _ => {}
                }
                source = Some((from, now));
                match ingest.handle_packet(&buf[..n], now) {
                    Ok(()) => metrics::counter!("tern_origin_ingest_packets_total").increment(1),
                    Err(e) => {
                        metrics::counter!("tern_origin_ingest_malformed_total").increment(1);
                        debug!(broadcast = %publisher.id(), "dropped: {e}");
                    }
                }
            }
            () = wake => {}
            () = &mut shutdown => return,
        }
        let now = unix_micros_now();
        while let Some(frame) = ingest.poll_frame(now) {
            publisher.send(frame);
        }
    }
}
