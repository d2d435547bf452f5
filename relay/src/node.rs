//! The relay's async shell: fan-out shards, each a task owning a [`Fanout`] core and its
//! share of the listeners, all sending and receiving on one UDP socket; upstream
//! subscriptions run as their own tasks and hand every frame to every shard through bounded
//! channels. One shard per core by default, so a relay uses all of a host's cores.
//!
//! Any shard may read a datagram meant for another shard's listener (they share the
//! socket). A shard that does not know the sender passes the datagram along a ring of the
//! shards until one does; listeners send little (STUN, RTCP, DTLS), so this costs far less
//! than the 50 packets a second each one is sent.
//!
//! Nothing here decides anything about WebRTC: the core does. This file moves datagrams,
//! frames and commands, and publishes a health snapshot after every change.
//!
//! A relay can also serve the origin link to other relays and packagers (a cascade): it is
//! a [`Source`] for a link server, and a downstream subscription holds the upstream one
//! like a listener does.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tern_origin_link::origin::{FeedFuture, BACKLOG_FRAMES};
use tern_origin_link::{BroadcastId, Feed, Frame, NodeId, Source, Upstream};
use tokio::net::UdpSocket;
use tokio::sync::{broadcast as frames, mpsc, oneshot, watch, Mutex};
use tracing::{debug, info, warn};

use crate::fanout::{Fanout, FanoutConfig, FanoutEvent, ListenerId};
use crate::Error;

/// Commands and frames waiting for the fan-out task. Bounded so a stalled task makes
/// upstream readers wait (and QUIC flow control push back) instead of growing memory.
const QUEUE: usize = 1024;

/// How often counters and the health snapshot are refreshed when nothing else changes.
const REFRESH: Duration = Duration::from_millis(250);

/// How long after a hand-off freed listeners' WebRTC state the memory is given back (a burst
/// of connections hands off over a few seconds: one trim for all of it), and how often at
/// most.
const TRIM_DELAY: Duration = Duration::from_secs(2);
const TRIM_INTERVAL: Duration = Duration::from_secs(10);

/// Gives the memory freed by hand-offs back to the system.
///
/// A listener's DTLS handshake runs its cryptography in aws-lc (C), whose allocations come
/// from glibc's heap; freed after the hand-off, they leave small holes that glibc keeps
/// mapped. `malloc_trim` returns the whole free pages among them (Rust's own allocations are
/// jemalloc's, which returns pages by itself). 1,200 listeners connecting at once: 20.6 KiB
/// resident per listener without it, 17.5–18.4 with it.
#[derive(Default)]
struct Trim {
    pending_since: Option<Instant>,
    last: Option<Instant>,
}

impl Trim {
    fn freed(&mut self, now: Instant) {
        self.pending_since.get_or_insert(now);
    }

