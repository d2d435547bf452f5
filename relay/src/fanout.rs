//! The relay's fan-out core: many WebRTC listeners on one UDP socket, fed frames per broadcast.
//!
//! Sans-IO in the str0m manner: no sockets, no tasks, no clock. The shell calls
//!
//! 1. [`Fanout::add_listener`] / [`Fanout::remove_listener`] when WHEP says so,
//! 2. [`Fanout::handle_receive`] for every datagram from the UDP socket,
//! 3. [`Fanout::handle_frame`] for every frame of a broadcast from upstream,
//! 4. [`Fanout::handle_timeout`] when [`Fanout::poll_timeout`] is due,
//!
//! and after each call drains [`Fanout::poll_transmit`] (to the socket) and
//! [`Fanout::poll_event`]. Time is always the caller's `now`.
//!
//! Each listener is one ICE-lite [`str0m::Rtc`]. All listeners share one DTLS certificate
//! (making one per listener costs a key generation each). Incoming datagrams are routed by
//! source address; a new address is matched to its listener by the ICE username of its STUN
//! binding request, so demultiplexing stays O(1) however many listeners there are. Opus frames
//! are handed to every listener as one shared buffer: the payload is never copied per listener.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use str0m::change::SdpOffer;
use str0m::crypto::CryptoProvider;
use str0m::media::{Frequency, MediaTime, Mid, Pt};
use str0m::net::{Protocol, Receive, Transmit};
use str0m::rtp::{AbsCaptureTime, Extension};
use str0m::{Candidate, Event, IceConnectionState, IceCreds, Input, Output, Rtc};
use tern_origin_link::{BroadcastId, Frame};
use tracing::debug;

use crate::Error;

/// How often each listener's send statistics (with its receiver reports) are summarised.
pub const STATS_INTERVAL: Duration = Duration::from_secs(5);

/// RTP header extension id offered for abs-capture-time when the listener supports it.
const ABS_CAPTURE_TIME_ID: u8 = 14;

/// Header-extension id offered for the RTP MID (the id browsers use).
const MID_ID: u8 = 4;

/// A listener that has not completed ICE + DTLS by then is dropped.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Identifies one WebRTC listener of this relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerId(pub u64);

/// Why a listener left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaveReason {
    /// WHEP DELETE.
    Deleted,
    /// ICE consent lost or the peer closed DTLS.
    Disconnected,
    /// Never connected within [`CONNECT_TIMEOUT`].
    ConnectTimeout,
    /// The WebRTC stack reported an unrecoverable error for this peer.
    Failed,
}

/// What the core tells its shell.
#[derive(Debug, Clone, PartialEq)]
pub enum FanoutEvent {
    /// ICE and DTLS are up; media flows from now on.
    Connected(ListenerId),
    /// A listener's receiver report, summarised (about every [`STATS_INTERVAL`]).
    Report {
        /// Who reported.
        id: ListenerId,
        /// Fraction of packets lost in the last interval, 0..=1.
        loss: f32,
        /// Interarrival jitter seen by the listener.
        jitter: Duration,
        /// Round-trip time, when known.
        rtt: Option<Duration>,
    },
    /// The listener is gone and its state freed.
    Left {
        /// Who left.
        id: ListenerId,
        /// The broadcast it listened to.
        broadcast: BroadcastId,
        /// Why.
        reason: LeaveReason,
    },
}

/// Static settings of the core.
#[derive(Debug, Clone)]
pub struct FanoutConfig {
    /// The address listeners send to: the one host candidate announced in every answer.
    pub announce: SocketAddr,
    /// The local socket address (destination of every received datagram).
    pub local: SocketAddr,
    /// At most this many listeners at once; more are refused.
    pub max_listeners: usize,
}

/// Counters, cheap to read at any time.
#[derive(Debug, Clone, Copy, Default)]
pub struct FanoutStats {
    /// Frames received from upstream.
    pub frames_in: u64,
    /// Frames handed to listeners (one per listener per frame).
    pub frames_out: u64,
    /// Datagrams queued for the socket.
    pub datagrams_out: u64,
    /// Bytes queued for the socket.
    pub bytes_out: u64,
    /// Datagrams received that matched no listener.
    pub unmatched_in: u64,
}

struct Listener {
    rtc: Rtc,
    broadcast: BroadcastId,
    ufrag: String,
    addrs: Vec<SocketAddr>,
    /// Where the Opus stream is written once the offer's audio m-line is known.
    media: Option<(Mid, Pt)>,
    connected: bool,
    created: Instant,
    next_timeout: Instant,
    /// The deadline this listener is filed under in `Fanout::timers`, if any.
    timer_key: Option<Instant>,
    /// Queued in `Fanout::dead` for reaping.
    reaping: bool,
    dead: Option<LeaveReason>,
}

