//! The subscriber side of the origin link, used by relays and packagers.
//!
//! One [`Upstream`] holds at most one QUIC connection to its origin and opens one
//! bidirectional control stream per subscribed broadcast, so many broadcasts share a
//! connection. Frames arrive in groups on unidirectional streams; one task per connection
//! accepts them and routes each by its subscription id to that [`Subscription`], whose reorder
//! window releases frames in `seq` order. A lost connection is replaced on the next
//! [`Upstream::subscribe`]; the caller decides when to retry (see the relay's subscription
//! pump).

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rustls::pki_types::CertificateDer;
use tokio::sync::{oneshot, Mutex, Notify};
use tracing::warn;

use crate::origin::{read_next, CLOSE_PROTOCOL, DEFAULT_BUDGET};
use crate::reorder::{Pop, Reorder};
use crate::wire::{self, Frame, Message, SubscribeErrorCode, GROUP_FRAMES};
use crate::{tls, BroadcastId, Error, NodeId};

/// How long a frame after a gap waits for the frames before it: long enough for a lost
/// packet to be retransmitted on a 100 ms path, short enough that what waits stays within
/// the budget.
const REORDER_HOLD: Duration = Duration::from_millis(150);

/// How long a frame may wait in the reorder window for its consumer: a consumer that stops
/// reading finds, when it comes back, only frames that arrived within the last budget.
const REORDER_MAX_AGE: Duration = DEFAULT_BUDGET;

/// Most frames the reorder window spans, as many as the origin queues per subscriber: a burst
/// the origin lets through is not cut short here.
const REORDER_FRAMES: u64 = crate::origin::BACKLOG_FRAMES as u64;

/// After the control stream ends, how long a subscription waits for group streams that are
/// already here but not yet read (the origin ends the control stream after its last group).
const END_LINGER: Duration = Duration::from_millis(50);

/// How long connecting or subscribing may take before it counts as a failure. Short, so
/// that while a link is down the attempts keep coming about every second or two, and the
/// first one after the link returns succeeds.
const SETUP_TIMEOUT: Duration = Duration::from_secs(2);

/// A relay's handle on one origin (or upstream relay).
pub struct Upstream {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    server_name: String,
    conn: Mutex<Option<Link>>,
    node: NodeId,
}

type Routes = Arc<std::sync::Mutex<HashMap<u64, Arc<Inbox>>>>;

fn lock_routes(routes: &Routes) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Inbox>>> {
    // Every critical section is one map operation, so a panic cannot leave it inconsistent.
    routes.lock().unwrap_or_else(|e| e.into_inner())
}

/// One connection to the upstream and what routes its group streams.
#[derive(Clone)]
struct Link {
    conn: quinn::Connection,
    routes: Routes,
    next_id: Arc<AtomicU64>,
    /// The connection's group-accepting task runs while the upstream or a subscription on
    /// this connection holds a clone.
    _alive: Arc<oneshot::Sender<()>>,
}

/// Where a subscription's group streams deliver frames.
struct Inbox {
    window: std::sync::Mutex<Reorder>,
    arrived: Notify,
    /// Group streams of this subscription still being read.
    readers: AtomicUsize,
}