    fn maybe_release(&mut self, now: Instant) {
        let Some(since) = self.pending_since else {
            return;
        };
        if now < since + TRIM_DELAY || self.last.is_some_and(|l| now < l + TRIM_INTERVAL) {
            return;
        }
        self.pending_since = None;
        self.last = Some(now);
        release_freed_memory();
        tracing::debug!(took = ?now.elapsed(), "returned freed memory to the system");
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_freed_memory() {
    // SAFETY: malloc_trim only walks and trims the allocator's own free lists; it has no
    // preconditions and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_freed_memory() {}

enum Command {
    Add {
        broadcast: BroadcastId,
        offer: String,
        reply: oneshot::Sender<Result<(String, String), Error>>,
    },
    Remove {
        broadcast: BroadcastId,
        session: String,
        reply: oneshot::Sender<bool>,
    },
    Frame {
        broadcast: BroadcastId,
        frame: Frame,
        /// When it arrived from upstream, for the time the relay adds.
        arrived: Instant,
    },
    /// A datagram another shard read but does not know the sender of.
    Datagram {
        source: SocketAddr,
        data: Vec<u8>,
        /// Shards it has been to already.
        hops: usize,
    },
    Exists {
        broadcast: BroadcastId,
        session: String,
        reply: oneshot::Sender<bool>,
    },
}

/// What `/health` reports about the relay.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RelaySnapshot {
    /// Listeners now.
    pub total: usize,
    /// Listeners per broadcast.
    pub per_broadcast: BTreeMap<String, usize>,
    /// The configured maximum.
    pub capacity: usize,
    /// The UDP address announced to listeners.
    pub webrtc_addr: Option<SocketAddr>,
}

/// Upstream state of one subscribed broadcast, for `/health`.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamState {
    /// Frames are flowing.
    Live,
    /// Lost; retrying.
    Reconnecting,
}

/// A cheap, cloneable handle on a running relay.
#[derive(Clone)]
pub struct Relay {
    shards: Arc<[mpsc::Sender<Command>]>,
    board: Arc<Board>,
    snapshot: watch::Receiver<RelaySnapshot>,
    upstream: Arc<Upstream>,
    subscriptions: Subscriptions,
    draining: Arc<watch::Sender<bool>>,
    grace: Duration,
}

impl Relay {
    /// Binds the WebRTC socket and starts `threads` fan-out shards (0: one per available
    /// core), which run until `shutdown` flips to true (then they close every session) or
    /// every handle is dropped. The returned task ends when every shard has.
    pub async fn start(
        listen: SocketAddr,
        announce: Option<SocketAddr>,
        max_listeners: usize,
        threads: usize,
        upstream: Upstream,
        unsubscribe_grace: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), Error> {
        let socket = UdpSocket::bind(listen)
            .await
            .map_err(|e| Error::Io(format!("binding WebRTC socket {listen}: {e}")))?;
        let local = socket
            .local_addr()
            .map_err(|e| Error::Io(format!("WebRTC socket: {e}")))?;
        let announce = match announce {
            Some(a) => a,
            None if local.ip().is_unspecified() => {
                return Err(Error::Io(format!(
                "relay.webrtc_listen is {local}: set relay.announce to the address listeners reach"
            )))
            }
            None => local,
        };
        let threads = match threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
        .clamp(1, MAX_SHARDS);
        let socket = Arc::new(socket);
        // The node's capacity, split exactly between the shards.
        let caps: Vec<usize> = (0..threads)
            .map(|i| max_listeners / threads + usize::from(i < max_listeners % threads))
            .collect();
        let (snap_tx, snapshot) = watch::channel(RelaySnapshot {
            capacity: max_listeners,
            webrtc_addr: Some(announce),
            ..Default::default()
        });
        let board = Arc::new(Board {
            parts: std::sync::Mutex::new(vec![RelaySnapshot::default(); threads]),
            caps: caps.clone(),
            tx: snap_tx,
            template: RelaySnapshot {
                capacity: max_listeners,
                webrtc_addr: Some(announce),
                ..Default::default()
            },
            rotate: Default::default(),
        });
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..threads).map(|_| mpsc::channel(QUEUE)).unzip();
        let mut handles = Vec::with_capacity(threads);
        for (index, rx) in rxs.into_iter().enumerate() {
            let shard = Shard {
                index,
                fanout: Fanout::new(FanoutConfig {
                    announce,
                    local,
                    max_listeners: caps[index],
                })?,
                socket: socket.clone(),
                rx,
                next: txs[(index + 1) % threads].clone(),
                ring: threads,
                board: board.clone(),
                capacity: caps[index],
                announce,
            };
            handles.push(tokio::spawn(shard.run(shutdown.clone())));
        }
        info!(%announce, shards = threads, "WebRTC fan-out listening");
        publish_links_down(LINKS_DOWN.load(std::sync::atomic::Ordering::Relaxed));
        let task = tokio::spawn(async move {
            for h in handles {
                if let Err(e) = h.await {
                    warn!("fan-out shard failed: {e}");
                }
            }
            info!("WebRTC fan-out stopped");
        });

        Ok((
            Self {
                shards: txs.into(),
                board,
                snapshot,
                upstream: Arc::new(upstream),
                subscriptions: Default::default(),
                draining: Arc::new(watch::channel(false).0),
                grace: unsubscribe_grace,
            },
            task,
        ))
    }