/// The fan-out state machine. See the module docs for the calling contract.
pub struct Fanout {
    config: FanoutConfig,
    crypto: Arc<CryptoProvider>,
    dtls_cert: str0m::config::DtlsCert,
    next_id: u64,
    /// Boxed: an `Rtc` is several KiB, and the table keeps spare slots and doubles on growth.
    listeners: HashMap<ListenerId, Box<Listener>>,
    by_ufrag: HashMap<String, ListenerId>,
    by_addr: HashMap<SocketAddr, ListenerId>,
    members: HashMap<BroadcastId, Vec<ListenerId>>,
    timelines: HashMap<BroadcastId, Timeline>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<FanoutEvent>,
    stats: FanoutStats,
    /// Every listener's next deadline, ordered: finding due timers costs O(log n), not a scan.
    timers: BTreeSet<(Instant, ListenerId)>,
    /// Listeners to free at the next `reap`; nothing else is scanned for dead peers.
    dead: Vec<ListenerId>,
}

impl Fanout {
    /// A core with no listeners.
    pub fn new(config: FanoutConfig) -> Result<Self, Error> {
        let crypto = Arc::new(str0m::crypto::from_feature_flags());
        let dtls_cert = crypto
            .dtls_provider
            .generate_certificate()
            .ok_or_else(|| Error::WebRtc("could not make a DTLS certificate".into()))?;
        Ok(Self {
            config,
            crypto,
            dtls_cert,
            next_id: 1,
            listeners: HashMap::new(),
            by_ufrag: HashMap::new(),
            by_addr: HashMap::new(),
            members: HashMap::new(),
            timelines: HashMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: FanoutStats::default(),
            timers: BTreeSet::new(),
            dead: Vec::new(),
        })
    }

    /// Accepts a WHEP offer for `broadcast`, returning the new listener and the SDP answer.
    ///
    /// Errors leave every other listener untouched.
    pub fn add_listener(
        &mut self,
        broadcast: BroadcastId,
        offer: &str,
        now: Instant,
    ) -> Result<(ListenerId, String), Error> {
        if self.listeners.len() >= self.config.max_listeners {
            return Err(Error::Full);
        }
        check_offer(offer)?;
        let offer = SdpOffer::from_sdp_string(offer)
            .map_err(|e| Error::BadOffer(format!("unparseable SDP: {e}")))?;

        let creds = IceCreds::new();
        let mut rtc = Rtc::builder()
            .set_ice_lite(true)
            .set_crypto_provider(self.crypto.clone())
            .set_dtls_cert(self.dtls_cert.clone())
            .set_local_ice_credentials(creds.clone())
            .clear_codecs()
            .enable_opus(true, false)
            // Only the header extensions a passthrough audio sender uses. Transport-wide
            // congestion control in particular would keep a 1000-packet send history per
            // listener (~40 KiB) and draw a feedback packet from every browser every
            // ~100 ms, for a bandwidth estimate a fixed-rate Opus relay has no use for.
            .clear_extension_map()
            .set_extension(MID_ID, Extension::RtpMid)
            // Listeners that offer it learn each frame's capture time at the origin.
            .set_extension(ABS_CAPTURE_TIME_ID, Extension::AbsoluteCaptureTime)
            .set_stats_interval(Some(STATS_INTERVAL))
            .build(now);
        let candidate = Candidate::host(self.config.announce, "udp")
            .map_err(|e| Error::WebRtc(format!("host candidate: {e}")))?;
        rtc.add_local_candidate(candidate);
        let answer = rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| Error::BadOffer(format!("offer refused: {e}")))?;

        let answer = answer.to_sdp_string();
        // str0m announces the media only once DTLS is up; the answer already says which
        // m-line carries Opus and under which payload type, so refuse a useless offer now.
        let media = answer_media(&answer).ok_or_else(|| {
            Error::BadOffer("the offer has no audio stream that can receive Opus".into())
        })?;

