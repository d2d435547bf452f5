//! A listener's media, written by the fan-out core itself once DTLS-SRTP is up.
//!
//! A relay sends the same Opus frame to thousands of listeners. Through str0m each copy
//! would take the full per-peer send machinery (sample queue, packetizer, pacer, send
//! buffer, RTP header writer, a timeout pass to release it): that was most of the relay's
//! CPU. Here a listener's packet is its RTP header from a template (only sequence number,
//! timestamp and capture time change), one SRTP seal, and the bytes are ready for the socket.
//!
//! What str0m's send path did besides is done here too: RTCP sender reports, NACKs answered
//! from the broadcast's recent frames ([`History`], shared by all its listeners: a packet is
//! rebuilt from the frame, not kept per listener), and receiver reports read back for loss,
//! jitter and round-trip time. str0m keeps ICE, DTLS and consent freshness.
//!
//! Sequence numbers follow the broadcast's frame numbers: a listener's SRTP packet index is
//! its first index plus the frames since its first, so a NACKed sequence number names a
//! frame without any per-listener record of what was sent.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::rtcp::{self, Feedback, SenderInfo};
use crate::srtp::SrtpSession;

/// Frames of a broadcast kept for retransmission: 1.28 s of 20 ms frames, longer than any
/// round trip a NACK is still useful within.
pub const HISTORY: usize = 64;

/// How often each listener gets an RTCP sender report (RFC 3550's minimum for a
/// low-bandwidth session; browsers report back at a similar pace).
pub const REPORT_INTERVAL: Duration = Duration::from_secs(5);

/// What the answer negotiated for a listener's audio: where and how to write it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Track {
    /// The m-line's MID value.
    pub mid: String,
    /// Opus payload type.
    pub pt: u8,
    /// Header extension id for the MID, if negotiated.
    pub mid_ext: Option<u8>,
    /// Header extension id for abs-capture-time, if negotiated.
    pub abs_capture_ext: Option<u8>,
}

/// One frame as every listener of the broadcast sends it.
#[derive(Debug, Clone)]
pub struct OutFrame {
    /// The broadcast's frame number (consecutive).
    pub number: u64,
    /// RTP timestamp (48 kHz) on the listeners' continuous timeline.
    pub rtp_time: u32,
    /// Capture time at the origin, µs since the Unix epoch.
    pub capture_us: u64,
    /// The Opus payload.
    pub payload: Bytes,
}

/// The last [`HISTORY`] frames of one broadcast.
#[derive(Debug, Default)]
pub struct History {
    frames: VecDeque<OutFrame>,
    next: u64,
}

impl History {
    /// Numbers and keeps a frame; returns it as listeners send it.
    pub fn push(&mut self, rtp_time: u32, capture_us: u64, payload: Bytes) -> &OutFrame {
        if self.frames.len() == HISTORY {
            self.frames.pop_front();
        }
        self.frames.push_back(OutFrame {
            number: self.next,
            rtp_time,
            capture_us,
            payload,
        });
        self.next += 1;
        self.frames.back().expect("just pushed")
    }

    /// The frame numbered `number`, if still kept.
    pub fn get(&self, number: u64) -> Option<&OutFrame> {
        let first = self.frames.front()?.number;
        let i = usize::try_from(number.checked_sub(first)?).ok()?;
        self.frames.get(i)
    }
}

/// What one listener's feedback packet led to.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FeedbackOutcome {
    /// A receiver report about our stream: (loss 0..=1, jitter, round trip if known).
    pub report: Option<(f32, Duration, Option<Duration>)>,
    /// NACK packets received.
    pub nack_packets: u32,
    /// Packets sent again.
    pub retransmits: u32,
    /// Packets asked for that are no longer (or never were) available.
    pub missed: u32,
    /// The listener sent RTCP BYE.
    pub bye: bool,
}

/// One listener's egress: its SRTP keys, header template and RTCP state.
pub struct Egress {
    srtp: SrtpSession,
    ssrc: u32,
    cname: String,
    header: [u8; 40],
    header_len: usize,
    /// Offset of the abs-capture-time value in the header, if negotiated.
    abs_at: Option<usize>,
    /// SRTP index of the first packet, and the frame number it carried (set on first send).
    first: Option<(u64, u64)>,
    first_index: u64,
    /// The last frame sent: its number, RTP time and capture time.
    last: Option<(u64, u32, u64)>,
    packets: u32,
    octets: u32,
    next_report: Option<Instant>,
    /// Our recent sender reports (NTP middle 32 bits, when sent) for round-trip times.
    reports: VecDeque<(u32, Instant)>,
}

