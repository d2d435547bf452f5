//! One WebRTC listener: a str0m `Rtc` on its own non-blocking UDP socket, driven by the
//! generator's single poll loop.
//!
//! Towards Tern the listener makes the offer (WHEP); towards Janus it answers Janus's offer.
//! Either way it completes ICE and DTLS-SRTP for real. Once connected, only sampled listeners
//! decrypt RTP (to check continuity and latency); the others count RTP datagrams without
//! handing them to str0m, so the generator costs less than the server it measures. STUN,
//! DTLS and RTCP always go to str0m, which keeps ICE consent alive.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::media::{Direction, MediaKind};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};

use crate::source::Source;

/// What all listeners saw, added up.
#[derive(Default)]
pub(crate) struct Counters {
    /// RTP datagrams received (all listeners).
    pub(crate) datagrams: u64,
    /// Opus frames decrypted by sampled listeners.
    pub(crate) sampled_frames: u64,
    /// RTP time steps other than one frame, on sampled listeners.
    pub(crate) sampled_gaps: u64,
    /// Source send → sampled listener receive, microseconds, while `record_latency`.
    pub(crate) latency_us: Vec<u32>,
    pub(crate) record_latency: bool,
}

pub(crate) struct Client {
    rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    pub(crate) sampled: bool,
    pub(crate) connected: bool,
    last_rtp_time: Option<u64>,
    next_timeout: Instant,
}

impl Client {
    /// A listener with a fresh socket on `ip` and its host candidate there.
    pub(crate) fn new(ip: IpAddr, sampled: bool) -> Result<Self> {
        let socket = UdpSocket::bind((ip, 0))?;
        socket.set_nonblocking(true)?;
        let local = socket.local_addr()?;
        let mut rtc = Rtc::builder()
            .set_crypto_provider(Arc::new(str0m::crypto::from_feature_flags()))
            .build(Instant::now());
        rtc.add_local_candidate(Candidate::host(local, "udp")?);
        Ok(Self {
            rtc,
            socket,
            local,
            sampled,
            connected: false,
            last_rtp_time: None,
            next_timeout: Instant::now(),
        })
    }

    /// A receive-only audio offer (WHEP).
    pub(crate) fn offer(&mut self) -> Result<(String, SdpPendingOffer)> {
        let mut api = self.rtc.sdp_api();
        api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
        let (offer, pending) = api.apply().context("no offer to make")?;
        Ok((offer.to_sdp_string(), pending))
    }

    pub(crate) fn accept_answer(&mut self, pending: SdpPendingOffer, answer: &str) -> Result<()> {
        let answer = SdpAnswer::from_sdp_string(answer).context("parsing the SDP answer")?;
        self.rtc.sdp_api().accept_answer(pending, answer)?;
        Ok(())
    }

    /// Answers a server's offer (Janus's streaming plugin offers a send-only audio m-line).
    pub(crate) fn answer(&mut self, offer: &str) -> Result<String> {
        let offer = SdpOffer::from_sdp_string(offer).context("parsing the SDP offer")?;
        let answer = self.rtc.sdp_api().accept_offer(offer)?;
        Ok(answer.to_sdp_string())
    }

    fn drain(&mut self, c: &mut Counters, source: &Source) {
        loop {
            match self.rtc.poll_output() {
                Ok(Output::Timeout(t)) => {
                    self.next_timeout = t;
                    return;
                }
                Ok(Output::Transmit(t)) => {
                    let _ = self.socket.send_to(&t.contents, t.destination);
                }
                Ok(Output::Event(Event::Connected)) => self.connected = true,
                Ok(Output::Event(Event::MediaData(d))) if self.sampled => {
                    c.sampled_frames += 1;
                    let t = d.time.numer();
                    if self.last_rtp_time.is_some_and(|l| t != l + 960) {
                        c.sampled_gaps += 1;
                    }
                    self.last_rtp_time = Some(t);
                    if c.record_latency {
                        if let Some(age) = source.age_of(&d.data, d.network_time) {
                            c.latency_us
                                .push(age.as_micros().min(u128::from(u32::MAX)) as u32);
                        }
                    }
                }
                Ok(Output::Event(_)) => {}
                Err(_) => return,
            }
        }
    }

    /// Reads everything waiting on the socket, then serves str0m's timer if due.
    pub(crate) fn pump(&mut self, buf: &mut [u8], c: &mut Counters, source: &Source, now: Instant) {
        while let Ok((n, from)) = self.socket.recv_from(buf) {
            let is_rtp = (128..192).contains(&buf[0]) && n > 12 && !(200..=206).contains(&buf[1]);
            if is_rtp {
                c.datagrams += 1;
                if self.connected && !self.sampled {
                    continue;
                }
            }
            let Ok(contents) = buf[..n].try_into() else {
                continue;
            };
            // Sampled listeners time each arrival; the rest share the pass's clock reading.
            let at = if self.sampled { Instant::now() } else { now };
            let input = Input::Receive(
                at,
                Receive {
                    proto: Protocol::Udp,
                    source: from,
                    destination: self.local,
                    contents,
                },
            );
            if self.rtc.handle_input(input).is_ok() {
                self.drain(c, source);
            }
        }
        if now >= self.next_timeout && self.rtc.handle_input(Input::Timeout(now)).is_ok() {
            self.drain(c, source);
        }
    }
}

/// Pumps every listener until `until`, sleeping `pause` between passes.
pub(crate) fn pump_all(
    clients: &mut [Client],
    buf: &mut [u8],
    c: &mut Counters,
    source: &Source,
    until: Instant,
    pause: Duration,
) {
    loop {
        let now = Instant::now();
        for cl in clients.iter_mut() {
            cl.pump(buf, c, source, now);
        }
        if now >= until {
            return;
        }
        std::thread::sleep(pause);
    }
}