    /// Adds a WHEP listener: makes sure the broadcast is pulled from upstream, then answers
    /// the offer. Returns (session token, SDP answer).
    pub async fn add_listener(
        &self,
        broadcast: BroadcastId,
        offer: String,
    ) -> Result<(String, String), Error> {
        if self.is_draining() {
            return Err(Error::Draining);
        }
        self.ensure_subscribed(&broadcast).await?;
        let (reply, rx) = oneshot::channel();
        self.shards[self.board.roomiest()]
            .send(Command::Add {
                broadcast,
                offer,
                reply,
            })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Ends a WHEP session. False if there was no such session for that broadcast.
    pub async fn remove_listener(&self, broadcast: BroadcastId, session: String) -> bool {
        self.ask_shard(shard_of(&session), |reply| Command::Remove {
            broadcast,
            session,
            reply,
        })
        .await
    }

    /// True if `session` is a live session of `broadcast`.
    pub async fn has_session(&self, broadcast: BroadcastId, session: String) -> bool {
        self.ask_shard(shard_of(&session), |reply| Command::Exists {
            broadcast,
            session,
            reply,
        })
        .await
    }

    /// Sends the command `make` builds to shard `index` (the one a session token names) and
    /// waits for its yes or no; no for a token that names no shard, or a shard that is gone.
    async fn ask_shard(
        &self,
        index: Option<usize>,
        make: impl FnOnce(oneshot::Sender<bool>) -> Command,
    ) -> bool {
        let Some(shard) = index.and_then(|i| self.shards.get(i)) else {
            return false;
        };
        let (reply, rx) = oneshot::channel();
        shard.send(make(reply)).await.is_ok() && rx.await.unwrap_or(false)
    }

    /// Starts draining: new sessions are refused from now on; current ones continue.
    pub fn start_drain(&self) {
        if !self.draining.send_replace(true) {
            info!("draining: refusing new listeners");
        }
    }

    /// Whether the relay is draining.
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Resolves when draining starts (at once if it has).
    pub async fn drain_requested(&self) {
        let mut rx = self.draining.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Resolves when no listener is left.
    pub async fn emptied(&self) {
        let mut rx = self.snapshot.clone();
        let _ = rx.wait_for(|s| s.total == 0).await;
    }

    /// The latest health snapshot.
    pub fn snapshot(&self) -> RelaySnapshot {
        self.snapshot.borrow().clone()
    }

    /// Upstream state per subscribed broadcast.
    pub async fn upstream_states(&self) -> BTreeMap<String, UpstreamState> {
        self.subscriptions
            .lock()
            .await
            .iter()
            .map(|(b, e)| (b.to_string(), e.state.borrow().clone()))
            .collect()
    }

    /// This relay's id on the origin link (its upstream's and its link server's).
    pub fn node_id(&self) -> NodeId {
        self.upstream.node_id()
    }

    /// Downstream link subscribers (relays and packagers pulling from this relay).
    pub async fn downstream_count(&self) -> usize {
        self.subscriptions
            .lock()
            .await
            .values()
            .map(|e| e.downstream.receiver_count())
            .sum()
    }

    /// Subscribes to `broadcast` upstream unless already subscribed, for a listener.
    async fn ensure_subscribed(&self, broadcast: &BroadcastId) -> Result<(), Error> {
        self.attach(broadcast, &[])
            .await
            .map(drop)
            .map_err(|e| match e {
                tern_origin_link::Error::NotFound(b) => Error::UnknownBroadcast(b),
                other => Error::Upstream(other.to_string()),
            })
    }

    /// Subscribes to `broadcast` upstream unless already subscribed, on behalf of a request
    /// that passed through `via`, and returns a feed of its frames for a downstream link
    /// subscriber (listeners drop it). The first subscription is awaited so an unknown
    /// broadcast is reported as such; after that a pump task keeps it alive, resubscribing
    /// with backoff if the link breaks.
    async fn attach(
        &self,
        broadcast: &BroadcastId,
        via: &[NodeId],
    ) -> Result<Feed, tern_origin_link::Error> {
        // Held across the subscribe so concurrent first listeners make one subscription.
        let mut subs = self.subscriptions.lock().await;
        if let Some(entry) = subs.get_mut(broadcast) {
            entry.wanted = tokio::time::Instant::now();
            return Ok(Feed {
                channels: entry.channels,
                frames: entry.downstream.subscribe(),
            });
        }
        let sub = self.upstream.subscribe_via(broadcast, via).await?;
        let (state_tx, state_rx) = watch::channel(UpstreamState::Live);
        let (downstream, feed) = frames::channel(BACKLOG_FRAMES);
        let channels = sub.channels;
        subs.insert(
            broadcast.clone(),
            SubEntry {
                state: state_rx,
                wanted: tokio::time::Instant::now(),
                channels,
                downstream: downstream.clone(),
            },
        );
        let ctx = PumpContext {
            upstream: self.upstream.clone(),
            broadcast: broadcast.clone(),
            via: via.to_vec(),
            shards: self.shards.clone(),
            downstream,
            state: state_tx,
            subscriptions: self.subscriptions.clone(),
            snapshot: self.snapshot.clone(),
            grace: self.grace,
        };
        tokio::spawn(pump(ctx, sub));
        Ok(Feed {
            channels,
            frames: feed,
        })
    }
}

impl Source for Relay {
    fn feed<'a>(&'a self, broadcast: &'a BroadcastId, via: &'a [NodeId]) -> FeedFuture<'a> {
        Box::pin(async move {
            if self.is_draining() {
                return Err(tern_origin_link::Error::Refused(
                    "this relay is draining".into(),
                ));
            }
            let feed = self.attach(broadcast, via).await?;
            info!(%broadcast, "downstream link subscriber attached");
            Ok(feed)
        })
    }
}

