//! The subscriber side of the origin link, used by relays and packagers.
//!
//! One [`Upstream`] holds at most one QUIC connection to its origin and opens one
//! bidirectional stream per subscribed broadcast, so many broadcasts share a connection.
//! A lost connection is replaced on the next [`Upstream::subscribe`]; the caller decides when
//! to retry (see the relay's subscription pump).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::BytesMut;
use rustls::pki_types::CertificateDer;
use tokio::sync::Mutex;

use crate::origin::read_next;
use crate::wire::{self, Frame, Message, SubscribeErrorCode};
use crate::{tls, BroadcastId, Error, NodeId};

/// How long connecting or subscribing may take before it counts as a failure. Short, so
/// that while a link is down the attempts keep coming about every second or two, and the
/// first one after the link returns succeeds.
const SETUP_TIMEOUT: Duration = Duration::from_secs(2);

/// A relay's handle on one origin (or upstream relay).
pub struct Upstream {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    server_name: String,
    conn: Mutex<Option<quinn::Connection>>,
    node: NodeId,
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

    async fn connection(&self) -> Result<quinn::Connection, Error> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
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
        *guard = Some(conn.clone());
        Ok(conn)
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
        let conn = self.connection().await?;
        tokio::time::timeout(SETUP_TIMEOUT, async {
            let (mut send, mut recv) = conn.open_bi().await?;
            let mut buf = BytesMut::new();
            wire::encode(
                &Message::Subscribe {
                    broadcast: broadcast.clone(),
                    via: path,
                },
                &mut buf,
            );
            send.write_all(&buf).await?;
            buf.clear();
            match read_next(&mut recv, &mut buf).await? {
                Some(Message::SubscribeOk { channels, .. }) => Ok(Subscription {
                    channels,
                    _send: send,
                    recv,
                    buf,
                }),
                Some(Message::SubscribeError {
                    code: SubscribeErrorCode::NotFound,
                    ..
                }) => Err(Error::NotFound(broadcast.clone())),
                Some(Message::SubscribeError {
                    code: SubscribeErrorCode::Loop,
                    reason,
                }) => Err(Error::Loop(reason)),
                Some(Message::SubscribeError { reason, .. }) => Err(Error::Refused(reason)),
                Some(other) => Err(Error::Protocol(format!(
                    "expected a reply to Subscribe, got {other:?}"
                ))),
                None => Err(Error::Protocol("stream ended before a reply".into())),
            }
        })
        .await
        .map_err(|_| Error::Connect {
            addr: self.addr,
            source: "subscribe timed out".into(),
        })?
    }

    /// Closes the connection, telling the origin.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"bye");
    }
}

/// A live subscription: frames of one broadcast, in order.
///
/// Dropping it tells the origin to stop sending (the stream is stopped).
pub struct Subscription {
    /// Channel count of the source.
    pub channels: u8,
    _send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: BytesMut,
}

impl Subscription {
    /// The next frame, or `None` when the origin ended the broadcast.
    pub async fn next_frame(&mut self) -> Result<Option<Frame>, Error> {
        match read_next(&mut self.recv, &mut self.buf).await? {
            Some(Message::Frame(f)) => Ok(Some(f)),
            Some(other) => Err(Error::Protocol(format!("expected a frame, got {other:?}"))),
            None => Ok(None),
        }
    }
}
