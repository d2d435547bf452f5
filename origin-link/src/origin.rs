//! The serving side of the link: a registry of live broadcasts and the QUIC server that
//! serves them.
//!
//! A subscriber opens one bidirectional stream per broadcast (its control stream) and sends
//! [`Message::Subscribe`]; the server answers [`Message::SubscribeOk`], or
//! [`Message::SubscribeError`] and finishes. Frames then travel in groups of
//! [`GROUP_FRAMES`], each on its own unidirectional stream that opens with
//! [`Message::Group`]. Newer groups have higher stream priority, and a group whose newest
//! frame has become older than the budget less half the smoothed RTT without having been
//! acknowledged is reset: nothing in it could reach the subscriber in time, so neither the
//! server nor QUIC queue it any longer. The control stream is finished when the broadcast
//! ends, after its last group.
//!
//! The server asks a [`Source`] for broadcasts: at the origin that is the [`Registry`] its
//! publishers fill; at a relay serving the link (a cascade: origin → hub → edge) it is the
//! relay itself, which subscribes upstream on demand. Each request carries the nodes it has
//! passed through, and a server refuses one that already went through it: a loop.
//!
//! Memory and latency are bounded per subscriber: frames fan out through a broadcast channel
//! of [`BACKLOG_FRAMES`] (a subscriber that falls further behind skips the frames it missed),
//! and what QUIC holds for a subscriber is at most the groups younger than the budget.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::tls::{self, Identity};
use crate::wire::{self, Codec, Frame, Message, SubscribeErrorCode, GROUP_FRAMES};
use crate::{BroadcastId, Error, NodeId, MAX_HOPS};

/// Frames a subscriber may lag behind before it skips ahead (64 × 20 ms = 1.28 s).
pub const BACKLOG_FRAMES: usize = 64;

/// Default capture → subscriber budget: a group is abandoned once even its newest frame could
/// no longer arrive within it.
pub const DEFAULT_BUDGET: Duration = Duration::from_millis(300);

/// How long a new stream may take to say what it wants.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// QUIC application error code for a protocol violation by the peer.
pub(crate) const CLOSE_PROTOCOL: u32 = 1;

/// Stream error code of a group reset because it expired (or the subscription ended).
const RESET_EXPIRED: u32 = 0;

struct Published {
    channels: u8,
    tx: broadcast::Sender<Frame>,
}

/// The broadcasts an origin currently has, shared by the publishers and the server.
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<HashMap<BroadcastId, Published>>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts publishing `id`. The broadcast exists until the returned [`Publisher`] drops.
    pub fn publish(&self, id: BroadcastId, channels: u8) -> Publisher {
        let (tx, _) = broadcast::channel(BACKLOG_FRAMES);
        self.lock().insert(
            id.clone(),
            Published {
                channels,
                tx: tx.clone(),
            },
        );
        Publisher {
            id,
            tx,
            registry: self.clone(),
        }
    }

    /// Subscribes to `id` in process, if it is published.
    pub fn subscribe(&self, id: &BroadcastId) -> Option<(u8, broadcast::Receiver<Frame>)> {
        self.lock().get(id).map(|p| (p.channels, p.tx.subscribe()))
    }

    /// Ids of the published broadcasts.
    pub fn ids(&self) -> Vec<BroadcastId> {
        let mut ids: Vec<_> = self.lock().keys().cloned().collect();
        ids.sort();
        ids
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<BroadcastId, Published>> {
        // A panic while holding this lock would be a bug in the few lines above; the map is
        // still consistent (every operation is a single insert/remove/get), so keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sending half of a published broadcast.
pub struct Publisher {
    id: BroadcastId,
    tx: broadcast::Sender<Frame>,
    registry: Registry,
}

impl Publisher {
    /// Sends one frame to every current subscriber. Never blocks.
    pub fn send(&self, frame: Frame) {
        // An error only means nobody is subscribed right now.
        let _ = self.tx.send(frame);
    }

    /// The broadcast's id.
    pub fn id(&self) -> &BroadcastId {
        &self.id
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let mut map = self.registry.lock();
        // Only remove our own entry: a newer publisher may have replaced it.
        if map
            .get(&self.id)
            .is_some_and(|p| p.tx.same_channel(&self.tx))
        {
            map.remove(&self.id);
        }
    }
}

/// A live feed of one broadcast, as a [`Source`] hands it to the server.
pub struct Feed {
    /// Channel count of the source (1 or 2).
    pub channels: u8,
    /// The frames, from now on. A receiver that lags skips ahead (see [`BACKLOG_FRAMES`]).
    pub frames: broadcast::Receiver<Frame>,
}

/// The future a [`Source`] returns.
pub type FeedFuture<'a> = Pin<Box<dyn Future<Output = Result<Feed, Error>> + Send + 'a>>;

/// Where a link server finds the broadcasts it serves.
pub trait Source: Send + Sync + 'static {
    /// A feed of `broadcast` for a subscriber whose request passed through `via` (the nodes
    /// before this one; a source that subscribes further upstream passes them on). [`Error::NotFound`] and [`Error::Loop`] reach the subscriber with their own
    /// codes; any other error as a refusal with its text.
    fn feed<'a>(&'a self, broadcast: &'a BroadcastId, via: &'a [NodeId]) -> FeedFuture<'a>;
}

