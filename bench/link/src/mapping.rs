//! How media maps onto QUIC, compared under the same impairment.
//!
//! The same 50 frames/s source is carried four ways:
//!
//! - [`Mapping::Ordered`]: every frame on the subscription's one bidirectional stream, in
//!   order. This is the origin link as it runs today (`origin-link/src/origin.rs`).
//! - [`Mapping::StreamPerFrame`]: a new unidirectional stream per frame, never abandoned.
//! - [`Mapping::Group`]: a unidirectional stream per group of consecutive frames; the sender
//!   resets the stream once even the group's newest frame is too old to reach the relay within
//!   the budget, which stops retransmissions and drops whatever is still queued for it.
//!   Newer groups have higher stream priority, so a congested path carries fresh frames first.
//! - [`Mapping::Datagram`]: one QUIC datagram per frame; a lost datagram stays lost.
//!
//! Each mapping of a comparison gets its own origin-side endpoint, its own impairment proxy
//! (same profile, same seed) and its own subscriber, and all of them run at the same time from
//! one frame source: they carry the same frames under the same machine load, so differences
//! between them are the mapping's. Frames are the origin link's `Frame` messages and the TLS and
//! transport settings are the origin link's (keep-alive 1 s, idle timeout 5 s, quinn defaults
//! otherwise), except the datagram send buffer, which [`Settings::datagram_buffer`] bounds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{Bytes, BytesMut};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tern_origin_link::tls::{self, CertificateDer, Identity};
use tern_origin_link::wire::{self, Codec, Frame, Message};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::impair::Profile;
use crate::proxy::{self, Proxy};

/// Frames the origin queues per subscriber before it skips ahead, as the origin link does
/// (`BACKLOG_FRAMES`, 1.28 s).
pub const BACKLOG_FRAMES: usize = 64;

/// One frame every 20 ms.
pub const FRAME_INTERVAL: Duration = Duration::from_millis(20);

/// After the last frame is sent, a comparison ends once no mapping has received anything
/// for this long (or every frame has arrived everywhere).
const DRAIN_IDLE: Duration = Duration::from_secs(2);

/// ... and in any case this long after the last frame.
const DRAIN_MAX: Duration = Duration::from_secs(30);

/// How frames ride the QUIC connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Every frame on the subscription's one bidirectional stream, in order.
    Ordered,
    /// A unidirectional stream per frame, reliable, never abandoned.
    StreamPerFrame,
    /// A unidirectional stream per `frames` consecutive frames, newer groups first, reset by
    /// the sender when its newest frame is older than the budget less half the smoothed RTT.
    Group {
        /// Frames per stream.
        frames: u64,
    },
    /// One QUIC datagram per frame.
    Datagram,
}

impl std::fmt::Display for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ordered => f.write_str("(a) one ordered stream"),
            Self::StreamPerFrame => f.write_str("(b) stream per frame"),
            Self::Group { frames: 1 } => f.write_str("(c) stream per frame, reset when late"),
            Self::Group { frames } => write!(
                f,
                "(c) stream per {frames} frames ({} ms), reset when late",
                frames * FRAME_INTERVAL.as_millis() as u64
            ),
            Self::Datagram => f.write_str("(d) datagrams"),
        }
    }
}

/// What a comparison runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Audio per run; frames are 20 ms apart.
    pub duration: Duration,
    /// Seed of the impairment decisions and of the frame sizes.
    pub seed: u64,
    /// Capture → relay budget: frames arriving later count as late, and [`Mapping::Group`]
    /// abandons groups that can no longer make it.
    pub budget: Duration,
    /// Bytes of datagrams the sender may hold while the congestion window is full (quinn
    /// drops the oldest beyond it; its default is 1 MiB, minutes of audio).
    pub datagram_buffer: usize,
    /// Opus payload sizes are drawn uniformly from this range.
    pub payload: (usize, usize),
}