/// One upstream subscription, as the relay tracks it.
struct SubEntry {
    state: watch::Receiver<UpstreamState>,
    /// Last time a listener asked for this broadcast; a subscription is kept at least a
    /// grace period after that, so a listener arriving just as the last one left is served.
    wanted: tokio::time::Instant,
    /// Channel count of the source.
    channels: u8,
    /// Frames for downstream link subscribers; each holds a receiver.
    downstream: frames::Sender<Frame>,
}

type Subscriptions = Arc<Mutex<HashMap<BroadcastId, SubEntry>>>;

/// What a pump needs besides its subscription.
struct PumpContext {
    upstream: Arc<Upstream>,
    broadcast: BroadcastId,
    /// The path of the request that made the subscription, for resubscribing.
    via: Vec<NodeId>,
    shards: Arc<[mpsc::Sender<Command>]>,
    /// Frames to downstream link subscribers. Survives resubscribing, so their streams
    /// carry on across an upstream restart as listeners' sessions do.
    downstream: frames::Sender<Frame>,
    state: watch::Sender<UpstreamState>,
    subscriptions: Subscriptions,
    snapshot: watch::Receiver<RelaySnapshot>,
    grace: Duration,
}

impl PumpContext {
    /// True once nobody has listened to the broadcast for the grace period; the entry is
    /// then removed (under the lock `attach` takes, so no listener can slip in). Downstream
    /// link subscribers count as listeners.
    async fn idle_expired(&self, idle_since: &mut Option<tokio::time::Instant>) -> bool {
        let listeners = |s: &RelaySnapshot| {
            s.per_broadcast
                .get(self.broadcast.as_str())
                .copied()
                .unwrap_or(0)
                + self.downstream.receiver_count()
        };
        if listeners(&self.snapshot.borrow()) > 0 {
            *idle_since = None;
            return false;
        }
        let since = *idle_since.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() < self.grace {
            return false;
        }
        let mut subs = self.subscriptions.lock().await;
        let wanted_recently = subs
            .get(&self.broadcast)
            .is_some_and(|e| e.wanted.elapsed() < self.grace);
        if wanted_recently || listeners(&self.snapshot.borrow()) > 0 {
            return false;
        }
        subs.remove(&self.broadcast);
        info!(broadcast = %self.broadcast, "no listeners for {:?}: unsubscribed upstream", self.grace);
        true
    }
}