        let id = ListenerId(self.next_id);
        self.next_id += 1;
        let mut listener = Listener {
            rtc,
            broadcast: broadcast.clone(),
            ufrag: creds.ufrag.clone(),
            addrs: Vec::new(),
            media: Some(media),
            connected: false,
            created: now,
            next_timeout: now,
            timer_key: None,
            reaping: false,
            dead: None,
        };
        drain(
            id,
            &mut listener,
            &mut self.transmits,
            &mut self.events,
            &mut self.stats,
        );
        self.by_ufrag.insert(creds.ufrag, id);
        self.members.entry(broadcast).or_default().push(id);
        self.listeners.insert(id, Box::new(listener));
        if let Some(l) = self.listeners.get_mut(&id) {
            schedule(id, l, &mut self.timers, &mut self.dead);
        }
        Ok((id, answer))
    }

    /// Ends a listener's session (WHEP DELETE). Returns false if there was no such listener.
    pub fn remove_listener(&mut self, id: ListenerId) -> bool {
        let Some(l) = self.listeners.get_mut(&id) else {
            return false;
        };
        l.rtc.disconnect();
        l.dead = Some(LeaveReason::Deleted);
        drain(
            id,
            l,
            &mut self.transmits,
            &mut self.events,
            &mut self.stats,
        );
        schedule(id, l, &mut self.timers, &mut self.dead);
        self.reap();
        true
    }

    /// The broadcast a listener listens to.
    pub fn broadcast_of(&self, id: ListenerId) -> Option<&BroadcastId> {
        self.listeners.get(&id).map(|l| &l.broadcast)
    }

    /// Whether a datagram from `source` belongs to one of this core's listeners: a known
    /// address, or a STUN request naming one of its ICE usernames.
    pub fn knows(&self, source: SocketAddr, data: &[u8]) -> bool {
        self.owner(source, data).is_some()
    }

    /// The listener a datagram from `source` belongs to: by address, or for a STUN request
    /// from an address not seen yet, by the ICE username it names.
    fn owner(&self, source: SocketAddr, data: &[u8]) -> Option<ListenerId> {
        match self.by_addr.get(&source) {
            Some(id) => Some(*id),
            None => stun_local_ufrag(data).and_then(|u| self.by_ufrag.get(u).copied()),
        }
    }

    /// One datagram from the socket. Returns false if it matched no listener (and was dropped).
    pub fn handle_receive(&mut self, source: SocketAddr, data: &[u8], now: Instant) -> bool {
        let Some(id) = self.owner(source, data) else {
            self.stats.unmatched_in += 1;
            return false;
        };
        let Some(l) = self.listeners.get_mut(&id) else {
            return false;
        };
        let Ok(contents) = data.try_into() else {
            // Not STUN, DTLS or (S)RTP: garbage from this address, dropped.
            return false;
        };
        let input = Input::Receive(
            now,
            Receive {
                proto: Protocol::Udp,
                source,
                destination: self.config.local,
                contents,
            },
        );
        if !l.rtc.accepts(&input) {
            return false;
        }
        if !l.addrs.contains(&source) {
            l.addrs.push(source);
            self.by_addr.insert(source, id);
        }
        if let Err(e) = l.rtc.handle_input(input) {
            // A bad packet costs this packet only; the session goes on.
            debug!(listener = id.0, "dropped input: {e}");
        }
        drain(
            id,
            l,
            &mut self.transmits,
            &mut self.events,
            &mut self.stats,
        );
        schedule(id, l, &mut self.timers, &mut self.dead);
        self.reap();
        true
    }

    /// One frame of `broadcast` from upstream: written to every connected listener of it.
    pub fn handle_frame(&mut self, broadcast: &BroadcastId, frame: &Frame, now: Instant) {
        self.stats.frames_in += 1;
        let Some(ids) = self.members.get(broadcast) else {
            return;
        };
        // One allocation per frame, shared by every listener's packetizer.
        let payload: Arc<[u8]> = Arc::from(&frame.payload[..]);
        let media = self
            .timelines
            .entry(broadcast.clone())
            .or_default()
            .map(frame.timestamp, now);
        let rtp_time = MediaTime::new(media, Frequency::FORTY_EIGHT_KHZ);
        let capture = AbsCaptureTime {
            capture_time: UNIX_EPOCH + Duration::from_micros(frame.capture_time_us),
            clock_offset: None,
        };
        for id in ids {
            // Members and listeners are kept in step by `reap`.
            let Some(l) = self.listeners.get_mut(id) else {
                continue;
            };
            let Some((mid, pt)) = l.media else { continue };
            if !l.connected || l.dead.is_some() {
                continue;
            }
            let Some(writer) = l.rtc.writer(mid) else {
                continue;
            };
            match writer
                .abs_capture_time(capture)
                .write(pt, now, rtp_time, payload.clone())
            {
                Ok(()) => self.stats.frames_out += 1,
                Err(e) => debug!(listener = id.0, "write failed: {e}"),
            }
            drain(
                *id,
                l,
                &mut self.transmits,
                &mut self.events,
                &mut self.stats,
            );
            schedule(*id, l, &mut self.timers, &mut self.dead);
        }
        self.reap();
    }

    /// Drives every listener whose timer is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        // Take the due ones first: a listener that re-arms for `now` runs on the next call,
        // never in a loop here.
        let mut due = Vec::new();
        while let Some(&(t, id)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            due.push(id);
        }
        for id in due {
            let Some(l) = self.listeners.get_mut(&id) else {
                continue;
            };
            l.timer_key = None;
            if !l.connected && l.dead.is_none() && now >= l.created + CONNECT_TIMEOUT {
                l.dead = Some(LeaveReason::ConnectTimeout);
            } else if l.next_timeout <= now {
                if let Err(e) = l.rtc.handle_input(Input::Timeout(now)) {
                    debug!(listener = id.0, "timeout handling failed: {e}");
                    l.dead = Some(LeaveReason::Failed);
                }
                drain(
                    id,
                    l,
                    &mut self.transmits,
                    &mut self.events,
                    &mut self.stats,
                );
            }
            schedule(id, l, &mut self.timers, &mut self.dead);
        }
        self.reap();
    }

    /// When [`Fanout::handle_timeout`] must next be called, if any listener exists.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.first().map(|(t, _)| *t)
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event for the shell.
    pub fn poll_event(&mut self) -> Option<FanoutEvent> {
        self.events.pop_front()
    }

    /// Listeners now, in total.
    pub fn listener_count(&self) -> usize {
        self.listeners.len()
    }

    /// Listeners per broadcast.
    pub fn listeners_per_broadcast(&self) -> impl Iterator<Item = (&BroadcastId, usize)> {
        self.members.iter().map(|(b, ids)| (b, ids.len()))
    }

    /// Counters.
    pub fn stats(&self) -> FanoutStats {
        self.stats
    }

    /// Frees every listener queued as dead and reports it.
    fn reap(&mut self) {
        for id in std::mem::take(&mut self.dead) {
            let Some(mut l) = self.listeners.remove(&id) else {
                continue;
            };
            if let Some(k) = l.timer_key.take() {
                self.timers.remove(&(k, id));
            }
            // Flush what the peer should still hear (e.g. DTLS close_notify).
            drain(
                id,
                &mut l,
                &mut self.transmits,
                &mut self.events,
                &mut self.stats,
            );
            self.by_ufrag.remove(&l.ufrag);
            for a in &l.addrs {
                self.by_addr.remove(a);
            }
            if let Some(ids) = self.members.get_mut(&l.broadcast) {
                ids.retain(|x| *x != id);
                if ids.is_empty() {
                    self.members.remove(&l.broadcast);
                    self.timelines.remove(&l.broadcast);
                }
            }
            self.events.push_back(FanoutEvent::Left {
                id,
                broadcast: l.broadcast,
                reason: l.dead.unwrap_or(LeaveReason::Disconnected),
            });
        }
    }
}

