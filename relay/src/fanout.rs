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
//! Each listener is one ICE-lite [`str0m::Rtc`] for ICE, DTLS and consent freshness. All
//! listeners share one DTLS certificate (making one per listener costs a key generation
//! each). Incoming datagrams are routed by source address; a new address is matched to its
//! listener by the ICE username of its STUN binding request, so demultiplexing stays O(1)
//! however many listeners there are. Once a listener's DTLS handshake is done, its media and
//! RTCP bypass str0m: the core writes each SRTP packet from a header template with the keys
//! the handshake exported ([`crate::egress`]), and reads the listener's SRTCP itself.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::change::SdpOffer;
use str0m::crypto::CryptoProvider;
use str0m::media::Mid;
use str0m::net::{Protocol, Receive, Transmit};
use str0m::rtp::Extension;
use str0m::{Candidate, Event, IceConnectionState, IceCreds, Input, Output, Rtc};
use tern_origin_link::{BroadcastId, Frame};
use tracing::{debug, warn};

use crate::dtls_keys::{self, KeySlot};
#[cfg(test)]
use crate::egress::HISTORY;
use crate::egress::{Egress, FeedbackOutcome, History, Track};
use crate::srtp::SrtpSession;
use crate::stun;
use crate::Error;

/// str0m's own RTCP report interval: in effect never, since the core writes the sender
/// reports (str0m never sees the media, so its reports would count nothing).
const STR0M_REPORT_INTERVAL: Duration = Duration::from_secs(365 * 24 * 3600);

/// RTP header extension id offered for abs-capture-time when the listener supports it.
const ABS_CAPTURE_TIME_ID: u8 = 14;

/// Header-extension id offered for the RTP MID (the id browsers use).
const MID_ID: u8 = 4;

/// A listener that has not completed ICE + DTLS by then is dropped.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// A listener whose binding requests (consent freshness, every ~5 s) stop for this long is
/// gone (the same limit str0m's ICE-lite agent applies).
pub const CONSENT_TIMEOUT: Duration = Duration::from_secs(15);

/// A connected listener's str0m state is freed once the listener has proven its DTLS
/// handshake finished (its first authenticated SRTCP), or at the latest this long after
/// connecting, if its DTLS has been quiet for [`DTLS_QUIET`]: until then, str0m stays to
/// answer a handshake flight the listener may send again because ours was lost.
pub const HANDOFF_AFTER: Duration = Duration::from_secs(10);

/// See [`HANDOFF_AFTER`].
pub const DTLS_QUIET: Duration = Duration::from_secs(5);

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
    Connected {
        /// Who connected.
        id: ListenerId,
        /// The SRTP protection profile its handshake chose, by its registered name.
        srtp_profile: &'static str,
    },
    /// A listener's receiver report (browsers send one every few seconds).
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
    /// RTCP NACK packets received from listeners.
    pub nacks_in: u64,
    /// Packets sent again because a listener asked.
    pub retransmits: u64,
    /// Packets asked for that were no longer kept (older than the broadcast's history).
    pub retransmits_missed: u64,
    /// RTCP sender reports sent.
    pub sender_reports: u64,
    /// SRTCP packets from listeners that did not authenticate (dropped).
    pub rtcp_rejected: u64,
    /// Listeners whose str0m state was freed after their handshake (see [`HANDOFF_AFTER`]).
    pub handoffs: u64,
    /// Consent checks (STUN binding requests) answered by the core after a hand-off.
    pub consent_answers: u64,
}

struct Listener {
    /// ICE, DTLS and consent until the hand-off (see [`Fanout::handle_receive`]); `None`
    /// after it, when the core answers consent checks itself.
    rtc: Option<Box<Rtc>>,
    broadcast: BroadcastId,
    /// Our ICE credentials for this listener.
    ice: stun::Credentials,
    addrs: Vec<SocketAddr>,
    /// Where and how the Opus stream is written, as the answer negotiated.
    track: Track,
    /// Filled with the SRTP keying material when the DTLS handshake completes.
    keys: KeySlot,
    /// The listener's address for media: where its DTLS, and after the handshake its
    /// authenticated SRTCP, comes from.
    dest: Option<SocketAddr>,
    /// The media path, from the moment ICE and DTLS are up.
    egress: Option<Box<Egress>>,
    connected: bool,
    /// When ICE and DTLS came up.
    connected_at: Option<Instant>,
    /// The last DTLS packet from the listener.
    last_dtls_in: Option<Instant>,
    /// The last valid binding request, once the core answers them.
    last_consent: Instant,
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
    broadcasts: HashMap<BroadcastId, Broadcast>,
    out: Sink,
    /// Every listener's next deadline, ordered: finding due timers costs O(log n), not a scan.
    timers: BTreeSet<(Instant, ListenerId)>,
    /// Listeners to free at the next `reap`; nothing else is scanned for dead peers.
    dead: Vec<ListenerId>,
}