impl Inbox {
    fn window(&self) -> std::sync::MutexGuard<'_, Reorder> {
        // The window's methods do not panic; a poisoned lock still holds a valid window.
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Upstream {
    /// Prepares a client for `addr`, verifying the server as `server_name` against `roots`.
    /// Nothing is sent until the first subscription.
    pub fn new(
        addr: SocketAddr,
        server_name: &str,
        roots: &[CertificateDer<'static>],
    ) -> Result<Self, Error> {
        Self::with_identity(addr, server_name, roots, None)
    }

    /// Like [`Upstream::new`], presenting `identity` to an upstream that requires mutual TLS.
    pub fn with_identity(
        addr: SocketAddr,
        server_name: &str,
        roots: &[CertificateDer<'static>],
        identity: Option<tls::Identity>,
    ) -> Result<Self, Error> {
        let bind: SocketAddr = if addr.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let mut endpoint = quinn::Endpoint::client(bind)?;
        endpoint.set_default_client_config(tls::client_config_with(roots, identity)?);
        Ok(Self {
            endpoint,
            addr,
            server_name: server_name.to_owned(),
            conn: Mutex::new(None),
            node: NodeId::random(),
        })
    }

    /// Uses `node` as this subscriber's id on the path of its subscriptions. A relay that
    /// also serves the link gives its server the same id, so a loop through it is seen.
    pub fn with_node_id(mut self, node: NodeId) -> Self {
        self.node = node;
        self
    }

    /// This subscriber's id on the path of its subscriptions.
    pub fn node_id(&self) -> NodeId {
        self.node
    }

    /// The upstream's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    async fn connection(&self) -> Result<Link, Error> {
        let mut guard = self.conn.lock().await;
        if let Some(link) = guard.as_ref() {
            if link.conn.close_reason().is_none() {
                return Ok(link.clone());
            }
        }
        let connect_err = |e: Box<dyn std::error::Error + Send + Sync>| Error::Connect {
            addr: self.addr,
            source: e,
        };
        let connecting = self
            .endpoint
            .connect(self.addr, &self.server_name)
            .map_err(|e| connect_err(e.into()))?;
        let conn = tokio::time::timeout(SETUP_TIMEOUT, connecting)
            .await
            .map_err(|_| connect_err("timed out".into()))?
            .map_err(|e| connect_err(e.into()))?;
        let routes = Routes::default();
        let (alive, stop) = oneshot::channel();
        tokio::spawn(accept_groups(conn.clone(), routes.clone(), stop));
        let link = Link {
            conn,
            routes,
            next_id: Arc::new(AtomicU64::new(0)),
            _alive: Arc::new(alive),
        };
        *guard = Some(link.clone());
        Ok(link)
    }

    /// Subscribes to `broadcast`. Fails with [`Error::NotFound`] if the origin has no such
    /// broadcast.
    pub async fn subscribe(&self, broadcast: &BroadcastId) -> Result<Subscription, Error> {
        self.subscribe_via(broadcast, &[]).await
    }

    /// Subscribes to `broadcast` on behalf of a downstream request that passed through
    /// `via`; this node is added to the path. Fails with [`Error::Loop`] if the upstream
    /// finds itself on it.
    pub async fn subscribe_via(
        &self,
        broadcast: &BroadcastId,
        via: &[NodeId],
    ) -> Result<Subscription, Error> {
        let mut path = via.to_vec();
        path.push(self.node);
        let link = self.connection().await?;
        let id = link.next_id.fetch_add(1, Ordering::Relaxed);
        let inbox = Arc::new(Inbox {
            window: std::sync::Mutex::new(Reorder::new(
                REORDER_HOLD,
                REORDER_MAX_AGE,
                REORDER_FRAMES,
            )),
            arrived: Notify::new(),
            readers: AtomicUsize::new(0),
        });
        // Routed before asking: the first group may overtake the reply.
        lock_routes(&link.routes).insert(id, inbox.clone());
        let conn = link.conn.clone();
        let result = tokio::time::timeout(SETUP_TIMEOUT, async {
            let (mut send, mut recv) = conn.open_bi().await?;
            let mut buf = BytesMut::new();
            wire::encode(
                &Message::Subscribe {
                    subscription: id,
                    broadcast: broadcast.clone(),
                    via: path,
                },
                &mut buf,
            );
            send.write_all(&buf).await?;
            buf.clear();
            match read_next(&mut recv, &mut buf).await? {
                Some(Message::SubscribeOk { channels, .. }) => Ok((send, recv, buf, channels)),
                Some(Message::SubscribeError {
                    code: SubscribeErrorCode::NotFound,
                    ..
                }) => Err(Error::NotFound(broadcast.clone())),
                Some(Message::SubscribeError {
                    code: SubscribeErrorCode::Loop,
                    reason,
                }) => Err(Error::Loop(reason)),
                Some(Message::SubscribeError { reason, .. }) => Err(Error::Refused(reason)),
                Some(other) => Err(protocol_error(
                    &conn,
                    format!("expected a reply to Subscribe, got {}", other.name()),
                )),
                None => Err(Error::Protocol("stream ended before a reply".into())),
            }
        })
        .await
        .map_err(|_| Error::Connect {
            addr: self.addr,
            source: "subscribe timed out".into(),
        })
        .and_then(|r| r);
        match result {
            Ok((send, recv, buf, channels)) => Ok(Subscription {
                channels,
                id,
                inbox,
                link,
                send,
                recv,
                buf,
                ended: None,
            }),
            Err(e) => {
                lock_routes(&link.routes).remove(&id);
                Err(e)
            }
        }
    }

    /// Closes the connection, telling the origin.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"bye");
    }
}

/// Closes `conn` for a protocol violation by the upstream and returns the error.
fn protocol_error(conn: &quinn::Connection, reason: String) -> Error {
    warn!(remote = %conn.remote_address(), "closing origin-link connection: {reason}");
    conn.close(CLOSE_PROTOCOL.into(), reason.as_bytes());
    Error::Protocol(reason)
}

/// Accepts the group streams of one connection until it closes or nothing holds `stop`'s
/// sender any more.
async fn accept_groups(conn: quinn::Connection, routes: Routes, mut stop: oneshot::Receiver<()>) {
    loop {
        let stream = tokio::select! {
            s = conn.accept_uni() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
            _ = &mut stop => return,
        };
        let (conn, routes) = (conn.clone(), routes.clone());
        tokio::spawn(async move {
            if let Err(Error::Protocol(reason)) = read_group(stream, &routes).await {
                protocol_error(&conn, reason);
            }
        });
    }
}

/// Counts a group stream as being read while it lives.
struct Reading(Arc<Inbox>);

impl Drop for Reading {
    fn drop(&mut self) {
        self.0.readers.fetch_sub(1, Ordering::AcqRel);
        // The subscription may be waiting for its last group to end.
        self.0.arrived.notify_one();
    }
}

/// Reads one group stream into its subscription's window. A reset stream (an expired group)
/// or a lost connection ends it quietly; a group for an unknown subscription (it may have just
/// unsubscribed) is stopped and ignored.
async fn read_group(mut stream: quinn::RecvStream, routes: &Routes) -> Result<(), Error> {
    let mut buf = BytesMut::new();
    let subscription = match read_next(&mut stream, &mut buf).await {
        Ok(Some(Message::Group { subscription })) => subscription,
        Ok(Some(other)) => {
            return Err(Error::Protocol(format!(
                "expected Group first on a unidirectional stream, got {}",
                other.name()
            )))
        }
        Ok(None) | Err(Error::Read(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    let Some(inbox) = lock_routes(routes).get(&subscription).cloned() else {
        let _ = stream.stop(0u32.into());
        return Ok(());
    };
    inbox.readers.fetch_add(1, Ordering::AcqRel);
    let _reading = Reading(inbox.clone());
    let mut frames = 0;
    loop {
        match read_next(&mut stream, &mut buf).await {
            Ok(Some(Message::Frame(f))) => {
                frames += 1;
                if frames > GROUP_FRAMES {
                    return Err(Error::Protocol(format!(
                        "more than {GROUP_FRAMES} frames in a group"
                    )));
                }
                inbox
                    .window()
                    .push(f, tokio::time::Instant::now().into_std());
                inbox.arrived.notify_one();
            }
            Ok(Some(other)) => {
                return Err(Error::Protocol(format!(
                    "expected a frame in a group, got {}",
                    other.name()
                )))
            }
            Ok(None) | Err(Error::Read(_)) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// A live subscription: frames of one broadcast, in order.
///
/// Dropping it tells the origin to stop sending (the control stream is stopped, and the
/// origin resets the groups it still has open).
pub struct Subscription {
    /// Channel count of the source.
    pub channels: u8,
    id: u64,
    inbox: Arc<Inbox>,
    link: Link,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: BytesMut,
    /// When the control stream ended: the broadcast is over once what is in hand is out.
    ended: Option<tokio::time::Instant>,
}

impl Subscription {
    /// The next frame, or `None` when the origin ended the broadcast.
    ///
    /// Frames come in `seq` order; a gap means frames were skipped or arrived too late.
    /// Cancel-safe: dropping the future loses no frame.
    pub async fn next_frame(&mut self) -> Result<Option<Frame>, Error> {
        loop {
            let now = tokio::time::Instant::now();
            let wait = match self.inbox.window().pop(now.into_std()) {
                Pop::Ready(f) => return Ok(Some(f)),
                Pop::Wait(at) => Some(tokio::time::Instant::from_std(at)),
                Pop::Empty => None,
            };
            // After the end: wait a moment for groups already here, and for the ones being
            // read, but not longer than a budget (an upstream could leave one open).
            let mut end_timer = None;
            if let Some(ended) = self.ended {
                let (linger, give_up) = (ended + END_LINGER, ended + DEFAULT_BUDGET);
                let reading = self.inbox.readers.load(Ordering::Acquire) > 0;
                if wait.is_none() && now >= linger && (!reading || now >= give_up) {
                    return Ok(None);
                }
                end_timer = if now < linger {
                    Some(linger)
                } else if now < give_up {
                    Some(give_up)
                } else {
                    None
                };
            }
            // A far-off time for a branch that is disabled anyway.
            let never = now + Duration::from_secs(3600);
            tokio::select! {
                () = self.inbox.arrived.notified() => {}
                () = tokio::time::sleep_until(wait.unwrap_or(never)), if wait.is_some() => {}
                () = tokio::time::sleep_until(end_timer.unwrap_or(never)), if end_timer.is_some() => {}
                r = read_next(&mut self.recv, &mut self.buf), if self.ended.is_none() => match r? {
                    None => self.ended = Some(tokio::time::Instant::now()),
                    Some(other) => {
                        return Err(protocol_error(
                            &self.link.conn,
                            format!("expected nothing more on the control stream, got {}", other.name()),
                        ))
                    }
                },
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        lock_routes(&self.link.routes).remove(&self.id);
        // Unsubscribes: the origin sees the control stream stopped.
        let _ = self.recv.stop(0u32.into());
        let _ = self.send.finish();
    }
}