/// Keeps the RTP timeline that listeners of one broadcast see continuous when the upstream's
/// media time restarts (origin restart) or leaps (a new source), so their decoders never
/// see time run backwards: after a discontinuity, output resumes one frame after the last
/// one plus the wall-clock time that passed.
#[derive(Default)]
struct Timeline {
    /// Output = input + offset.
    offset: i128,
    /// Last input timestamp, last output timestamp, and when.
    last: Option<(u64, u64, Instant)>,
}

/// A forward leap beyond the wall-clock time elapsed plus this (10 s at 48 kHz) is a
/// discontinuity, not a stretch of DTX silence.
const MAX_LEAP: u64 = 480_000;

impl Timeline {
    fn map(&mut self, ts: u64, now: Instant) -> u64 {
        if let Some((last_in, last_out, at)) = self.last {
            let elapsed = now.saturating_duration_since(at).as_micros() as u64 * 48 / 1000;
            if ts <= last_in || ts > last_in + elapsed + MAX_LEAP {
                let resume = last_out + 960 + elapsed;
                self.offset = i128::from(resume) - i128::from(ts);
            }
        }
        // The offset only ever moves output forward of `last_out`, so it stays positive.
        let out = u64::try_from(i128::from(ts) + self.offset).unwrap_or(ts);
        self.last = Some((ts, out, now));
        out
    }
}