impl Settings {
    /// 100–160 byte payloads and a datagram buffer of one `budget`'s worth of frames.
    pub fn new(duration: Duration, seed: u64, budget: Duration) -> Self {
        Self {
            duration,
            seed,
            budget,
            datagram_buffer: frames_in(budget) as usize * 180,
            payload: (100, 160),
        }
    }
}

/// Whole frames in `d`.
fn frames_in(d: Duration) -> u64 {
    (d.as_millis() / FRAME_INTERVAL.as_millis()) as u64
}

/// What one mapping delivered in one comparison.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The mapping measured.
    pub mapping: Mapping,
    /// Capture → arrival latency of every frame sent, by sequence number; `None` if it never
    /// arrived.
    pub arrivals: Vec<Option<Duration>>,
    /// Frames arriving later than this are late.
    pub budget: Duration,
    /// Frames the origin side skipped because its queue for this subscriber overflowed.
    pub skipped: u64,
    /// UDP payload bytes put on the wire: subscriber → origin, origin → subscriber.
    pub wire: [u64; 2],
}

impl Outcome {
    /// Frames sent.
    pub fn sent(&self) -> u64 {
        self.arrivals.len() as u64
    }

    /// Frames that arrived (once or more).
    pub fn arrived(&self) -> u64 {
        self.arrivals.iter().flatten().count() as u64
    }

    /// Frames that never arrived.
    pub fn lost(&self) -> u64 {
        self.sent() - self.arrived()
    }

    /// Frames that arrived later than the budget.
    pub fn late(&self) -> u64 {
        self.arrivals
            .iter()
            .flatten()
            .filter(|l| **l > self.budget)
            .count() as u64
    }

    /// Share of frames the relay cannot play in time: lost or late.
    pub fn missed_share(&self) -> f64 {
        if self.arrivals.is_empty() {
            return 0.0;
        }
        (self.lost() + self.late()) as f64 / self.sent() as f64
    }

    /// The longest run of consecutive frames that were lost or late: the longest gap a
    /// listener hears (Opus concealment covers one or two frames).
    pub fn longest_gap(&self) -> u64 {
        let mut longest = 0;
        let mut run = 0;
        for a in &self.arrivals {
            if a.is_none_or(|l| l > self.budget) {
                run += 1;
                longest = longest.max(run);
            } else {
                run = 0;
            }
        }
        longest
    }

    /// The `q` quantile (0..=1) of the latencies of the frames that arrived, nearest rank.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let mut v: Vec<Duration> = self.arrivals.iter().flatten().copied().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        Some(v[((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize])
    }
}

/// Carries the same frames over every one of `mappings` at once, each through its own proxy
/// applying `profile` in both directions, and reports what each delivered (in that order).
pub async fn compare(
    profile: &Profile,
    mappings: &[Mapping],
    settings: &Settings,
) -> anyhow::Result<Vec<Outcome>> {
    let base = Instant::now();
    let frames = frames_in(settings.duration);
    let (tx, _) = broadcast::channel::<Frame>(BACKLOG_FRAMES);
    let identity = Identity::self_signed(&["localhost"])?;
    let cert = identity.chain[0].clone();

    let mut legs = Vec::new();
    for &mapping in mappings {
        let id = Identity {
            chain: identity.chain.clone(),
            key: identity.key.clone_key(),
        };
        // Subscribed before any frame exists, so every mapping sees every frame.
        let leg = Leg::start(mapping, id, tx.subscribe(), profile, settings, base).await?;
        legs.push(leg);
    }
    let mut ready = Vec::new();
    for leg in &mut legs {
        ready.push(leg.subscribe(&cert, frames as usize)?);
    }
    for r in ready {
        tokio::time::timeout(Duration::from_secs(10), r)
            .await
            .context("subscribing took over 10 s")?
            .context("subscriber gave up")??;
    }

    let sizes = payload_sizes(settings, frames);
    let producer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(FRAME_INTERVAL);
        for (seq, size) in (0..).zip(sizes) {
            tick.tick().await;
            // An error only means every sender has gone, which the drain below reports.
            let _ = tx.send(Frame {
                seq,
                timestamp: seq * tern_origin_link::FRAME_SAMPLES,
                capture_time_us: base.elapsed().as_micros() as u64,
                payload: Bytes::from(vec![0x5a; size]),
            });
        }
        // Dropping `tx` ends the broadcast: senders finish their streams.
    });
    producer.await.context("frame source")?;

    let ended = base.elapsed();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = base.elapsed();
        let complete = legs.iter().all(|l| l.sink.complete());
        let last = legs
            .iter()
            .map(|l| l.sink.last_arrival())
            .max()
            .unwrap_or_default()
            .max(ended);
        if complete || now - last > DRAIN_IDLE || now - ended > DRAIN_MAX {
            break;
        }
    }

    Ok(legs
        .into_iter()
        .map(|leg| leg.finish(settings.budget))
        .collect())
}