impl Egress {
    /// Egress for a connected listener. `first_index` is the SRTP index of its first
    /// packet: below 2^15, so the sequence number does not wrap before the receiver has
    /// seen it (its rollover counter starts at zero).
    pub fn new(
        srtp: SrtpSession,
        ssrc: u32,
        cname: String,
        track: &Track,
        first_index: u16,
    ) -> Self {
        let mut header = [0u8; 40];
        header[1] = track.pt & 0x7f;
        header[8..12].copy_from_slice(&ssrc.to_be_bytes());
        let mut len = 12;
        let mut abs_at = None;
        let mid = &track.mid.as_bytes()[..track.mid.len().clamp(1, 16)];
        if track.mid_ext.is_some() || track.abs_capture_ext.is_some() {
            // RFC 8285 one-byte header extensions: 0xBEDE, length in words, elements.
            header[0] = 0x90;
            header[12..14].copy_from_slice(&[0xbe, 0xde]);
            let mut at = 16;
            if let Some(id) = track.mid_ext {
                header[at] = (id << 4) | (mid.len() as u8 - 1);
                header[at + 1..at + 1 + mid.len()].copy_from_slice(mid);
                at += 1 + mid.len();
            }
            if let Some(id) = track.abs_capture_ext {
                header[at] = (id << 4) | 7;
                abs_at = Some(at + 1);
                at += 9;
            }
            let words = (at - 16).div_ceil(4);
            header[14..16].copy_from_slice(&(words as u16).to_be_bytes());
            len = 16 + words * 4;
        } else {
            header[0] = 0x80;
        }
        Self {
            srtp,
            ssrc,
            cname,
            header,
            header_len: len,
            abs_at,
            first: None,
            first_index: u64::from(first_index & 0x7fff),
            last: None,
            packets: 0,
            octets: 0,
            next_report: None,
            reports: VecDeque::new(),
        }
    }

    /// The SSRC of this listener's stream.
    pub fn ssrc(&self) -> u32 {
        self.ssrc
    }

    /// Appends the SRTP packet carrying `frame` to `out`.
    pub fn write(&mut self, frame: &OutFrame, now: Instant, out: &mut Vec<u8>) {
        let (first_index, first_frame) =
            *self.first.get_or_insert((self.first_index, frame.number));
        let Some(index) = frame
            .number
            .checked_sub(first_frame)
            .map(|d| first_index + d)
        else {
            return;
        };
        self.seal(index, frame, index == first_index, out);
        self.packets = self.packets.wrapping_add(1);
        self.octets = self.octets.wrapping_add(frame.payload.len() as u32);
        self.last = Some((frame.number, frame.rtp_time, frame.capture_us));
        // The first report soon after the first packet, so the listener can map RTP time
        // to wall-clock time early.
        self.next_report
            .get_or_insert(now + Duration::from_millis(500));
    }

    fn seal(&mut self, index: u64, frame: &OutFrame, marker: bool, out: &mut Vec<u8>) {
        let mut header = self.header;
        if marker {
            header[1] |= 0x80;
        }
        header[2..4].copy_from_slice(&(index as u16).to_be_bytes());
        header[4..8].copy_from_slice(&frame.rtp_time.to_be_bytes());
        if let Some(at) = self.abs_at {
            header[at..at + 8]
                .copy_from_slice(&rtcp::ntp_from_unix_micros(frame.capture_us).to_be_bytes());
        }
        self.srtp
            .protect_rtp(&header[..self.header_len], &frame.payload, index, out);
    }