/// Moves frames from an upstream subscription into the fan-out task, resubscribing with
/// capped exponential backoff when the subscription ends, and unsubscribing once the
/// broadcast has had no listener for the grace period. Ends then, or when the fan-out task
/// is gone.
async fn pump(ctx: PumpContext, mut sub: tern_origin_link::Subscription) {
    let broadcast = ctx.broadcast.clone();
    let mut idle_since = None;
    let mut check = tokio::time::interval(Duration::from_secs(1));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        loop {
            let next = tokio::select! {
                f = sub.next_frame() => f,
                _ = check.tick() => {
                    if ctx.idle_expired(&mut idle_since).await {
                        return;
                    }
                    continue;
                }
            };
            match next {
                Ok(Some(frame)) => {
                    metrics::counter!("tern_relay_frames_in_total").increment(1);
                    // Capture at the origin to arrival here; clocks are NTP-synchronised.
                    let age_us =
                        tern_origin_link::unix_micros_now().saturating_sub(frame.capture_time_us);
                    metrics::histogram!("tern_relay_upstream_latency_seconds")
                        .record(age_us as f64 / 1e6);
                    if ctx.downstream.receiver_count() > 0 {
                        // Never blocks: a lagging downstream subscriber skips ahead.
                        let _ = ctx.downstream.send(frame.clone());
                    }
                    let arrived = Instant::now();
                    for shard in ctx.shards.iter() {
                        let cmd = Command::Frame {
                            broadcast: broadcast.clone(),
                            frame: frame.clone(),
                            arrived,
                        };
                        if shard.send(cmd).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(None) => {
                    info!(%broadcast, "upstream ended the broadcast");
                    break;
                }
                Err(e) => {
                    warn!(%broadcast, "upstream subscription lost: {e}");
                    break;
                }
            }
        }
        ctx.state.send_replace(UpstreamState::Reconnecting);
        metrics::counter!("tern_relay_upstream_reconnects_total").increment(1);
        let _down = LinkDown::start();
        // Capped at 1 s so audio resumes within about a second of the link returning; the
        // jitter spreads the reconnects of many relays after an origin restart.
        let mut delay = Duration::from_millis(100);
        sub = loop {
            if ctx.shards.iter().any(|s| s.is_closed()) || ctx.idle_expired(&mut idle_since).await {
                return;
            }
            let jitter = rand::random_range(0..=delay.as_millis() as u64 / 2);
            tokio::time::sleep(delay + Duration::from_millis(jitter)).await;
            match ctx.upstream.subscribe_via(&broadcast, &ctx.via).await {
                Ok(s) => break s,
                Err(e) => {
                    debug!(%broadcast, "resubscribe failed: {e}");
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        };
        info!(%broadcast, "upstream subscription restored");
        ctx.state.send_replace(UpstreamState::Live);
    }
}

/// Broadcasts of this process whose upstream subscription is lost right now.
static LINKS_DOWN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Held while a broadcast's upstream is lost: exported as `tern_relay_upstream_up` (1 while
/// no broadcast's upstream is lost) and `tern_relay_upstream_reconnecting` (how many are).
struct LinkDown;

impl LinkDown {
    fn start() -> Self {
        let n = LINKS_DOWN.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        publish_links_down(n);
        Self
    }
}

impl Drop for LinkDown {
    fn drop(&mut self) {
        let n = LINKS_DOWN.fetch_sub(1, std::sync::atomic::Ordering::Relaxed) - 1;
        publish_links_down(n);
    }
}

fn publish_links_down(n: usize) {
    metrics::gauge!("tern_relay_upstream_reconnecting").set(n as f64);
    metrics::gauge!("tern_relay_upstream_up").set(if n == 0 { 1.0 } else { 0.0 });
}

/// Most fan-out shards a relay runs (session tokens carry the shard in two hex digits).
const MAX_SHARDS: usize = 64;

/// The listeners' totals as each shard last reported them, merged into the one snapshot
/// the rest of the relay reads.
struct Board {
    parts: std::sync::Mutex<Vec<RelaySnapshot>>,
    /// Each shard's share of the node's capacity.
    caps: Vec<usize>,
    tx: watch::Sender<RelaySnapshot>,
    template: RelaySnapshot,
    /// Where the search for the roomiest shard starts, turning on each placement.
    rotate: std::sync::atomic::AtomicUsize,
}

impl Board {
    fn parts(&self) -> std::sync::MutexGuard<'_, Vec<RelaySnapshot>> {
        // Every update replaces one element whole: a panic elsewhere cannot leave it torn.
        self.parts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, index: usize, part: RelaySnapshot) {
        let mut parts = self.parts();
        if parts[index] == part {
            return;
        }
        parts[index] = part;
        let mut merged = self.template.clone();
        for p in parts.iter() {
            merged.total += p.total;
            for (b, n) in &p.per_broadcast {
                *merged.per_broadcast.entry(b.clone()).or_default() += n;
            }
        }
        drop(parts);
        metrics::gauge!("tern_relay_listeners").set(merged.total as f64);
        self.tx.send_if_modified(|s| {
            if *s != merged {
                *s = merged;
                true
            } else {
                false
            }
        });
    }

    /// The shard with the most room left (the first of equals after a rotating start, so a
    /// burst of arrivals spreads before the counts catch up).
    fn roomiest(&self) -> usize {
        let parts = self.parts();
        let n = parts.len();
        let start = self
            .rotate
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % n;
        (0..n)
            .map(|k| (start + k) % n)
            .max_by_key(|&i| {
                // max_by_key keeps the last maximum: reverse the order of equals.
                (
                    self.caps[i].saturating_sub(parts[i].total),
                    std::cmp::Reverse((i + n - start) % n),
                )
            })
            .unwrap_or(0)
    }
}

/// One fan-out shard: a [`Fanout`] core, its listeners and its sessions.
struct Shard {
    index: usize,
    fanout: Fanout,
    socket: Arc<UdpSocket>,
    rx: mpsc::Receiver<Command>,
    /// The next shard in the ring, for datagrams from senders this shard does not know.
    next: mpsc::Sender<Command>,
    /// Shards in the ring.
    ring: usize,
    board: Arc<Board>,
    capacity: usize,
    announce: SocketAddr,
}

impl Shard {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut buf = vec![0u8; 2048];
        let mut out = Vec::new();
        let mut sessions: HashMap<String, ListenerId> = HashMap::new();
        let mut last_stats = self.fanout.stats();
        let mut trim = Trim::default();
        let mut last_count = usize::MAX;
        let mut last_refresh = Instant::now();
        let mut frame_arrived = None;
        loop {
            let deadline = self.fanout.poll_timeout();
            let sleep = async {
                match deadline {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok((n, src)) => self.receive(src, &buf[..n], 0),
                    // ICMP errors surface here on some systems; they concern one peer only.
                    Err(e) => debug!("WebRTC socket receive: {e}"),
                },
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => {
                        let arrived = self.handle_command(&mut sessions, cmd);
                        // While a frame is still going out, the older arrival stands.
                        frame_arrived = frame_arrived.or(arrived);
                    }
                    None => break,
                },
                () = sleep => self.fanout.handle_timeout(Instant::now()),
                () = crate::stopped(&mut shutdown) => break,
            }
            flush(&self.socket, &mut self.fanout, &mut out).await;
            // The core queued a frame's packets for every listener at once and they have just
            // been handed to the kernel: from the frame's arrival from upstream to now is the
            // time the relay adds (queueing to this shard included).
            if let Some(t) = frame_arrived.take() {
                metrics::histogram!("tern_relay_frame_fanout_seconds").record(t.elapsed());
            }
            self.handle_events(&mut sessions);
            // Counters and the health snapshot are refreshed when listeners come or go,
            // and otherwise a few times a second: not for every packet.
            let count = self.fanout.listener_count();
            if count != last_count || last_refresh.elapsed() >= REFRESH {
                last_count = count;
                last_refresh = Instant::now();
                let handoffs = last_stats.handoffs;
                last_stats = record_stats(&self.fanout, last_stats);
                if last_stats.handoffs > handoffs {
                    trim.freed(Instant::now());
                }
                trim.maybe_release(Instant::now());
                self.board.publish(
                    self.index,
                    snapshot_of(&self.fanout, self.capacity, self.announce),
                );
            }
        }
        // Say goodbye to every listener so browsers notice at once.
        let ids: Vec<ListenerId> = sessions.values().copied().collect();
        for id in ids {
            self.fanout.remove_listener(id);
        }
        flush(&self.socket, &mut self.fanout, &mut out).await;
        self.board.publish(
            self.index,
            snapshot_of(&self.fanout, self.capacity, self.announce),
        );
    }

    /// A datagram read from the socket (`hops` = 0) or passed on by another shard.
    fn receive(&mut self, source: SocketAddr, data: &[u8], hops: usize) {
        if self.fanout.knows(source, data) || hops + 1 >= self.ring {
            // Ours, or nobody's: the core counts and drops what it cannot match.
            self.fanout.handle_receive(source, data, Instant::now());
        } else {
            let fwd = Command::Datagram {
                source,
                data: data.to_vec(),
                hops: hops + 1,
            };
            // Never wait on another shard (it may be waiting on us): a full queue loses
            // this datagram as the network might, and the peer repeats it.
            if self.next.try_send(fwd).is_err() {
                metrics::counter!("tern_relay_forward_drops_total").increment(1);
            }
        }
    }

    /// Carries out `cmd`; for a frame, returns when it arrived from upstream.
    fn handle_command(
        &mut self,
        sessions: &mut HashMap<String, ListenerId>,
        cmd: Command,
    ) -> Option<Instant> {
        let now = Instant::now();
        let fanout = &mut self.fanout;
        match cmd {
            Command::Add {
                broadcast,
                offer,
                reply,
            } => {
                let result = fanout
                    .add_listener(broadcast, &offer, now)
                    .map(|(id, answer)| {
                        let token = session_token(self.index);
                        sessions.insert(token.clone(), id);
                        (token, answer)
                    });
                match &result {
                    Ok(_) => {
                        metrics::counter!("tern_relay_sessions_created_total").increment(1);
                        // Before the reply: the next placement must see this listener.
                        self.board.publish(
                            self.index,
                            snapshot_of(fanout, self.capacity, self.announce),
                        );
                    }
                    Err(_) => metrics::counter!("tern_relay_sessions_failed_total").increment(1),
                }
                // The WHEP request may have been abandoned; the listener then times out.
                let _ = reply.send(result);
            }
            Command::Remove {
                broadcast,
                session,
                reply,
            } => {
                let found = sessions
                    .get(&session)
                    .copied()
                    .filter(|id| fanout.broadcast_of(*id) == Some(&broadcast));
                let removed = found.is_some_and(|id| fanout.remove_listener(id));
                let _ = reply.send(removed);
            }
            Command::Frame {
                broadcast,
                frame,
                arrived,
            } => {
                fanout.handle_frame(&broadcast, &frame, now);
                return Some(arrived);
            }
            Command::Datagram { source, data, hops } => self.receive(source, &data, hops),
            Command::Exists {
                broadcast,
                session,
                reply,
            } => {
                let found = sessions
                    .get(&session)
                    .is_some_and(|id| fanout.broadcast_of(*id) == Some(&broadcast));
                let _ = reply.send(found);
            }
        }
        None
    }

    fn handle_events(&mut self, sessions: &mut HashMap<String, ListenerId>) {
        let shard = self.index;
        while let Some(e) = self.fanout.poll_event() {
            match e {
                FanoutEvent::Connected { id, srtp_profile } => {
                    info!(shard, listener = id.0, srtp_profile, "listener connected");
                    metrics::counter!("tern_relay_srtp_sessions_total", "profile" => srtp_profile)
                        .increment(1);
                }
                FanoutEvent::Report {
                    loss, jitter, rtt, ..
                } => {
                    metrics::histogram!("tern_relay_listener_loss_ratio").record(f64::from(loss));
                    metrics::histogram!("tern_relay_listener_jitter_seconds")
                        .record(jitter.as_secs_f64());
                    if let Some(rtt) = rtt {
                        metrics::histogram!("tern_relay_listener_rtt_seconds")
                            .record(rtt.as_secs_f64());
                    }
                }
                FanoutEvent::Left {
                    id,
                    broadcast,
                    reason,
                } => {
                    info!(shard, listener = id.0, %broadcast, ?reason, "listener left");
                    sessions.retain(|_, v| *v != id);
                }
            }
        }
    }
}