/// Files a listener under its next deadline (the earlier of str0m's timeout and, until
/// connected, the connect deadline), and queues it for reaping once it is dead.
fn schedule(
    id: ListenerId,
    l: &mut Listener,
    timers: &mut BTreeSet<(Instant, ListenerId)>,
    dead: &mut Vec<ListenerId>,
) {
    if (l.dead.is_some() || !l.rtc.is_alive()) && !l.reaping {
        l.reaping = true;
        dead.push(id);
    }
    let want = if l.connected {
        l.next_timeout
    } else {
        l.next_timeout.min(l.created + CONNECT_TIMEOUT)
    };
    if l.timer_key != Some(want) {
        if let Some(old) = l.timer_key.take() {
            timers.remove(&(old, id));
        }
        timers.insert((want, id));
        l.timer_key = Some(want);
    }
}

/// Pulls everything a listener's `Rtc` has to say, as str0m requires after each input.
fn drain(
    id: ListenerId,
    l: &mut Listener,
    transmits: &mut VecDeque<Transmit>,
    events: &mut VecDeque<FanoutEvent>,
    stats: &mut FanoutStats,
) {
    loop {
        match l.rtc.poll_output() {
            Ok(Output::Timeout(t)) => {
                l.next_timeout = t;
                return;
            }
            Ok(Output::Transmit(t)) => {
                stats.datagrams_out += 1;
                stats.bytes_out += t.contents.len() as u64;
                transmits.push_back(t);
            }
            Ok(Output::Event(e)) => match e {
                Event::Connected => {
                    l.connected = true;
                    events.push_back(FanoutEvent::Connected(id));
                }
                Event::IceConnectionStateChange(IceConnectionState::Disconnected)
                | Event::Closed => {
                    l.dead.get_or_insert(LeaveReason::Disconnected);
                }
                _ => {}
            },
            Err(e) => {
                debug!(listener = id.0, "rtc failed: {e}");
                l.dead.get_or_insert(LeaveReason::Failed);
                return;
            }
        }
    }
}

/// The (mid, payload type) of the first sending audio m-line of our answer that has Opus.
fn answer_media(answer: &str) -> Option<(Mid, Pt)> {
    let mut in_audio = false;
    let mut mid = None;
    let mut pt = None;
    for line in answer.lines().chain(std::iter::once("m=end 0")) {
        if line.starts_with("m=") {
            if let (true, Some(m), Some(p)) = (in_audio, mid, pt) {
                return Some((Mid::from(m), Pt::new_with_value(p)));
            }
            // A port of 0 means the m-line was rejected.
            in_audio = line.starts_with("m=audio ") && !line.starts_with("m=audio 0 ");
            mid = None;
            pt = None;
        } else if let Some(m) = line.strip_prefix("a=mid:") {
            mid = Some(m.trim());
        } else if let Some((p, enc)) = line
            .strip_prefix("a=rtpmap:")
            .and_then(|r| r.split_once(' '))
        {
            if pt.is_none() && enc.to_ascii_lowercase().starts_with("opus/48000") {
                pt = p.parse::<u8>().ok();
            }
        } else if line.starts_with("a=inactive") || line.starts_with("a=recvonly") {
            in_audio = false;
        }
    }
    None
}

/// Cheap checks that give a WHEP client a precise reason before the SDP parser runs.
fn check_offer(offer: &str) -> Result<(), Error> {
    if !offer.starts_with("v=0") {
        return Err(Error::BadOffer(
            "body is not an SDP offer (must start with v=0)".into(),
        ));
    }
    let has_audio = offer.lines().any(|l| l.starts_with("m=audio "));
    if !has_audio {
        return Err(Error::BadOffer("the offer has no audio m-line".into()));
    }
    let has_opus = offer.lines().any(|l| {
        l.strip_prefix("a=rtpmap:")
            .and_then(|rest| rest.split_once(' '))
            .is_some_and(|(_, enc)| enc.to_ascii_lowercase().starts_with("opus/48000"))
    });
    if !has_opus {
        return Err(Error::BadOffer(
            "the offer's audio does not include Opus/48000".into(),
        ));
    }
    Ok(())
}