/// Payload sizes of the `frames` frames, seeded.
fn payload_sizes(settings: &Settings, frames: u64) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(settings.seed ^ 0xf4a3e5);
    let (lo, hi) = settings.payload;
    (0..frames).map(|_| rng.random_range(lo..=hi)).collect()
}

/// Where a subscriber records arrivals.
struct Sink {
    base: Instant,
    latencies: Mutex<Vec<Option<Duration>>>,
    /// Microseconds since `base` of the latest arrival.
    last: AtomicU64,
}

impl Sink {
    fn record(&self, f: &Frame) {
        let now = self.base.elapsed();
        let latency = now.saturating_sub(Duration::from_micros(f.capture_time_us));
        // Poisoning needs a panic while holding the lock, in these few lines.
        let mut l = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot @ None) = l.get_mut(f.seq as usize) {
            *slot = Some(latency);
        }
        self.last.store(now.as_micros() as u64, Ordering::Relaxed);
    }

    fn complete(&self) -> bool {
        let l = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        l.iter().all(Option::is_some)
    }

    fn last_arrival(&self) -> Duration {
        Duration::from_micros(self.last.load(Ordering::Relaxed))
    }
}

/// One mapping's origin side, proxy and subscriber.
struct Leg {
    mapping: Mapping,
    server: quinn::Endpoint,
    client: Option<quinn::Endpoint>,
    proxy: Proxy,
    skipped: Arc<AtomicU64>,
    sink: Arc<Sink>,
    tasks: Vec<JoinHandle<()>>,
}

impl Leg {
    async fn start(
        mapping: Mapping,
        identity: Identity,
        frames: broadcast::Receiver<Frame>,
        profile: &Profile,
        settings: &Settings,
        base: Instant,
    ) -> anyhow::Result<Self> {
        let mut config = tls::server_config(identity)?;
        config.transport_config(Arc::new(transport(settings.datagram_buffer)));
        let server = quinn::Endpoint::server(config, "127.0.0.1:0".parse()?)?;
        let proxy = proxy::start(
            server.local_addr()?,
            profile.clone(),
            profile.clone(),
            settings.seed,
        )
        .await?;
        let skipped = Arc::new(AtomicU64::new(0));
        let origin = tokio::spawn(serve(
            server.clone(),
            mapping,
            frames,
            skipped.clone(),
            base,
            settings.budget,
        ));
        Ok(Self {
            mapping,
            server,
            client: None,
            proxy,
            skipped,
            sink: Arc::new(Sink {
                base,
                latencies: Mutex::new(Vec::new()),
                last: AtomicU64::new(0),
            }),
            tasks: vec![tokio::spawn(async move {
                // Ends with an error when the comparison closes the endpoints.
                let _ = origin.await;
            })],
        })
    }