/// Sends everything the core has queued, in batches; `out` is reused between calls.
async fn flush(socket: &UdpSocket, fanout: &mut Fanout, out: &mut Vec<str0m::net::Transmit>) {
    out.clear();
    while let Some(t) = fanout.poll_transmit() {
        out.push(t);
    }
    if out.is_empty() {
        return;
    }
    let sent = crate::udp::send_all(socket, out).await;
    if sent.errors > 0 {
        // One unreachable listener must not stop the others' packets: counted, not fatal.
        metrics::counter!("tern_relay_send_errors_total").increment(sent.errors as u64);
    }
}

fn record_stats(fanout: &Fanout, last: crate::fanout::FanoutStats) -> crate::fanout::FanoutStats {
    let s = fanout.stats();
    metrics::counter!("tern_relay_frames_out_total").increment(s.frames_out - last.frames_out);
    metrics::counter!("tern_relay_packets_out_total")
        .increment(s.datagrams_out - last.datagrams_out);
    metrics::counter!("tern_relay_bytes_out_total").increment(s.bytes_out - last.bytes_out);
    metrics::counter!("tern_relay_unmatched_datagrams_total")
        .increment(s.unmatched_in - last.unmatched_in);
    metrics::counter!("tern_relay_nacks_total").increment(s.nacks_in - last.nacks_in);
    metrics::counter!("tern_relay_retransmits_total").increment(s.retransmits - last.retransmits);
    metrics::counter!("tern_relay_retransmits_missed_total")
        .increment(s.retransmits_missed - last.retransmits_missed);
    metrics::counter!("tern_relay_sender_reports_total")
        .increment(s.sender_reports - last.sender_reports);
    metrics::counter!("tern_relay_rtcp_rejected_total")
        .increment(s.rtcp_rejected - last.rtcp_rejected);
    metrics::counter!("tern_relay_handoffs_total").increment(s.handoffs - last.handoffs);
    metrics::counter!("tern_relay_consent_answers_total")
        .increment(s.consent_answers - last.consent_answers);
    s
}