/// The local (our) ICE username fragment of a STUN binding request, if `data` is one.
///
/// STUN (RFC 8489): 20-byte header with the magic cookie at bytes 4..8, then TLV attributes
/// padded to 4 bytes. USERNAME (0x0006) is "ours:theirs" in requests we receive.
fn stun_local_ufrag(data: &[u8]) -> Option<&str> {
    if data.len() < 20 || data[0] >= 4 || data[4..8] != [0x21, 0x12, 0xa4, 0x42] {
        return None;
    }
    let mut rest = &data[20..];
    while rest.len() >= 4 {
        let ty = u16::from_be_bytes([rest[0], rest[1]]);
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        let value = rest.get(4..4 + len)?;
        if ty == 0x0006 {
            let username = std::str::from_utf8(value).ok()?;
            return username.split(':').next();
        }
        let padded = (4 + len + 3) & !3;
        rest = rest.get(padded..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use str0m::media::{Direction, MediaKind};

    /// A browser-like peer: a full-ICE str0m client with its own address.
    struct Client {
        rtc: Rtc,
        addr: SocketAddr,
        received: Vec<(u64, Vec<u8>)>,
        capture_times: Vec<Option<std::time::SystemTime>>,
        connected: bool,
    }

    impl Client {
        fn new(addr: SocketAddr, now: Instant) -> (Self, String, str0m::change::SdpPendingOffer) {
            let mut rtc = Rtc::builder()
                .set_crypto_provider(Arc::new(str0m::crypto::from_feature_flags()))
                .set_extension(9, Extension::AbsoluteCaptureTime)
                .build(now);
            rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
            let mut api = rtc.sdp_api();
            api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
            let (offer, pending) = api.apply().unwrap();
            (
                Self {
                    rtc,
                    addr,
                    received: vec![],
                    capture_times: vec![],
                    connected: false,
                },
                offer.to_sdp_string(),
                pending,
            )
        }

        fn drain(&mut self, out: &mut Vec<Transmit>) -> Instant {
            loop {
                match self.rtc.poll_output().unwrap() {
                    Output::Timeout(t) => return t,
                    Output::Transmit(t) => out.push(t),
                    Output::Event(Event::Connected) => self.connected = true,
                    Output::Event(Event::MediaData(d)) => {
                        self.received.push((d.time.numer(), d.data.to_vec()));
                        self.capture_times
                            .push(d.ext_vals.abs_capture_time.map(|a| a.capture_time));
                    }
                    Output::Event(_) => {}
                }
            }
        }
    }

    const SERVER: &str = "10.0.0.1:5000";

    fn fanout() -> Fanout {
        Fanout::new(FanoutConfig {
            announce: SERVER.parse().unwrap(),
            local: SERVER.parse().unwrap(),
            max_listeners: 3,
        })
        .unwrap()
    }

    fn demo() -> BroadcastId {
        "demo".parse().unwrap()
    }

    /// Moves datagrams between the core and the clients for `dur` of virtual time, in 1 ms
    /// steps, dropping client-bound datagrams for which `drop` says so.
    fn run(
        f: &mut Fanout,
        clients: &mut [Client],
        now: &mut Instant,
        dur: Duration,
        mut on_tick: impl FnMut(&mut Fanout, Instant, u64),
    ) {
        let end = *now + dur;
        let mut tick = 0u64;
        let mut to_server = Vec::new();
        while *now < end {
            on_tick(f, *now, tick);
            for c in clients.iter_mut() {
                c.rtc.handle_input(Input::Timeout(*now)).unwrap();
                c.drain(&mut to_server);
            }
            for t in to_server.drain(..) {
                f.handle_receive(t.source, &t.contents, *now);
            }
            if f.poll_timeout().is_some_and(|t| t <= *now) {
                f.handle_timeout(*now);
            }
            while let Some(t) = f.poll_transmit() {
                if let Some(c) = clients.iter_mut().find(|c| c.addr == t.destination) {
                    let input = Input::Receive(
                        *now,
                        Receive {
                            proto: Protocol::Udp,
                            source: t.source,
                            destination: t.destination,
                            contents: (&t.contents[..]).try_into().unwrap(),
                        },
                    );
                    c.rtc.handle_input(input).unwrap();
                    // Replies reach the server on the next tick (1 ms one-way delay).
                    c.drain(&mut to_server);
                }
            }
            *now += Duration::from_millis(1);
            tick += 1;
        }
    }

    /// Lets `dur` of virtual time pass with no frames.
    fn idle(f: &mut Fanout, clients: &mut [Client], now: &mut Instant, dur: Duration) {
        run(f, clients, now, dur, |_, _, _| {});
    }

    /// Feeds one frame every 20 ms for `dur`, numbered from `first`; returns how many.
    fn feed(
        f: &mut Fanout,
        clients: &mut [Client],
        now: &mut Instant,
        dur: Duration,
        first: u64,
    ) -> u64 {
        let mut n = 0;
        run(f, clients, now, dur, |f, now, tick| {
            if tick % 20 == 0 {
                f.handle_frame(&demo(), &frame(first + n), now);
                n += 1;
            }
        });
        n
    }

    fn connect(f: &mut Fanout, n: usize, now: Instant) -> (Vec<Client>, Vec<ListenerId>) {
        let mut clients = Vec::new();
        let mut ids = Vec::new();
        for i in 0..n {
            let addr: SocketAddr = format!("10.0.1.{}:6000", i + 1).parse().unwrap();
            let (mut c, offer, pending) = Client::new(addr, now);
            let (id, answer) = f.add_listener(demo(), &offer, now).unwrap();
            let answer = str0m::change::SdpAnswer::from_sdp_string(&answer).unwrap();
            c.rtc.sdp_api().accept_answer(pending, answer).unwrap();
            clients.push(c);
            ids.push(id);
        }
        (clients, ids)
    }

    #[test]
    fn the_answer_keeps_only_the_header_extensions_a_passthrough_sender_uses() {
        let now = Instant::now();
        let mut f = fanout();
        let (_c, offer, _pending) = Client::new("10.0.1.1:6000".parse().unwrap(), now);
        // The browser-like offer has the usual set, congestion control included.
        assert!(offer.contains("transport-wide-cc"), "{offer}");
        let (_, answer) = f.add_listener(demo(), &offer, now).unwrap();
        assert!(answer.contains("abs-capture-time"), "{answer}");
        for absent in ["transport-wide-cc", "abs-send-time", "ssrc-audio-level"] {
            assert!(!answer.contains(absent), "{absent} in {answer}");
        }
    }

    fn frame(seq: u64) -> Frame {
        Frame {
            seq,
            timestamp: seq * 960,
            capture_time_us: 1_700_000_000_000_000 + seq * 20_000,
            payload: Bytes::from(vec![0xf8, seq as u8, 0xaa, 0x55]),
        }
    }

    #[test]
    fn frames_reach_every_listener_in_order() {
        let mut now = Instant::now();
        let mut f = fanout();
        let (mut clients, _) = connect(&mut f, 2, now);
        idle(&mut f, &mut clients, &mut now, Duration::from_secs(2));
        assert!(
            clients.iter().all(|c| c.connected),
            "ICE/DTLS did not complete"
        );
        let seq = feed(&mut f, &mut clients, &mut now, Duration::from_secs(1), 0);
        for c in &clients {
            assert_eq!(c.received.len() as u64, seq, "every frame arrives");
            for (i, (ts, data)) in c.received.iter().enumerate() {
                assert_eq!(data, &frame(i as u64).payload[..], "payload passed through");
                assert_eq!(
                    ts - c.received[0].0,
                    i as u64 * 960,
                    "timestamps follow media time"
                );
            }
        }
        assert_eq!(f.stats().frames_out, 2 * seq);
    }

    #[test]
    fn an_upstream_restart_keeps_listener_timestamps_continuous() {
        let mut now = Instant::now();
        let mut f = fanout();
        let (mut clients, _) = connect(&mut f, 1, now);
        idle(&mut f, &mut clients, &mut now, Duration::from_secs(2));
        let seq = feed(
            &mut f,
            &mut clients,
            &mut now,
            Duration::from_millis(500),
            5_000,
        );
        // 1.5 s without frames, then the origin comes back counting from zero.
        idle(&mut f, &mut clients, &mut now, Duration::from_millis(1500));
        let seq2 = feed(
            &mut f,
            &mut clients,
            &mut now,
            Duration::from_millis(500),
            0,
        );
        let got = &clients[0].received;
        assert_eq!(got.len() as u64, seq + seq2);
        let times: Vec<u64> = got.iter().map(|(t, _)| *t).collect();
        assert!(
            times.windows(2).all(|w| w[1] > w[0]),
            "RTP time never runs backwards"
        );
        let jump = times[seq as usize] - times[seq as usize - 1];
        // One frame plus the ~1.5 s of silence (48 kHz), within a frame of slack.
        assert!(
            (960 + 72_000 - 960..=960 + 72_000 + 1_920).contains(&jump),
            "jump of {jump}"
        );
        assert!(times[seq as usize..].windows(2).all(|w| w[1] - w[0] == 960));
    }

    #[test]
    fn other_broadcasts_are_not_delivered() {
        let mut now = Instant::now();
        let mut f = fanout();
        let (mut clients, _) = connect(&mut f, 1, now);
        idle(&mut f, &mut clients, &mut now, Duration::from_secs(2));
        let other: BroadcastId = "other".parse().unwrap();
        run(
            &mut f,
            &mut clients,
            &mut now,
            Duration::from_millis(200),
            |f, now, tick| {
                if tick % 20 == 0 {
                    f.handle_frame(&other, &frame(tick / 20), now);
                }
            },
        );
        assert!(clients[0].received.is_empty());
    }

    #[test]
    fn bad_offers_are_refused_with_a_reason_and_touch_nothing() {
        let now = Instant::now();
        let mut f = fanout();
        let (_clients, ids) = connect(&mut f, 1, now);
        let video_only = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 VP8/90000\r\n";
        let pcmu_only = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=rtpmap:0 PCMU/8000\r\n";
        let broken = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n";
        for (offer, want) in [
            ("hello", "not an SDP"),
            (video_only, "no audio"),
            (pcmu_only, "Opus"),
            (broken, "SDP"),
        ] {
            match f.add_listener(demo(), offer, now) {
                Err(Error::BadOffer(reason)) => assert!(reason.contains(want), "{reason}"),
                other => panic!("{offer:?} gave {other:?}"),
            }
        }
        assert_eq!(f.listener_count(), 1);
        assert_eq!(f.broadcast_of(ids[0]), Some(&demo()));
    }

    #[test]
    fn capacity_is_enforced() {
        let now = Instant::now();
        let mut f = fanout();
        let _ = connect(&mut f, 3, now);
        let (_, offer, _) = Client::new("10.0.9.9:1".parse().unwrap(), now);
        assert!(matches!(
            f.add_listener(demo(), &offer, now),
            Err(Error::Full)
        ));
    }

    #[test]
    fn garbage_datagrams_do_not_disturb_listeners() {
        let mut now = Instant::now();
        let mut f = fanout();
        let (mut clients, _) = connect(&mut f, 1, now);
        idle(&mut f, &mut clients, &mut now, Duration::from_secs(2));
        let attacker: SocketAddr = "10.9.9.9:666".parse().unwrap();
        let victim = clients[0].addr;
        let mut seq = 0;
        run(
            &mut f,
            &mut clients,
            &mut now,
            Duration::from_millis(500),
            |f, now, tick| {
                // Junk from a stranger, and junk spoofed from the listener's own address.
                f.handle_receive(attacker, &[0u8; 40], now);
                f.handle_receive(victim, &[0x80, 0x60, 1, 2, 3], now);
                f.handle_receive(victim, &[0x16, 0xfe, 0xfd, 0, 0, 0, 0], now);
                if tick % 20 == 0 {
                    f.handle_frame(&demo(), &frame(seq), now);
                    seq += 1;
                }
            },
        );
        assert_eq!(clients[0].received.len() as u64, seq);
        assert!(f.stats().unmatched_in > 0);
    }

    #[test]
    fn delete_and_connect_timeout_free_state() {
        let mut now = Instant::now();
        let mut f = fanout();
        let (mut clients, ids) = connect(&mut f, 2, now);
        idle(&mut f, &mut clients, &mut now, Duration::from_secs(2));
        assert!(f.remove_listener(ids[0]));
        assert!(!f.remove_listener(ids[0]));
        // A listener whose offer was accepted but who never sends a packet.
        let (_, offer, _) = Client::new("10.0.8.8:1".parse().unwrap(), now);
        let (ghost, _) = f.add_listener(demo(), &offer, now).unwrap();
        let mut left = Vec::new();
        run(
            &mut f,
            &mut clients[1..],
            &mut now,
            CONNECT_TIMEOUT + Duration::from_secs(1),
            |f, _, _| {
                while let Some(e) = f.poll_event() {
                    left.push(e);
                }
            },
        );
        assert!(left.contains(&FanoutEvent::Left {
            id: ids[0],
            broadcast: demo(),
            reason: LeaveReason::Deleted
        }));
        assert!(left.contains(&FanoutEvent::Left {
            id: ghost,
            broadcast: demo(),
            reason: LeaveReason::ConnectTimeout
        }));
        assert_eq!(f.listener_count(), 1, "the connected listener stays");
    }

    #[test]
    fn stun_username_parsing() {
        let mut pkt = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
        pkt.extend_from_slice(&[0; 12]);
        // An unrelated attribute first (PRIORITY, 4 bytes), then USERNAME "abcd:wxyz1" (10, padded).
        pkt.extend_from_slice(&[0x00, 0x24, 0x00, 0x04, 1, 2, 3, 4]);
        pkt.extend_from_slice(&[0x00, 0x06, 0x00, 0x0a]);
        pkt.extend_from_slice(b"abcd:wxyz1\0\0");
        assert_eq!(stun_local_ufrag(&pkt), Some("abcd"));
        assert_eq!(stun_local_ufrag(&pkt[..30]), None);
        assert_eq!(stun_local_ufrag(&[0x80; 40]), None);
    }
}