    /// Connects through the proxy and subscribes; the receiver resolves once the origin side
    /// has answered, then frames are recorded until the connection closes.
    fn subscribe(
        &mut self,
        cert: &CertificateDer<'static>,
        frames: usize,
    ) -> anyhow::Result<oneshot::Receiver<anyhow::Result<()>>> {
        *self
            .sink
            .latencies
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = vec![None; frames];
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        // The subscriber's transport as it was when the mappings were compared (quinn's
        // defaults plus keep-alive): the product's subscriber config now refuses datagrams.
        let mut config = tls::client_config(std::slice::from_ref(cert))?;
        config.transport_config(Arc::new(transport(1 << 20)));
        client.set_default_client_config(config);
        let (ready_tx, ready_rx) = oneshot::channel();
        let (endpoint, addr, mapping, sink) = (
            client.clone(),
            self.proxy.addr,
            self.mapping,
            self.sink.clone(),
        );
        self.tasks.push(tokio::spawn(async move {
            match subscribe(&endpoint, addr).await {
                Ok((conn, control, buf)) => {
                    let _ = ready_tx.send(Ok(()));
                    // Ends with an error when the comparison closes the endpoints.
                    let _ = receive(conn, mapping, control, buf, sink).await;
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        }));
        self.client = Some(client);
        Ok(ready_rx)
    }

    fn finish(self, budget: Duration) -> Outcome {
        if let Some(c) = &self.client {
            c.close(0u32.into(), b"done");
        }
        self.server.close(0u32.into(), b"done");
        for t in &self.tasks {
            t.abort();
        }
        let arrivals = std::mem::take(
            &mut *self
                .sink
                .latencies
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        Outcome {
            mapping: self.mapping,
            arrivals,
            budget,
            skipped: self.skipped.load(Ordering::Relaxed),
            wire: [
                self.proxy.bytes[0].load(Ordering::Relaxed),
                self.proxy.bytes[1].load(Ordering::Relaxed),
            ],
        }
    }
}

/// The origin link's transport settings (`origin-link/src/tls.rs`), with a bounded datagram
/// send buffer.
fn transport(datagram_buffer: usize) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    // 5 s fits in a VarInt; the conversion cannot fail.
    t.max_idle_timeout(Some(
        Duration::from_secs(5)
            .try_into()
            .expect("5 s is a valid idle timeout"),
    ));
    t.datagram_send_buffer_size(datagram_buffer);
    t
}

/// The origin side of one mapping: waits for the subscriber's `Subscribe`, answers, then
/// carries every frame of `frames` the mapping's way until the source ends.
async fn serve(
    endpoint: quinn::Endpoint,
    mapping: Mapping,
    mut frames: broadcast::Receiver<Frame>,
    skipped: Arc<AtomicU64>,
    base: Instant,
    budget: Duration,
) -> anyhow::Result<()> {
    let conn = endpoint.accept().await.context("endpoint closed")?.await?;
    let (mut control, mut recv) = conn.accept_bi().await?;
    let mut buf = BytesMut::new();
    match read_message(&mut recv, &mut buf).await? {
        Some(Message::Subscribe { .. }) => {}
        other => bail!("expected Subscribe, got {other:?}"),
    }
    buf.clear();
    wire::encode(
        &Message::SubscribeOk {
            codec: Codec::Opus,
            channels: 2,
        },
        &mut buf,
    );
    control.write_all(&buf).await?;

    // The open group stream of `Mapping::Group`: its index and its feed.
    let mut group: Option<(u64, mpsc::Sender<Frame>)> = None;
    loop {
        let frame = match frames.recv().await {
            Ok(f) => f,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                skipped.fetch_add(n, Ordering::Relaxed);
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => break,
        };
        match mapping {
            Mapping::Ordered => {
                buf.clear();
                wire::encode(&Message::Frame(frame), &mut buf);
                control.write_all(&buf).await?;
            }
            Mapping::StreamPerFrame => {
                // Waits when the subscriber's stream limit is reached; the source then
                // overflows `frames` and frames are skipped, so the backlog stays bounded.
                let mut s = conn.open_uni().await?;
                buf.clear();
                wire::encode(&Message::Frame(frame), &mut buf);
                s.write_all(&buf).await?;
                // Only fails if the stream was already closed, which it was not.
                let _ = s.finish();
            }
            Mapping::Group { frames: n } => {
                let index = frame.seq / n;
                if group.as_ref().is_none_or(|(i, _)| *i != index) {
                    // Dropping the previous feed finishes that group's stream.
                    let (feed, rx) = mpsc::channel(n as usize);
                    tokio::spawn(send_group(conn.clone(), rx, base, budget));
                    group = Some((index, feed));
                }
                if let Some((_, feed)) = &group {
                    // Fails only once the group was abandoned: the frame is dropped with it.
                    // A group never holds more than `n` frames, so the channel is never full.
                    let _ = feed.try_send(frame);
                }
            }
            Mapping::Datagram => {
                buf.clear();
                wire::encode(&Message::Frame(frame), &mut buf);
                conn.send_datagram(buf.split().freeze())?;
            }
        }
    }
    drop(group);
    let _ = control.finish();
    conn.closed().await;
    Ok(())
}

/// Writes one group of frames on its own stream. The stream is reset once its newest frame
/// is older than `budget` less half the smoothed RTT without the whole group having been
/// acknowledged: nothing in it could still reach the relay in time, so nothing of it is sent
/// or retransmitted any more.
async fn send_group(
    conn: quinn::Connection,
    mut frames: mpsc::Receiver<Frame>,
    base: Instant,
    budget: Duration,
) {
    let expiry = |f: &Frame| {
        let captured = base + Duration::from_micros(f.capture_time_us);
        tokio::time::Instant::from_std(captured + budget.saturating_sub(conn.rtt() / 2))
    };
    let Some(first) = frames.recv().await else {
        return;
    };
    let mut deadline = expiry(&first);
    // Opening waits while the subscriber's stream limit is reached; not past the deadline.
    let Ok(Ok(mut stream)) = tokio::time::timeout_at(deadline, conn.open_uni()).await else {
        return;
    };
    // Newest first: when the path cannot carry everything, what is still queued for older
    // groups waits (and is reset at its deadline) rather than delaying fresh frames.
    // Sequence numbers pass i32::MAX after 2^31 frames (1.4 years at 50 frames/s).
    let _ = stream.set_priority(i32::try_from(first.seq).unwrap_or(i32::MAX));
    let mut buf = BytesMut::new();
    let mut next = Some(first);
    let complete = loop {
        if let Some(f) = next.take() {
            deadline = expiry(&f);
            buf.clear();
            wire::encode(&Message::Frame(f), &mut buf);
            match tokio::time::timeout_at(deadline, stream.write_all(&buf)).await {
                Ok(Ok(())) => {}
                // The subscriber stopped the stream or the connection is gone.
                Ok(Err(_)) => return,
                Err(_) => break false,
            }
        }
        tokio::select! {
            f = frames.recv() => match f {
                Some(f) => next = Some(f),
                None => break true,
            },
            () = tokio::time::sleep_until(deadline) => break false,
        }
    };
    if complete {
        // Only fails if the stream was already closed, which it was not.
        let _ = stream.finish();
        if tokio::time::timeout_at(deadline, stream.stopped())
            .await
            .is_ok()
        {
            return;
        }
    }
    // Only fails if the stream is already closed, when there is nothing left to drop.
    let _ = stream.reset(0u32.into());
}

/// Connects to `addr` and subscribes: the connection, the control stream's receive side and
/// the bytes read past `SubscribeOk`.
async fn subscribe(
    endpoint: &quinn::Endpoint,
    addr: std::net::SocketAddr,
) -> anyhow::Result<(
    quinn::Connection,
    (quinn::SendStream, quinn::RecvStream),
    BytesMut,
)> {
    let conn = endpoint.connect(addr, "localhost")?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut buf = BytesMut::new();
    wire::encode(
        &Message::Subscribe {
            subscription: 0,
            broadcast: "bench".parse()?,
            via: vec![],
        },
        &mut buf,
    );
    send.write_all(&buf).await?;
    buf.clear();
    match read_message(&mut recv, &mut buf).await? {
        Some(Message::SubscribeOk { .. }) => Ok((conn, (send, recv), buf)),
        other => bail!("expected SubscribeOk, got {other:?}"),
    }
}

/// The subscriber side of one mapping: records every frame until the connection closes.
async fn receive(
    conn: quinn::Connection,
    mapping: Mapping,
    control: (quinn::SendStream, quinn::RecvStream),
    mut buf: BytesMut,
    sink: Arc<Sink>,
) -> anyhow::Result<()> {
    // The send half stays open for the whole subscription, as a relay's does.
    let (_send, mut recv) = control;
    match mapping {
        Mapping::Ordered => {
            while let Some(msg) = read_message(&mut recv, &mut buf).await? {
                match msg {
                    Message::Frame(f) => sink.record(&f),
                    other => bail!("expected a frame, got {other:?}"),
                }
            }
            Ok(())
        }
        Mapping::StreamPerFrame | Mapping::Group { .. } => loop {
            let mut stream = conn.accept_uni().await?;
            let sink = sink.clone();
            tokio::spawn(async move {
                let mut buf = BytesMut::new();
                // A reset stream ends with an error: its remaining frames are lost.
                while let Ok(Some(Message::Frame(f))) = read_message(&mut stream, &mut buf).await {
                    sink.record(&f);
                }
            });
        },
        Mapping::Datagram => loop {
            let d = conn.read_datagram().await?;
            let mut b = BytesMut::from(&d[..]);
            match wire::decode(&mut b)? {
                Some(Message::Frame(f)) if b.is_empty() => sink.record(&f),
                other => bail!("expected one frame per datagram, got {other:?}"),
            }
        },
    }
}

/// The link's own stream reader (`tern_origin_link::origin::read_next`), with anyhow errors.
async fn read_message(
    recv: &mut quinn::RecvStream,
    buf: &mut BytesMut,
) -> anyhow::Result<Option<Message>> {
    Ok(tern_origin_link::origin::read_next(recv, buf).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(arrivals: &[Option<u64>]) -> Outcome {
        Outcome {
            mapping: Mapping::Datagram,
            arrivals: arrivals
                .iter()
                .map(|a| a.map(Duration::from_millis))
                .collect(),
            budget: Duration::from_millis(300),
            skipped: 0,
            wire: [0, 0],
        }
    }

    #[test]
    fn lost_late_gaps_and_quantiles() {
        let o = outcome(&[
            Some(10),
            None,
            Some(301),
            None,
            Some(20),
            Some(300),
            None,
            Some(40),
        ]);
        assert_eq!((o.sent(), o.arrived(), o.lost(), o.late()), (8, 5, 3, 1));
        assert!((o.missed_share() - 0.5).abs() < 1e-9);
        // Frames 1, 2, 3 (lost, late, lost) in a row; 300 ms exactly is in time.
        assert_eq!(o.longest_gap(), 3);
        let ms = |q| o.quantile(q).map(|d| d.as_millis());
        assert_eq!(ms(0.0), Some(10));
        assert_eq!(ms(0.5), Some(40));
        assert_eq!(ms(1.0), Some(301));
        assert_eq!(outcome(&[None, None]).quantile(0.5), None);
        assert_eq!(outcome(&[None, None]).longest_gap(), 2);
    }

    #[test]
    fn frame_sizes_repeat_with_the_seed_and_stay_in_range() {
        let s = Settings::new(Duration::from_secs(2), 7, Duration::from_millis(300));
        let a = payload_sizes(&s, 100);
        assert_eq!(a, payload_sizes(&s, 100));
        assert_ne!(
            a,
            payload_sizes(
                &Settings::new(Duration::from_secs(2), 8, Duration::from_millis(300)),
                100
            )
        );
        assert!(a.iter().all(|n| (100..=160).contains(n)));
        assert!(a.iter().min() < a.iter().max());
    }
}