impl Fanout {
    /// A core with no listeners.
    pub fn new(config: FanoutConfig) -> Result<Self, Error> {
        let crypto = Arc::new(dtls_keys::provider());
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
            broadcasts: HashMap::new(),
            out: Sink::default(),
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
        let config = Rtc::builder()
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
            // The core writes media, sender reports and retransmissions itself (see the
            // module docs): str0m's send buffer and reports would only hold and count nothing.
            .set_send_buffer_audio(1)
            .set_rtcp_report_interval_audio(STR0M_REPORT_INTERVAL)
            .set_stats_interval(None);
        let (mut rtc, keys) = dtls_keys::build_rtc(config, now);
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
        let track = answer_track(&answer).ok_or_else(|| {
            Error::BadOffer("the offer has no audio stream that can receive Opus".into())
        })?;

        let id = ListenerId(self.next_id);
        self.next_id += 1;
        let mut listener = Listener {
            rtc: Some(Box::new(rtc)),
            broadcast: broadcast.clone(),
            ice: stun::Credentials {
                ufrag: creds.ufrag.clone(),
                pass: creds.pass.clone(),
            },
            addrs: Vec::new(),
            track,
            keys,
            dest: None,
            egress: None,
            connected: false,
            connected_at: None,
            last_dtls_in: None,
            last_consent: now,
            created: now,
            next_timeout: now,
            timer_key: None,
            reaping: false,
            dead: None,
        };
        drain(id, &mut listener, &mut self.out, &self.crypto);
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
        if let Some(rtc) = l.rtc.as_mut() {
            rtc.disconnect();
        } else if let (Some(egress), Some(dest)) = (l.egress.as_mut(), l.dest) {
            // After the hand-off there is no DTLS to close: an RTCP BYE tells the listener.
            let mut bye = Vec::new();
            egress.bye(&mut bye);
            self.out.send(self.config.local, dest, bye);
        }
        l.dead = Some(LeaveReason::Deleted);
        drain(id, l, &mut self.out, &self.crypto);
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
            None => stun::local_ufrag(data).and_then(|u| self.by_ufrag.get(u).copied()),
        }
    }

    /// One datagram from the socket. Returns false if it matched no listener (and was dropped).
    pub fn handle_receive(&mut self, source: SocketAddr, data: &[u8], now: Instant) -> bool {
        let Some(id) = self.owner(source, data) else {
            self.out.stats.unmatched_in += 1;
            return false;
        };
        let Some(l) = self.listeners.get_mut(&id) else {
            return false;
        };
        if let (true, Some(egress)) = (is_rtcp(data), l.egress.as_mut()) {
            // The listener's SRTCP: read here, str0m never sees the media side.
            let history = self.broadcasts.get(&l.broadcast).map(|b| &b.history);
            let mut resend = Vec::new();
            let Some(outcome) = egress.feedback(data, history, now, &mut resend) else {
                self.out.stats.rtcp_rejected += 1;
                return true;
            };
            // Authenticated: this is where the listener receives now.
            l.dest = Some(source);
            for packet in resend {
                self.out.send(self.config.local, source, packet);
            }
            self.out.feedback(id, &outcome);
            if outcome.bye {
                l.dead.get_or_insert(LeaveReason::Disconnected);
            } else if l.rtc.is_some() {
                // Its SRTCP proves the listener finished the DTLS handshake.
                hand_off(id, l, &mut self.out, &self.crypto, now);
            }
            schedule(id, l, &mut self.timers, &mut self.dead);
            self.reap();
            return true;
        }
        let Some(rtc) = l.rtc.as_mut() else {
            // After the hand-off: consent checks are answered here and anything else is
            // dropped. DTLS too: without its state a close_notify cannot be told from a
            // spoofed one; a leaving listener's RTCP BYE (authenticated), its WHEP DELETE or
            // the end of its consent checks end the session instead.
            let mut answer = Vec::new();
            let hmac = self.crypto.sha1_hmac_provider;
            if stun::answer(data, source, &l.ice, hmac, &mut answer).is_err() {
                return false;
            }
            l.last_consent = now;
            self.out.stats.consent_answers += 1;
            if !l.addrs.contains(&source) {
                l.addrs.push(source);
                self.by_addr.insert(source, id);
            }
            self.out.send(self.config.local, source, answer);
            schedule(id, l, &mut self.timers, &mut self.dead);
            return true;
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
        if !rtc.accepts(&input) {
            return false;
        }
        if !l.addrs.contains(&source) {
            l.addrs.push(source);
            self.by_addr.insert(source, id);
        }
        let dtls = is_dtls(data);
        match rtc.handle_input(input) {
            // The peer's DTLS comes from the address ICE selected.
            Ok(()) if dtls => {
                l.dest = Some(source);
                l.last_dtls_in = Some(now);
            }
            Ok(()) => {}
            // A bad packet costs this packet only; the session goes on.
            Err(e) => debug!(listener = id.0, "dropped input: {e}"),
        }
        drain(id, l, &mut self.out, &self.crypto);
        note_connected(l, now);
        schedule(id, l, &mut self.timers, &mut self.dead);
        self.reap();
        true
    }

    /// One frame of `broadcast` from upstream: written to every connected listener of it.
    ///
    /// The hot path of the relay: per listener, one header copy, one SRTP seal, one
    /// datagram queued. str0m is not involved.
    pub fn handle_frame(&mut self, broadcast: &BroadcastId, frame: &Frame, now: Instant) {
        self.out.stats.frames_in += 1;
        let Some(ids) = self.members.get(broadcast) else {
            return;
        };
        let b = self.broadcasts.entry(broadcast.clone()).or_default();
        // Listeners see the low 32 bits of the continuous timeline, as RTP does.
        let rtp_time = b.timeline.map(frame.timestamp, now) as u32;
        let out_frame = b
            .history
            .push(rtp_time, frame.capture_time_us, frame.payload.clone());
        for id in ids {
            // Members and listeners are kept in step by `reap`.
            let Some(l) = self.listeners.get_mut(id) else {
                continue;
            };
            if l.dead.is_some() {
                continue;
            }
            // A listener has egress only once its address is known (`start_egress`).
            let (Some(egress), Some(dest)) = (l.egress.as_mut(), l.dest) else {
                continue;
            };
            let mut packet = Vec::with_capacity(64 + out_frame.payload.len());
            egress.write(out_frame, now, &mut packet);
            self.out.stats.frames_out += 1;
            self.out.send(self.config.local, dest, packet);
            let mut report = Vec::new();
            if egress.maybe_report(now, &mut report) {
                self.out.stats.sender_reports += 1;
                self.out.send(self.config.local, dest, report);
            }
        }
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
            if l.dead.is_some() {
                // Reaped below.
            } else if l.rtc.is_none() {
                if now >= l.last_consent + CONSENT_TIMEOUT {
                    debug!(listener = id.0, "consent expired");
                    l.dead = Some(LeaveReason::Disconnected);
                }
            } else if !l.connected && now >= l.created + CONNECT_TIMEOUT {
                l.dead = Some(LeaveReason::ConnectTimeout);
            } else if handoff_due(l).is_some_and(|t| t <= now) {
                hand_off(id, l, &mut self.out, &self.crypto, now);
            } else if l.next_timeout <= now {
                if let Some(rtc) = l.rtc.as_mut() {
                    if let Err(e) = rtc.handle_input(Input::Timeout(now)) {
                        debug!(listener = id.0, "timeout handling failed: {e}");
                        l.dead = Some(LeaveReason::Failed);
                    }
                }
                drain(id, l, &mut self.out, &self.crypto);
                note_connected(l, now);
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
        self.out.transmits.pop_front()
    }

    /// The next event for the shell.
    pub fn poll_event(&mut self) -> Option<FanoutEvent> {
        self.out.events.pop_front()
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
        self.out.stats
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
            drain(id, &mut l, &mut self.out, &self.crypto);
            self.by_ufrag.remove(&l.ice.ufrag);
            for a in &l.addrs {
                self.by_addr.remove(a);
            }
            if let Some(ids) = self.members.get_mut(&l.broadcast) {
                ids.retain(|x| *x != id);
                if ids.is_empty() {
                    self.members.remove(&l.broadcast);
                    self.broadcasts.remove(&l.broadcast);
                }
            }
            self.out.events.push_back(FanoutEvent::Left {
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

/// Files a listener under its next deadline (str0m's timeout, the connect deadline until
/// connected, the hand-off, and after it the consent deadline), and queues it for reaping
/// once it is dead.
fn schedule(
    id: ListenerId,
    l: &mut Listener,
    timers: &mut BTreeSet<(Instant, ListenerId)>,
    dead: &mut Vec<ListenerId>,
) {
    let alive = l.rtc.as_ref().is_none_or(|rtc| rtc.is_alive());
    if (l.dead.is_some() || !alive) && !l.reaping {
        l.reaping = true;
        dead.push(id);
    }
    let want = if l.rtc.is_none() {
        l.last_consent + CONSENT_TIMEOUT
    } else if let Some(handoff) = handoff_due(l) {
        l.next_timeout.min(handoff)
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

/// What the core has for its shell: datagrams, events, counters.
#[derive(Default)]
struct Sink {
    transmits: VecDeque<Transmit>,
    events: VecDeque<FanoutEvent>,
    stats: FanoutStats,
}

impl Sink {
    fn send(&mut self, source: SocketAddr, destination: SocketAddr, packet: Vec<u8>) {
        self.push(Transmit {
            proto: Protocol::Udp,
            source,
            destination,
            contents: packet.into(),
        });
    }

    fn push(&mut self, t: Transmit) {
        self.stats.datagrams_out += 1;
        self.stats.bytes_out += t.contents.len() as u64;
        self.transmits.push_back(t);
    }

    fn feedback(&mut self, id: ListenerId, outcome: &FeedbackOutcome) {
        self.stats.nacks_in += u64::from(outcome.nack_packets);
        self.stats.retransmits += u64::from(outcome.retransmits);
        self.stats.retransmits_missed += u64::from(outcome.missed);
        if let Some((loss, jitter, rtt)) = outcome.report {
            self.events.push_back(FanoutEvent::Report {
                id,
                loss,
                jitter,
                rtt,
            });
        }
    }
}

/// Per broadcast: the listeners' RTP timeline and the frames kept for retransmission.
#[derive(Default)]
struct Broadcast {
    timeline: Timeline,
    history: History,
}

/// Pulls everything a listener's `Rtc` has to say, as str0m requires after each input.
fn drain(id: ListenerId, l: &mut Listener, out: &mut Sink, crypto: &CryptoProvider) {
    loop {
        let Some(rtc) = l.rtc.as_mut() else { return };
        match rtc.poll_output() {
            Ok(Output::Timeout(t)) => {
                l.next_timeout = t;
                return;
            }
            Ok(Output::Transmit(t)) => {
                if is_dtls(&t.contents) {
                    // DTLS goes to the address ICE selected; so will the media.
                    l.dest = Some(t.destination);
                }
                out.push(t);
            }
            Ok(Output::Event(e)) => match e {
                Event::Connected => match start_egress(l, crypto) {
                    Ok(egress) => {
                        let srtp_profile = egress.srtp_profile();
                        l.egress = Some(Box::new(egress));
                        l.connected = true;
                        out.events
                            .push_back(FanoutEvent::Connected { id, srtp_profile });
                    }
                    Err(e) => {
                        warn!(listener = id.0, "no media path: {e}");
                        l.dead.get_or_insert(LeaveReason::Failed);
                    }
                },
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

/// The media path of a listener whose ICE and DTLS just came up.
fn start_egress(l: &mut Listener, crypto: &CryptoProvider) -> Result<Egress, Error> {
    let keying = dtls_keys::take(&l.keys)
        .ok_or_else(|| Error::WebRtc("DTLS finished without SRTP keying material".into()))?;
    let srtp = SrtpSession::new(crypto, keying.profile, &keying.material, keying.client)?;
    if l.dest.is_none() {
        l.dest = l.addrs.first().copied();
    }
    if l.dest.is_none() {
        return Err(Error::WebRtc("connected without a peer address".into()));
    }
    let rtc = l
        .rtc
        .as_mut()
        .ok_or_else(|| Error::WebRtc("no WebRTC state".into()))?;
    let mid = Mid::from(l.track.mid.as_str());
    // The SSRC str0m announced for this m-line, so the answer and the packets agree.
    let ssrc = rtc
        .direct_api()
        .stream_tx_by_mid(mid, None)
        .map(|s| *s.ssrc())
        .unwrap_or_else(rand::random);
    let cname = rtc
        .media(mid)
        .map(|m| m.cname().to_string())
        .unwrap_or_else(|| "tern".into());
    Ok(Egress::new(srtp, ssrc, cname, &l.track, rand::random()))
}

/// Remembers when a listener connected (drain saw str0m's event; `now` is the caller's).
fn note_connected(l: &mut Listener, now: Instant) {
    if l.connected && l.connected_at.is_none() {
        l.connected_at = Some(now);
    }
}

/// When a connected listener's str0m state may go, if it still has one.
fn handoff_due(l: &Listener) -> Option<Instant> {
    let connected = l
        .connected_at
        .filter(|_| l.rtc.is_some() && l.egress.is_some())?;
    let quiet = l.last_dtls_in.map_or(connected, |t| t + DTLS_QUIET);
    Some((connected + HANDOFF_AFTER).max(quiet))
}

/// Frees a connected listener's str0m state: from now on the core answers its consent
/// checks ([`stun`]) and its media never needed str0m. What str0m still had to send (the
/// tail of a DTLS flight) goes out first.
fn hand_off(
    id: ListenerId,
    l: &mut Listener,
    out: &mut Sink,
    crypto: &CryptoProvider,
    now: Instant,
) {
    drain(id, l, out, crypto);
    if l.dead.is_some() {
        return;
    }
    l.rtc = None;
    l.last_consent = now;
    out.stats.handoffs += 1;
    debug!(listener = id.0, "handed off from str0m");
}

/// RTCP (RFC 5761 demultiplexing: RTP version 2, payload type byte 192..=223).
fn is_rtcp(data: &[u8]) -> bool {
    data.len() >= 8 && data[0] >> 6 == 2 && (192..=223).contains(&data[1])
}

/// DTLS (RFC 7983: first byte 20..=63).
fn is_dtls(data: &[u8]) -> bool {
    data.first().is_some_and(|b| (20..=63).contains(b))
}

/// What the answer says about the first sending audio m-line with Opus: its MID, payload
/// type and header extension ids.
fn answer_track(answer: &str) -> Option<Track> {
    let mut found: Option<Track> = None;
    let mut in_audio = false;
    let mut current = Track::default();
    let mut has_pt = false;
    for line in answer.lines().chain(std::iter::once("m=end 0")) {
        if line.starts_with("m=") {
            if in_audio && has_pt && !current.mid.is_empty() {
                found = Some(current.clone());
                break;
            }
            // A port of 0 means the m-line was rejected.
            in_audio = line.starts_with("m=audio ") && !line.starts_with("m=audio 0 ");
            current = Track::default();
            has_pt = false;
        } else if let Some(m) = line.strip_prefix("a=mid:") {
            current.mid = m.trim().to_string();
        } else if let Some((p, enc)) = line
            .strip_prefix("a=rtpmap:")
            .and_then(|r| r.split_once(' '))
        {
            if !has_pt && enc.to_ascii_lowercase().starts_with("opus/48000") {
                if let Ok(p) = p.parse::<u8>() {
                    current.pt = p;
                    has_pt = true;
                }
            }
        } else if let Some((id, uri)) = line
            .strip_prefix("a=extmap:")
            .and_then(|r| r.split_once(' '))
        {
            // "ID[/direction] URI": one-byte header ids are 1..=14.
            let id = id.split('/').next().and_then(|i| i.parse::<u8>().ok());
            let uri = uri.split_whitespace().next().unwrap_or("");
            if let Some(id) = id.filter(|i| (1..=14).contains(i)) {
                if uri == "urn:ietf:params:rtp-hdrext:sdes:mid" {
                    current.mid_ext = Some(id);
                } else if uri == "http://www.webrtc.org/experiments/rtp-hdrext/abs-capture-time" {
                    current.abs_capture_ext = Some(id);
                }
            }
        } else if line.starts_with("a=inactive") || line.starts_with("a=recvonly") {
            in_audio = false;
        }
    }
    found
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
        /// Every datagram the core sent this client, and when.
        raw: Vec<(Instant, Vec<u8>)>,
        /// The client's own SRTP keys, from its DTLS handshake.
        keys: KeySlot,
        /// Its RTCP never reaches the core (a peer that does not report).
        mute_rtcp: bool,
    }

    impl Client {
        fn new(addr: SocketAddr, now: Instant) -> (Self, String, str0m::change::SdpPendingOffer) {
            let config = Rtc::builder()
                .set_crypto_provider(Arc::new(dtls_keys::provider()))
                .set_extension(9, Extension::AbsoluteCaptureTime);
            let (mut rtc, keys) = dtls_keys::build_rtc(config, now);
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
                    raw: vec![],
                    keys,
                    mute_rtcp: false,
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
            let muted: Vec<SocketAddr> = clients
                .iter()
                .filter(|c| c.mute_rtcp)
                .map(|c| c.addr)
                .collect();
            for t in to_server.drain(..) {
                if is_rtcp(&t.contents) && muted.contains(&t.source) {
                    continue;
                }
                f.handle_receive(t.source, &t.contents, *now);
            }
            if f.poll_timeout().is_some_and(|t| t <= *now) {
                f.handle_timeout(*now);
            }
            while let Some(t) = f.poll_transmit() {
                if let Some(c) = clients.iter_mut().find(|c| c.addr == t.destination) {
                    c.raw.push((*now, t.contents.to_vec()));
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
        let mut profiles = Vec::new();
        while let Some(e) = f.poll_event() {
            if let FanoutEvent::Connected { srtp_profile, .. } = e {
                profiles.push(srtp_profile);
            }
        }
        // str0m prefers AES-256-GCM, as Chromium does.
        assert_eq!(profiles, ["SRTP_AEAD_AES_256_GCM"; 2]);
        let seq = feed(&mut f, &mut clients, &mut now, Duration::from_secs(1), 0);
        for c in &clients {
            assert_eq!(c.received.len() as u64, seq, "every frame arrives");
            for (i, (ts, data)) in c.received.iter().enumerate() {
                assert_eq!(data, &frame(i as u64).payload[..], "payload passed through");
                // abs-capture-time, under the id the client offered (NTP fractions of a
                // second round to within a microsecond).
                let want =
                    std::time::UNIX_EPOCH + Duration::from_micros(frame(i as u64).capture_time_us);
                let got = c.capture_times[i].expect("abs-capture-time");
                let diff = got.duration_since(want).unwrap_or_else(|e| e.duration());
                assert!(diff < Duration::from_micros(1), "{got:?} vs {want:?}");
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

    /// The client's SRTP session, from the keys its DTLS handshake exported.
    fn client_srtp(c: &Client) -> SrtpSession {
        let k = dtls_keys::take(&c.keys).expect("the client's handshake exported keys");
        let mut s =
            SrtpSession::new(&dtls_keys::provider(), k.profile, &k.material, k.client).unwrap();
        // The client's str0m has sent receiver reports with the first SRTCP indices; the
        // core would refuse them again as replays.
        for _ in 0..32 {
            s.protect_rtcp(&[0x80, 201, 0, 1, 0, 0, 0, 1], &mut Vec::new());
        }
        s
    }

    /// The RTP packets the core sent a client, decrypted (header and payload).
    fn rtp_packets(c: &Client, srtp: &mut SrtpSession) -> Vec<Vec<u8>> {
        c.raw
            .iter()
            .filter(|(_, d)| !is_rtcp(d) && d.first().is_some_and(|b| b >> 6 == 2))
            .map(|(_, d)| srtp.unprotect_rtp(d, 0).expect("RTP decrypts"))
            .collect()
    }

    fn seq(rtp: &[u8]) -> u16 {
        u16::from_be_bytes([rtp[2], rtp[3]])
    }

    fn ssrc(rtp: &[u8]) -> u32 {
        u32::from_be_bytes([rtp[8], rtp[9], rtp[10], rtp[11]])
    }

    /// A connected client that has been fed `secs` of frames.
    fn fed(secs: u64) -> (Fanout, Vec<Client>, Vec<ListenerId>, Instant) {
        let mut now = Instant::now();
        let mut f = fanout();
        let (mut clients, ids) = connect(&mut f, 1, now);
        idle(&mut f, &mut clients, &mut now, Duration::from_secs(2));
        feed(&mut f, &mut clients, &mut now, Duration::from_secs(secs), 0);
        (f, clients, ids, now)
    }

    #[test]
    fn packets_have_the_negotiated_header_and_consecutive_numbers() {
        let (_f, clients, _, _) = fed(1);
        let mut srtp = client_srtp(&clients[0]);
        let rtp = rtp_packets(&clients[0], &mut srtp);
        assert_eq!(rtp.len(), 50);
        for (i, p) in rtp.iter().enumerate() {
            assert_eq!(p[0], 0x90, "version 2 with header extensions");
            assert_eq!(p[1] & 0x80 != 0, i == 0, "marker on the first packet only");
            assert_eq!(seq(p), seq(&rtp[0]).wrapping_add(i as u16));
            assert_eq!(ssrc(p), ssrc(&rtp[0]));
            assert_eq!(&p[12..14], &[0xbe, 0xde]);
            assert_eq!(&p[p.len() - 4..], &frame(i as u64).payload[..]);
        }
        assert!(
            seq(&rtp[0]) < 0x8000,
            "first index leaves room before the first wrap"
        );
    }

    /// A generic NACK (RFC 4585) from `c` for `pid` and the packets its mask names.
    fn nack(media_ssrc: u32, pid: u16, blp: u16) -> Vec<u8> {
        let mut p = vec![0x81, 205, 0, 3, 0, 0, 0, 1];
        p.extend_from_slice(&media_ssrc.to_be_bytes());
        p.extend_from_slice(&pid.to_be_bytes());
        p.extend_from_slice(&blp.to_be_bytes());
        p
    }

    #[test]
    fn nacked_packets_are_sent_again_byte_for_byte() {
        let (mut f, clients, _, now) = fed(1);
        let c = &clients[0];
        let mut srtp = client_srtp(c);
        let rtp = rtp_packets(c, &mut srtp);
        let sent: Vec<&Vec<u8>> = c
            .raw
            .iter()
            .map(|(_, d)| d)
            .filter(|d| !is_rtcp(d) && d[0] >> 6 == 2)
            .collect();
        let media = ssrc(&rtp[0]);
        // Packets 10 and 12 (mask bit 1), and one long before the first packet.
        let mut plain = nack(media, seq(&rtp[10]), 0b10);
        plain.extend(nack(media, seq(&rtp[0]).wrapping_sub(1000), 0));
        let mut packet = Vec::new();
        srtp.protect_rtcp(&plain, &mut packet);
        assert!(f.handle_receive(c.addr, &packet, now));
        let mut again = Vec::new();
        while let Some(t) = f.poll_transmit() {
            assert_eq!(t.destination, c.addr);
            again.push(t.contents.to_vec());
        }
        assert_eq!(again, vec![sent[10].clone(), sent[12].clone()]);
        let s = f.stats();
        assert_eq!((s.nacks_in, s.retransmits, s.retransmits_missed), (2, 2, 1));

        // A forged or replayed SRTCP packet does nothing.
        assert!(f.handle_receive(c.addr, &packet, now));
        let mut forged = packet.clone();
        forged[10] ^= 1;
        assert!(f.handle_receive(c.addr, &forged, now));
        assert!(f.poll_transmit().is_none());
        assert_eq!(f.stats().rtcp_rejected, 2);
        assert_eq!(f.stats().retransmits, 2);
    }

    #[test]
    fn sender_reports_go_out_and_receiver_reports_come_back_as_events() {
        let (mut f, clients, ids, _) = fed(6);
        let c = &clients[0];
        let mut srtp = client_srtp(c);
        let rtp = rtp_packets(c, &mut srtp);
        let reports: Vec<(Instant, Vec<u8>)> = c
            .raw
            .iter()
            .filter(|(_, d)| is_rtcp(d))
            .map(|(t, d)| (*t, srtp.unprotect_rtcp(d).expect("SRTCP decrypts")))
            .collect();
        // One half a second after the first packet, the next 5 s later.
        assert_eq!(reports.len(), 2, "{} reports", reports.len());
        let (sent_at, sr) = &reports[1];
        assert_eq!(sr[1], 200);
        assert_eq!(
            u32::from_be_bytes(sr[4..8].try_into().unwrap()),
            ssrc(&rtp[0])
        );
        // Packet count and RTP time are those of the packets sent before it.
        let count = u32::from_be_bytes(sr[20..24].try_into().unwrap()) as usize;
        let rtp_time = u32::from_be_bytes(sr[16..20].try_into().unwrap());
        let last = &rtp[count - 1];
        assert_eq!(rtp_time, u32::from_be_bytes(last[4..8].try_into().unwrap()));
        let ntp = u64::from_be_bytes(sr[8..16].try_into().unwrap());

        // The listener reports 25/256 lost, 480 samples of jitter, and held the SR 10 ms.
        let mut rr = vec![0x81, 201, 0, 7, 0, 0, 0, 1];
        rr.extend_from_slice(&ssrc(&rtp[0]).to_be_bytes());
        rr.extend_from_slice(&[25, 0, 0, 3]);
        rr.extend_from_slice(&300u32.to_be_bytes());
        rr.extend_from_slice(&480u32.to_be_bytes());
        rr.extend_from_slice(&crate::rtcp::ntp_middle(ntp).to_be_bytes());
        rr.extend_from_slice(&655u32.to_be_bytes());
        let mut packet = Vec::new();
        srtp.protect_rtcp(&rr, &mut packet);
        // The client's own str0m reported during the run: its SRTCP authenticated here.
        let mut own = 0;
        while let Some(e) = f.poll_event() {
            own += usize::from(matches!(e, FanoutEvent::Report { .. }));
        }
        assert!(own >= 1, "no report from the client's str0m");
        assert_eq!(f.stats().rtcp_rejected, 0);
        assert!(f.handle_receive(c.addr, &packet, *sent_at + Duration::from_millis(50)));
        match f.poll_event() {
            Some(FanoutEvent::Report {
                id,
                loss,
                jitter,
                rtt,
            }) => {
                assert_eq!(id, ids[0]);
                assert!((loss - 25.0 / 256.0).abs() < 1e-6);
                assert_eq!(jitter, Duration::from_millis(10));
                let rtt = rtt.expect("round trip from LSR/DLSR").as_secs_f64();
                assert!((rtt - 0.040).abs() < 0.0005, "rtt {rtt}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rtcp_bye_frees_the_listener() {
        let (mut f, clients, ids, now) = fed(1);
        let mut srtp = client_srtp(&clients[0]);
        let mut packet = Vec::new();
        srtp.protect_rtcp(&[0x81, 203, 0, 1, 0, 0, 0, 1], &mut packet);
        while f.poll_event().is_some() {}
        assert!(f.handle_receive(clients[0].addr, &packet, now));
        assert_eq!(f.listener_count(), 0);
        assert_eq!(
            f.poll_event(),
            Some(FanoutEvent::Left {
                id: ids[0],
                broadcast: demo(),
                reason: LeaveReason::Disconnected
            })
        );
    }

    #[test]
    fn the_answer_names_mid_payload_type_and_extensions() {
        let answer =
            "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:v\r\na=rtpmap:96 VP8/90000\r\n\
            m=audio 9 UDP/TLS/RTP/SAVPF 109 111\r\na=mid:a1\r\n\
            a=extmap:3/sendonly urn:ietf:params:rtp-hdrext:sdes:mid\r\n\
            a=extmap:15 http://www.webrtc.org/experiments/rtp-hdrext/abs-capture-time\r\n\
            a=sendonly\r\na=rtpmap:109 opus/48000/2\r\na=rtpmap:111 opus/48000/2\r\n";
        assert_eq!(
            answer_track(answer),
            Some(Track {
                mid: "a1".into(),
                pt: 109,
                mid_ext: Some(3),
                // 15 cannot be a one-byte extension id.
                abs_capture_ext: None,
            })
        );
        assert_eq!(
            answer_track(&answer.replace("a=sendonly", "a=inactive")),
            None
        );
    }

    #[test]
    fn after_the_hand_off_the_core_alone_keeps_consent_and_media() {
        let mut now = Instant::now();
        let mut f = fanout();
        let (mut clients, ids) = connect(&mut f, 1, now);
        idle(&mut f, &mut clients, &mut now, Duration::from_secs(2));
        assert!(
            f.listeners[&ids[0]].rtc.is_some(),
            "str0m until the hand-off"
        );
        // A minute: the client's receiver reports prove its handshake, str0m is freed, and
        // from then on only the core's consent answers keep the client's ICE alive.
        let n = feed(&mut f, &mut clients, &mut now, Duration::from_secs(60), 0);
        assert!(f.listeners[&ids[0]].rtc.is_none(), "str0m state freed");
        assert!(
            clients[0].rtc.is_alive(),
            "the client's ICE still has a working pair"
        );
        assert_eq!(clients[0].received.len() as u64, n, "no frame missed");
        assert_eq!(f.listener_count(), 1);

        // The client goes silent: no more binding requests, so consent runs out.
        let mut left = Vec::new();
        run(
            &mut f,
            &mut clients[..0],
            &mut now,
            CONSENT_TIMEOUT + Duration::from_secs(1),
            |f, _, _| {
                while let Some(e) = f.poll_event() {
                    left.push(e);
                }
            },
        );
        assert!(left.contains(&FanoutEvent::Left {
            id: ids[0],
            broadcast: demo(),
            reason: LeaveReason::Disconnected
        }));
        assert_eq!(f.listener_count(), 0);
    }

    #[test]
    fn a_listener_closing_after_the_hand_off_is_freed() {
        let (mut f, mut clients, ids, mut now) = fed(12);
        assert!(f.listeners[&ids[0]].rtc.is_none());
        while f.poll_event().is_some() {}
        // A DTLS record (close_notify or not) cannot be authenticated any more: ignored.
        let addr = clients[0].addr;
        f.handle_receive(
            addr,
            &[21, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 5, 0, 2, 1, 0, 0],
            now,
        );
        assert_eq!(f.listener_count(), 1);
        // Closing sends RTCP BYE (and close_notify): the core frees the listener.
        clients[0].rtc.close().unwrap();
        idle(&mut f, &mut clients, &mut now, Duration::from_millis(100));
        assert_eq!(f.listener_count(), 0);
        assert_eq!(
            f.poll_event(),
            Some(FanoutEvent::Left {
                id: ids[0],
                broadcast: demo(),
                reason: LeaveReason::Disconnected
            })
        );
    }

    #[test]
    fn a_nack_flood_is_answered_once_per_packet_and_at_most_a_history() {
        let (mut f, clients, _, now) = fed(2);
        let c = &clients[0];
        let mut srtp = client_srtp(c);
        let rtp = rtp_packets(c, &mut srtp);
        let media = ssrc(&rtp[0]);
        let last = seq(rtp.last().unwrap());
        // 300 items, each naming 17 packets, all among the last 100 sent.
        let mut plain = vec![0x81, 205, 0, 0, 0, 0, 0, 1];
        plain.extend_from_slice(&media.to_be_bytes());
        for i in 0..300u16 {
            plain.extend_from_slice(&last.wrapping_sub(99 - i % 80).to_be_bytes());
            plain.extend_from_slice(&0xffffu16.to_be_bytes());
        }
        let words = (plain.len() / 4 - 1) as u16;
        plain[2..4].copy_from_slice(&words.to_be_bytes());
        let mut packet = Vec::new();
        srtp.protect_rtcp(&plain, &mut packet);
        f.handle_receive(c.addr, &packet, now);
        let mut sent = 0;
        while f.poll_transmit().is_some() {
            sent += 1;
        }
        assert!(sent > 0 && sent <= HISTORY, "{sent} retransmissions");
        assert_eq!(f.stats().retransmits, sent as u64);
    }

    #[test]
    fn deleting_a_handed_off_listener_sends_it_an_rtcp_bye() {
        let (mut f, clients, ids, _) = fed(12);
        assert!(f.listeners[&ids[0]].rtc.is_none());
        let mut srtp = client_srtp(&clients[0]);
        assert!(f.remove_listener(ids[0]));
        let t = f.poll_transmit().expect("a goodbye");
        assert_eq!(t.destination, clients[0].addr);
        let plain = srtp
            .unprotect_rtcp(&t.contents)
            .expect("SRTCP from the relay");
        assert_eq!(plain[1], 203);
        assert_eq!(f.listener_count(), 0);
    }

    #[test]
    fn a_listener_that_never_reports_is_handed_off_after_a_quiet_while() {
        let mut now = Instant::now();
        let mut f = fanout();
        let (mut clients, ids) = connect(&mut f, 1, now);
        clients[0].mute_rtcp = true;
        idle(&mut f, &mut clients, &mut now, Duration::from_secs(2));
        let connected = now;
        feed(
            &mut f,
            &mut clients,
            &mut now,
            HANDOFF_AFTER - Duration::from_secs(3),
            0,
        );
        assert!(
            f.listeners[&ids[0]].rtc.is_some(),
            "no proof yet: str0m stays"
        );
        let n = feed(&mut f, &mut clients, &mut now, Duration::from_secs(40), 0);
        assert!(
            f.listeners[&ids[0]].rtc.is_none(),
            "handed off by the timer"
        );
        assert_eq!(f.stats().handoffs, 1);
        assert!(now > connected + HANDOFF_AFTER);
        // Consent answers alone keep it, and media flows.
        assert_eq!(f.listener_count(), 1);
        assert!(clients[0].rtc.is_alive());
        assert!(f.stats().consent_answers > 0);
        let got = clients[0].received.len() as u64;
        assert!(got >= n, "{got} frames for {n} in the last 40 s");
    }
}