impl Source for Registry {
    fn feed<'a>(&'a self, broadcast: &'a BroadcastId, _via: &'a [NodeId]) -> FeedFuture<'a> {
        let found = self.subscribe(broadcast);
        Box::pin(async move {
            let (channels, frames) = found.ok_or_else(|| Error::NotFound(broadcast.clone()))?;
            Ok(Feed { channels, frames })
        })
    }
}

/// The link's QUIC server: an origin's, or a relay's when relays cascade.
pub struct Origin {
    endpoint: quinn::Endpoint,
    source: Arc<dyn Source>,
    node: NodeId,
    budget: Duration,
}

impl Origin {
    /// Binds the QUIC server on `addr` (port 0 picks a free port).
    pub fn bind(addr: SocketAddr, identity: Identity, source: impl Source) -> Result<Self, Error> {
        Self::bind_with(addr, identity, source, None)
    }

    /// Like [`Origin::bind`]; with `client_roots`, subscribers must present a certificate
    /// issued by one of them (mutual TLS), and any other peer is refused in the handshake.
    pub fn bind_with(
        addr: SocketAddr,
        identity: Identity,
        source: impl Source,
        client_roots: Option<Vec<tls::CertificateDer<'static>>>,
    ) -> Result<Self, Error> {
        let endpoint_config = tls::endpoint_config(&identity);
        let socket = std::net::UdpSocket::bind(addr)?;
        let endpoint = quinn::Endpoint::new(
            endpoint_config,
            Some(tls::server_config_with(identity, client_roots.as_deref())?),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        Ok(Self {
            endpoint,
            source: Arc::new(source),
            node: NodeId::random(),
            budget: DEFAULT_BUDGET,
        })
    }

    /// Sets the budget (default [`DEFAULT_BUDGET`]): a group is reset once its newest frame
    /// has been here longer than this less half the smoothed RTT, unacknowledged.
    pub fn with_budget(mut self, budget: Duration) -> Self {
        self.budget = budget;
        self
    }

    /// Uses `node` as this server's id in loop detection. A relay that serves the link gives
    /// its server and its [`crate::Upstream`] the same id.
    pub fn with_node_id(mut self, node: NodeId) -> Self {
        self.node = node;
        self
    }

    /// This server's id in loop detection.
    pub fn node_id(&self) -> NodeId {
        self.node
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        Ok(self.endpoint.local_addr()?)
    }

    /// Serves subscribers until `shutdown` resolves, then closes every connection.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let source = self.source.clone();
                    let (node, budget) = (self.node, self.budget);
                    tokio::spawn(async move {
                        let remote = incoming.remote_address();
                        match incoming.await {
                            Ok(conn) => serve_connection(conn, source, node, budget).await,
                            Err(e) => {
                                metrics::counter!("tern_origin_link_refused_total").increment(1);
                                warn!(%remote, "origin-link peer refused: {e}");
                            }
                        }
                    });
                }
                () = &mut shutdown => break,
            }
        }
        self.endpoint.close(0u32.into(), b"origin shutting down");
        // Give the close frames a moment to leave; bounded so shutdown never hangs.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

async fn serve_connection(
    conn: quinn::Connection,
    source: Arc<dyn Source>,
    node: NodeId,
    budget: Duration,
) {
    let remote = conn.remote_address();
    info!(%remote, "origin-link subscriber connected");
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let source = source.clone();
                let conn = conn.clone();
                tokio::spawn(async move {
                    let served = serve_stream(&conn, send, recv, &*source, node, budget).await;
                    if let Err(e) = served {
                        if let Error::Protocol(reason) = &e {
                            warn!(%remote, "closing origin-link connection: {reason}");
                            conn.close(CLOSE_PROTOCOL.into(), reason.as_bytes());
                        } else {
                            debug!(%remote, "subscription ended: {e}");
                        }
                    }
                });
            }
            Err(e) => {
                info!(%remote, "origin-link subscriber gone: {e}");
                return;
            }
        }
    }
}