fn snapshot_of(fanout: &Fanout, capacity: usize, announce: SocketAddr) -> RelaySnapshot {
    RelaySnapshot {
        total: fanout.listener_count(),
        per_broadcast: fanout
            .listeners_per_broadcast()
            .map(|(b, n)| (b.to_string(), n))
            .collect(),
        capacity,
        webrtc_addr: Some(announce),
    }
}

/// An unguessable session id: knowing one session's URL must not let anyone end another's.
/// The first two hex digits name the shard that holds the session; 120 random bits follow.
fn session_token(shard: usize) -> String {
    format!("{shard:02x}{:030x}", rand::random::<u128>() >> 8)
}

/// The shard a session token names, if it is one of ours in shape.
fn shard_of(token: &str) -> Option<usize> {
    if token.len() != 32 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    usize::from_str_radix(&token[..2], 16).ok()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn session_tokens_name_their_shard_and_stay_unguessable() {
        for shard in 0..MAX_SHARDS {
            let t = session_token(shard);
            assert_eq!(t.len(), 32);
            assert_eq!(shard_of(&t), Some(shard));
        }
        assert_ne!(session_token(1), session_token(1));
        for bad in ["", "zz", &"g".repeat(32), &"0".repeat(31), &"0".repeat(33)] {
            assert_eq!(shard_of(bad), None, "{bad}");
        }
    }

    fn board(caps: Vec<usize>) -> Board {
        let n = caps.len();
        Board {
            parts: std::sync::Mutex::new(vec![RelaySnapshot::default(); n]),
            caps,
            tx: watch::channel(RelaySnapshot::default()).0,
            template: RelaySnapshot::default(),
            rotate: Default::default(),
        }
    }

    fn part(total: usize) -> RelaySnapshot {
        RelaySnapshot {
            total,
            per_broadcast: [("demo".to_owned(), total)].into(),
            ..Default::default()
        }
    }

    #[test]
    fn placement_prefers_room_and_spreads_ties() {
        let b = board(vec![2, 2, 2]);
        let picks: BTreeSet<usize> = (0..6).map(|_| b.roomiest()).collect();
        assert_eq!(picks.len(), 3, "equal shards all get picked: {picks:?}");
        b.publish(0, part(1));
        b.publish(2, part(2));
        // Room: 1, 2, 0.
        assert!((0..6).all(|_| b.roomiest() == 1));
        b.publish(1, part(1));
        // Room: 1, 1, 0: both with room, never the full one.
        let picks: BTreeSet<usize> = (0..6).map(|_| b.roomiest()).collect();
        assert_eq!(picks, [0, 1].into());
        b.publish(1, part(2));
        let merged = b.tx.borrow().clone();
        assert_eq!(merged.total, 5);
        assert_eq!(merged.per_broadcast["demo"], 5);
        assert_eq!(b.roomiest(), 0);
    }
}