    /// The SRTP protection profile the listener's handshake chose, by its registered name.
    pub fn srtp_profile(&self) -> &'static str {
        self.srtp.profile_name()
    }

    /// Appends a sender report if one is due. Returns whether it did.
    pub fn maybe_report(&mut self, now: Instant, out: &mut Vec<u8>) -> bool {
        let (Some(due), Some((_, rtp_time, capture_us))) = (self.next_report, self.last) else {
            return false;
        };
        if now < due {
            return false;
        }
        let ntp = rtcp::ntp_from_unix_micros(capture_us);
        let mut plain = Vec::with_capacity(64);
        rtcp::write_sender_report(
            &SenderInfo {
                ssrc: self.ssrc,
                ntp,
                rtp_time,
                packets: self.packets,
                octets: self.octets,
            },
            &self.cname,
            &mut plain,
        );
        self.srtp.protect_rtcp(&plain, out);
        if self.reports.len() == 4 {
            self.reports.pop_front();
        }
        self.reports.push_back((rtcp::ntp_middle(ntp), now));
        self.next_report = Some(now + REPORT_INTERVAL);
        true
    }

    /// Reads an SRTCP packet from the listener. `None` if it does not authenticate (then
    /// nothing changed). Retransmissions it asks for are appended to `resend`, one
    /// datagram each.
    pub fn feedback(
        &mut self,
        packet: &[u8],
        history: Option<&History>,
        now: Instant,
        resend: &mut Vec<Vec<u8>>,
    ) -> Option<FeedbackOutcome> {
        let plain = self.srtp.unprotect_rtcp(packet)?;
        let Feedback {
            reports,
            nacks,
            nack_packets,
            bye,
        } = rtcp::read_feedback(&plain, self.ssrc);
        let mut outcome = FeedbackOutcome {
            nack_packets,
            bye,
            ..Default::default()
        };
        if let Some(r) = reports.last() {
            let rtt = self
                .reports
                .iter()
                .find(|(lsr, _)| r.last_sr != 0 && *lsr == r.last_sr)
                .map(|(_, sent)| {
                    let held = Duration::from_secs_f64(f64::from(r.delay_since_last_sr) / 65_536.0);
                    now.saturating_duration_since(*sent).saturating_sub(held)
                });
            outcome.report = Some((
                f32::from(r.fraction_lost) / 256.0,
                Duration::from_secs_f64(f64::from(r.jitter) / 48_000.0),
                rtt,
            ));
        }
        // One packet may name thousands of sequence numbers (17 per item); an authenticated
        // listener gets each packet it asks for once, and at most a history's worth.
        let mut asked: Vec<u16> = Vec::with_capacity(nacks.len().min(HISTORY));
        for seq in nacks {
            if asked.contains(&seq) {
                continue;
            }
            if asked.len() == HISTORY {
                outcome.missed += 1;
                continue;
            }
            asked.push(seq);
            match self
                .frame_of(seq)
                .and_then(|(index, n)| Some((index, history?.get(n)?)))
            {
                Some((index, frame)) => {
                    let mut out = Vec::with_capacity(self.header_len + frame.payload.len() + 16);
                    let first_index = self.first.map(|(i, _)| i);
                    self.seal(index, frame, Some(index) == first_index, &mut out);
                    resend.push(out);
                    outcome.retransmits += 1;
                }
                None => outcome.missed += 1,
            }
        }
        Some(outcome)
    }

    /// Appends an SRTCP BYE for this stream: the relay ends the session.
    pub fn bye(&mut self, out: &mut Vec<u8>) {
        let mut plain = Vec::with_capacity(8);
        plain.extend_from_slice(&[0x81, 203, 0, 1]);
        plain.extend_from_slice(&self.ssrc.to_be_bytes());
        self.srtp.protect_rtcp(&plain, out);
    }

    /// The SRTP index and frame number a NACKed sequence number stands for, if it is one
    /// this listener was sent.
    fn frame_of(&self, seq: u16) -> Option<(u64, u64)> {
        let (first_index, first_frame) = self.first?;
        let (last_frame, _, _) = self.last?;
        let last_index = first_index + (last_frame - first_frame);
        let back = u64::from((last_index as u16).wrapping_sub(seq));
        let index = last_index.checked_sub(back)?;
        if index < first_index {
            return None;
        }
        Some((index, first_frame + (index - first_index)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_the_latest_frames_by_number() {
        let mut h = History::default();
        for i in 0..100u64 {
            let f = h.push(i as u32 * 960, i, Bytes::from(vec![i as u8]));
            assert_eq!(f.number, i);
        }
        assert!(h.get(100 - HISTORY as u64 - 1).is_none());
        assert_eq!(h.get(100 - HISTORY as u64).unwrap().payload[0], 36);
        assert_eq!(h.get(99).unwrap().rtp_time, 99 * 960);
        assert!(h.get(100).is_none());
    }
}