async fn serve_stream(
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    source: &dyn Source,
    node: NodeId,
    budget: Duration,
) -> Result<(), Error> {
    let request = tokio::time::timeout(SUBSCRIBE_TIMEOUT, read_message(&mut recv))
        .await
        .map_err(|_| Error::Protocol("no Subscribe within 5 s".into()))??;
    let (subscription, broadcast, via) = match request {
        Some(Message::Subscribe {
            subscription,
            broadcast,
            via,
        }) => (subscription, broadcast, via),
        Some(other) => {
            return Err(Error::Protocol(format!(
                "expected Subscribe as the first message, got {other:?}"
            )))
        }
        None => return Ok(()),
    };
    let mut buf = BytesMut::new();
    let found = if via.contains(&node) {
        Err(Error::Loop(format!(
            "{broadcast} would loop: node {node} is already on the path"
        )))
    } else if via.len() >= MAX_HOPS {
        Err(Error::Loop(format!(
            "{broadcast} has passed {} links, more than {MAX_HOPS}",
            via.len()
        )))
    } else {
        source.feed(&broadcast, &via).await
    };
    let (channels, mut rx) = match found {
        Ok(feed) => (feed.channels, feed.frames),
        Err(e) => {
            let code = match &e {
                Error::NotFound(_) => SubscribeErrorCode::NotFound,
                Error::Loop(_) => SubscribeErrorCode::Loop,
                _ => SubscribeErrorCode::Refused,
            };
            if code == SubscribeErrorCode::Loop {
                metrics::counter!("tern_origin_link_loops_refused_total").increment(1);
                warn!(%broadcast, "refusing subscription: {e}");
            }
            let reason = match e {
                Error::NotFound(_) => format!("no broadcast named {broadcast}"),
                Error::Loop(r) => r,
                other => other.to_string(),
            };
            wire::encode(&Message::SubscribeError { code, reason }, &mut buf);
            send.write_all(&buf).await?;
            let _ = send.finish();
            return Ok(());
        }
    };
    info!(%broadcast, "subscription started");
    wire::encode(
        &Message::SubscribeOk {
            codec: Codec::Opus,
            channels,
        },
        &mut buf,
    );
    send.write_all(&buf).await?;

    // Group streams see this flip (or its sender drop) when the subscriber leaves: they
    // reset instead of finishing.
    let (cancel, cancelled) = watch::channel(false);
    let mut groups = tokio::task::JoinSet::new();
    // The open group's feed and how many frames it has taken.
    let mut group: Option<(mpsc::Sender<(Frame, Instant)>, u64)> = None;
    // The subscriber unsubscribes by stopping the control stream (or by going away).
    let unsubscribed = send.stopped();
    tokio::pin!(unsubscribed);
    loop {
        tokio::select! {
            r = rx.recv() => match r {
                Ok(frame) => {
                    let (feed, taken) = group.get_or_insert_with(|| {
                        let (feed, frames) = mpsc::channel(GROUP_FRAMES as usize);
                        groups.spawn(send_group(
                            conn.clone(),
                            subscription,
                            frames,
                            budget,
                            cancelled.clone(),
                        ));
                        (feed, 0)
                    });
                    // Fails only once the group gave up (expired): the frame goes with it.
                    // The channel holds a whole group, so it is never full.
                    let _ = feed.try_send((frame, Instant::now()));
                    *taken += 1;
                    if *taken >= GROUP_FRAMES {
                        // Dropping the feed finishes the group's stream.
                        group = None;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    warn!(%broadcast, skipped = n, "subscriber fell behind; skipping frames");
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            _ = &mut unsubscribed => {
                debug!(%broadcast, "subscriber unsubscribed");
                // Each open group resets at once; dropping the tasks instead would finish them.
                let _ = cancel.send(true);
                while groups.join_next().await.is_some() {}
                return Ok(());
            }
            Some(_) = groups.join_next(), if !groups.is_empty() => {}
        }
    }
    info!(%broadcast, "broadcast ended");
    // The last groups go out (or expire) before the control stream says the broadcast ended,
    // so a subscriber has all frames in hand when it learns of the end.
    drop(group);
    loop {
        tokio::select! {
            next = groups.join_next() => if next.is_none() { break },
            _ = &mut unsubscribed => {
                let _ = cancel.send(true);
                while groups.join_next().await.is_some() {}
                return Ok(());
            }
        }
    }
    let _ = send.finish();
    Ok(())
}

/// Writes one group of frames (each with the time it reached this server) on its own stream,
/// opened with `Group { subscription }`.
///
/// The stream is reset once its newest frame has been here longer than `budget` less half
/// the smoothed RTT without the whole group having been acknowledged, or when `cancelled`
/// changes (the subscriber left). Ages count from arrival at this server rather than from the
/// capture time, so a clock offset between nodes cannot make every group expire at once; at
/// the origin the two are the same.
async fn send_group(
    conn: quinn::Connection,
    subscription: u64,
    mut frames: mpsc::Receiver<(Frame, Instant)>,
    budget: Duration,
    mut cancelled: watch::Receiver<bool>,
) {
    let expiry = |got: Instant| got + budget.saturating_sub(conn.rtt() / 2);
    let Some((first, got)) = frames.recv().await else {
        return;
    };
    let mut deadline = expiry(got);
    // Opening waits while the subscriber's stream limit is reached; not past the deadline.
    let opened = tokio::select! {
        r = tokio::time::timeout_at(deadline, conn.open_uni()) => r,
        _ = cancelled.changed() => return,
    };
    let mut stream = match opened {
        Ok(Ok(s)) => s,
        // The connection is gone.
        Ok(Err(_)) => return,
        Err(_) => {
            metrics::counter!("tern_origin_link_groups_expired_total").increment(1);
            return;
        }
    };
    // Newer groups first: when the path cannot carry everything, what is still queued for
    // older groups waits (and expires) rather than delaying fresh frames. The priority wraps
    // after 2^31 frames (1.4 years), where one group briefly loses its precedence.
    let _ = stream.set_priority((first.seq & i32::MAX as u64) as i32);
    let mut buf = BytesMut::new();
    wire::encode(&Message::Group { subscription }, &mut buf);
    wire::encode(&Message::Frame(first), &mut buf);
    let complete = loop {
        if !buf.is_empty() {
            tokio::select! {
                r = tokio::time::timeout_at(deadline, stream.write_all(&buf)) => match r {
                    Ok(Ok(())) => buf.clear(),
                    // The subscriber stopped the stream or the connection is gone.
                    Ok(Err(_)) => return,
                    Err(_) => break false,
                },
                _ = cancelled.changed() => break false,
            }
        }
        tokio::select! {
            f = frames.recv() => match f {
                Some((f, got)) => {
                    deadline = expiry(got);
                    wire::encode(&Message::Frame(f), &mut buf);
                }
                None => break true,
            },
            () = tokio::time::sleep_until(deadline) => break false,
            _ = cancelled.changed() => break false,
        }
    };
    if complete {
        // Only fails if the stream was already closed, which it was not.
        let _ = stream.finish();
        tokio::select! {
            r = tokio::time::timeout_at(deadline, stream.stopped()) => if r.is_ok() {
                return;
            },
            _ = cancelled.changed() => {}
        }
    }
    if *cancelled.borrow() {
        debug!(subscription, "group dropped: the subscriber left");
    } else {
        metrics::counter!("tern_origin_link_groups_expired_total").increment(1);
    }
    // Only fails if the stream is already closed, when there is nothing left to drop.
    let _ = stream.reset(RESET_EXPIRED.into());
}

/// Reads one message from a stream, or `None` at a clean end of stream.
pub(crate) async fn read_message(recv: &mut quinn::RecvStream) -> Result<Option<Message>, Error> {
    let mut buf = BytesMut::new();
    read_next(recv, &mut buf).await
}

/// Reads the next message from a stream, using `buf` to carry bytes between calls; `None` at
/// a clean end of stream.
pub async fn read_next(
    recv: &mut quinn::RecvStream,
    buf: &mut BytesMut,
) -> Result<Option<Message>, Error> {
    loop {
        if let Some(msg) = wire::decode(buf)? {
            return Ok(Some(msg));
        }
        match recv.read_chunk(16 * 1024, true).await? {
            Some(chunk) => buf.extend_from_slice(&chunk.bytes),
            None if buf.is_empty() => return Ok(None),
            None => return Err(Error::Protocol("stream ended inside a message".into())),
        }
    }
}
