//! RTP/Opus ingest as an SFU's plain-RTP output sends it: a pure depacketizer, no I/O.
//!
//! Feed every datagram with [`RtpIngest::handle_packet`] and the arrival time; pull frames in
//! order with [`RtpIngest::poll_frame`]. What real RTP does, and what this does about it:
//!
//! - **Reordering**: packets wait in a small buffer (up to [`REORDER_WINDOW_US`] of arrival
//!   time) so a late packet can take its place; a missing packet is given up on when the
//!   window passes, and the frames behind it flow on (the timestamp gap tells downstream).
//! - **Duplicates** and packets older than what was already emitted are dropped.
//! - **Timestamp and sequence wrap**: both are unwrapped to 64 bits.
//! - **SSRC change** (the sender restarted): the new stream is placed on the broadcast's
//!   timeline right after the old one, advanced by the wall-clock time that passed, so the
//!   broadcast's media time never goes backwards and never jumps by more than real time.
//! - **DTX / silence suppression**: fewer packets with timestamp gaps; passed through as is.
//!
//! Output timestamps are the broadcast's media time in 48 kHz samples, starting at 0.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::wire::Frame;
use crate::Error;

/// How long a packet may wait for an earlier, missing one (60 ms = 3 Opus frames).
pub const REORDER_WINDOW_US: u64 = 60_000;

/// Packets held for reordering at most; beyond, the oldest is released.
const MAX_HELD: usize = 64;

/// A jump of more than this many sequence numbers is a new stream, not loss.
const MAX_SEQ_JUMP: u64 = 3_000;

/// A parsed RTP packet (RFC 3550 §5.1), payload borrowed.
#[derive(Debug, PartialEq, Eq)]
pub struct RtpPacket<'a> {
    /// Payload type.
    pub pt: u8,
    /// Sequence number.
    pub seq: u16,
    /// RTP timestamp.
    pub ts: u32,
    /// Synchronization source.
    pub ssrc: u32,
    /// The codec payload, padding and extensions removed.
    pub payload: &'a [u8],
}

/// Parses one RTP packet.
pub fn parse_rtp(data: &[u8]) -> Result<RtpPacket<'_>, Error> {
    let bad = |why: &str| Error::Protocol(format!("RTP: {why}"));
    if data.len() < 12 {
        return Err(bad("shorter than the 12-byte header"));
    }
    if data[0] >> 6 != 2 {
        return Err(bad("not version 2"));
    }
    let padding = data[0] & 0x20 != 0;
    let extension = data[0] & 0x10 != 0;
    let csrcs = usize::from(data[0] & 0x0f);
    let pt = data[1] & 0x7f;
    if (72..=79).contains(&pt) {
        return Err(bad("RTCP, not RTP"));
    }
    let seq = u16::from_be_bytes([data[2], data[3]]);
    let ts = u32::from_be_bytes([data[4], data[5], data[6], data[7]]);
    let ssrc = u32::from_be_bytes([data[8], data[9], data[10], data[11]]);
    let mut start = 12 + 4 * csrcs;
    if extension {
        let hdr = data
            .get(start..start + 4)
            .ok_or_else(|| bad("truncated extension"))?;
        let words = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
        start += 4 + 4 * words;
    }
    let mut end = data.len();
    if padding {
        let pad = usize::from(*data.last().ok_or_else(|| bad("empty"))?);
        if pad == 0 || pad > end {
            return Err(bad("bad padding"));
        }
        end -= pad;
    }
    if start >= end {
        return Err(bad("no payload"));
    }
    Ok(RtpPacket {
        pt,
        seq,
        ts,
        ssrc,
        payload: &data[start..end],
    })
}

/// Counters for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IngestStats {
    /// Packets accepted.
    pub packets: u64,
    /// Malformed or wrong-payload-type packets dropped.
    pub malformed: u64,
    /// Duplicates and packets that came after their place was given up.
    pub late_or_duplicate: u64,
    /// Sequence numbers given up on (lost).
    pub lost: u64,
    /// Sender restarts seen (SSRC changes or large jumps).
    pub restarts: u64,
    /// Packets that arrived out of order and were put back in place.
    pub reordered: u64,
}

struct Held {
    ts: u64,
    arrival_us: u64,
    payload: Bytes,
}

/// The depacketizer for one ingest endpoint (one broadcast).
pub struct RtpIngest {
    /// Payload type to accept; `None` accepts the first one seen.
    pt: Option<u8>,
    ssrc: Option<u32>,
    /// Extended sequence number of the last packet seen (for unwrapping).
    last_seq: u64,
    /// Extended timestamp of the last packet seen (for unwrapping).
    last_ts: u64,
    /// Next extended sequence number to emit.
    next_seq: u64,
    /// Broadcast media time = extended RTP timestamp + offset (may be negative before 0).
    offset: i128,
    /// The broadcast's last emitted media time and when it was emitted.
    last_out: Option<(u64, u64)>,
    held: BTreeMap<u64, Held>,
    /// Frames released by a restart, before the new stream's.
    ready: std::collections::VecDeque<Frame>,
    frame_seq: u64,
    stats: IngestStats,
}

impl RtpIngest {
    /// A depacketizer accepting payload type `pt` (or whichever comes first).
    pub fn new(pt: Option<u8>) -> Self {
        Self {
            pt,
            ssrc: None,
            last_seq: 0,
            last_ts: 0,
            next_seq: 0,
            offset: 0,
            last_out: None,
            held: BTreeMap::new(),
            ready: Default::default(),
            frame_seq: 0,
            stats: IngestStats::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> IngestStats {
        self.stats
    }

    /// One datagram that arrived at `now_us` (wall clock, µs since the Unix epoch).
    /// A malformed packet is counted and dropped; it never disturbs the stream.
    pub fn handle_packet(&mut self, data: &[u8], now_us: u64) -> Result<(), Error> {
        let p = match parse_rtp(data) {
            Ok(p) => p,
            Err(e) => {
                self.stats.malformed += 1;
                return Err(e);
            }
        };
        if *self.pt.get_or_insert(p.pt) != p.pt {
            self.stats.malformed += 1;
            return Err(Error::Protocol(format!(
                "RTP: unexpected payload type {}",
                p.pt
            )));
        }
        let new_stream = match self.ssrc {
            None => true,
            Some(s) if s != p.ssrc => true,
            Some(_) => {
                let seq = unwrap16(self.last_seq, p.seq);
                seq.abs_diff(self.last_seq) > MAX_SEQ_JUMP
            }
        };
        if new_stream {
            self.restart(p.ssrc, p.seq, p.ts, now_us);
        }
        let seq = unwrap16(self.last_seq, p.seq);
        let ts = unwrap32(self.last_ts, p.ts);
        if seq > self.last_seq {
            self.last_seq = seq;
            self.last_ts = ts;
        }
        if seq < self.next_seq || self.held.contains_key(&seq) {
            self.stats.late_or_duplicate += 1;
            return Ok(());
        }
        if seq != self.last_seq {
            self.stats.reordered += 1;
        }
        self.stats.packets += 1;
        self.held.insert(
            seq,
            Held {
                ts,
                arrival_us: now_us,
                payload: Bytes::copy_from_slice(p.payload),
            },
        );
        Ok(())
    }

    fn restart(&mut self, ssrc: u32, seq: u16, ts: u32, now_us: u64) {
        if self.ssrc.is_some() {
            self.stats.restarts += 1;
        }
        // Whatever the old stream still held is released first, in order, on its own timeline.
        while let Some((_, held)) = self.held.pop_first() {
            if let Some(f) = self.emit(held, now_us) {
                self.ready.push_back(f);
            }
        }
        self.ssrc = Some(ssrc);
        self.last_seq = u64::from(seq) + (1 << 16);
        self.next_seq = self.last_seq;
        self.last_ts = u64::from(ts) + (1 << 32);
        // Continue the broadcast timeline: right after the last frame, plus the wall-clock
        // time that passed since (so a paused sender resumes at "now", not earlier).
        let start = match self.last_out {
            Some((t, at)) => t + 960 + now_us.saturating_sub(at) * 48 / 1000,
            None => 0,
        };
        self.offset = i128::from(start) - i128::from(self.last_ts);
    }

    /// The next frame in order, if one is ready at `now_us`.
    pub fn poll_frame(&mut self, now_us: u64) -> Option<Frame> {
        if let Some(f) = self.ready.pop_front() {
            return Some(f);
        }
        loop {
            let (&seq, held) = self.held.iter().next()?;
            let in_order = seq == self.next_seq;
            let waited_enough = now_us.saturating_sub(held.arrival_us) >= REORDER_WINDOW_US;
            if !in_order && !waited_enough && self.held.len() < MAX_HELD {
                return None;
            }
            if !in_order {
                self.stats.lost += seq - self.next_seq;
            }
            // `seq` was just read from the map.
            let held = self.held.remove(&seq)?;
            self.next_seq = seq + 1;
            if let Some(f) = self.emit(held, now_us) {
                return Some(f);
            }
        }
    }

    /// Places a packet on the broadcast timeline, or drops it if its time does not advance
    /// (a broken sender), keeping the output strictly increasing.
    fn emit(&mut self, held: Held, now_us: u64) -> Option<Frame> {
        let media = u64::try_from(i128::from(held.ts) + self.offset).ok()?;
        if self.last_out.is_some_and(|(t, _)| media <= t) {
            self.stats.late_or_duplicate += 1;
            return None;
        }
        self.last_out = Some((media, now_us));
        let frame = Frame {
            seq: self.frame_seq,
            timestamp: media,
            capture_time_us: held.arrival_us,
            payload: held.payload,
        };
        self.frame_seq += 1;
        Some(frame)
    }

    /// When [`RtpIngest::poll_frame`] may next produce a frame without new input.
    pub fn poll_timeout(&self) -> Option<u64> {
        if !self.ready.is_empty() {
            return Some(0);
        }
        self.held
            .values()
            .next()
            .map(|h| h.arrival_us + REORDER_WINDOW_US)
    }
}

/// Extends a 16-bit counter to 64 bits, choosing the value nearest `last`.
fn unwrap16(last: u64, v: u16) -> u64 {
    unwrap(last, u64::from(v), 1 << 16)
}

fn unwrap32(last: u64, v: u32) -> u64 {
    unwrap(last, u64::from(v), 1 << 32)
}

fn unwrap(last: u64, v: u64, modulus: u64) -> u64 {
    let base = last - last % modulus;
    let candidates = [base.wrapping_sub(modulus), base, base + modulus];
    candidates
        .into_iter()
        .map(|b| b.wrapping_add(v))
        .filter(|c| *c < u64::MAX / 2)
        .min_by_key(|c| c.abs_diff(last))
        .unwrap_or(base + v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(seq: u16, ts: u32, ssrc: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0x80, 111];
        v.extend_from_slice(&seq.to_be_bytes());
        v.extend_from_slice(&ts.to_be_bytes());
        v.extend_from_slice(&ssrc.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn drain(i: &mut RtpIngest, now: u64) -> Vec<Frame> {
        std::iter::from_fn(|| i.poll_frame(now)).collect()
    }

    #[test]
    fn parses_headers_with_csrc_extension_and_padding() {
        let mut v = vec![0xb1, 0x80 | 111, 0, 7, 0, 0, 3, 0xc0, 0, 0, 0, 9];
        v.extend_from_slice(&[1, 2, 3, 4]); // one CSRC
        v.extend_from_slice(&[0xbe, 0xde, 0, 1, 0x10, 0xff, 0, 0]); // one-word extension
        v.extend_from_slice(&[0xaa, 0xbb, 0, 0, 3]); // payload + 3 bytes padding
        let p = parse_rtp(&v).unwrap();
        assert_eq!((p.pt, p.seq, p.ts, p.ssrc), (111, 7, 960, 9));
        assert_eq!(p.payload, &[0xaa, 0xbb]);
        for bad in [
            &v[..11],
            &[0x40; 20][..],
            &{
                let mut w = v.clone();
                *w.last_mut().unwrap() = 200;
                w
            }[..],
        ] {
            assert!(parse_rtp(bad).is_err());
        }
    }

    #[test]
    fn in_order_stream_maps_to_media_time_from_zero() {
        let mut i = RtpIngest::new(Some(111));
        for k in 0..10u16 {
            i.handle_packet(
                &pkt(1000 + k, 5000 + u32::from(k) * 960, 1, &[k as u8]),
                u64::from(k) * 20_000,
            )
            .unwrap();
        }
        let out = drain(&mut i, 200_000);
        assert_eq!(out.len(), 10);
        for (k, f) in out.iter().enumerate() {
            assert_eq!(f.timestamp, k as u64 * 960);
            assert_eq!(f.seq, k as u64);
            assert_eq!(f.payload[0], k as u8);
        }
    }

    #[test]
    fn reordering_is_repaired_duplicates_dropped_and_gaps_given_up() {
        let mut i = RtpIngest::new(None);
        let order = [0u16, 2, 1, 1, 3, 5, 6];
        for (n, k) in order.iter().enumerate() {
            i.handle_packet(
                &pkt(*k, u32::from(*k) * 960, 7, &[*k as u8]),
                n as u64 * 20_000,
            )
            .unwrap();
        }
        // Seq 4 never comes: 5 and 6 wait for the reorder window, then flow.
        let early = drain(&mut i, 6 * 20_000);
        let seqs: Vec<u8> = early.iter().map(|f| f.payload[0]).collect();
        assert_eq!(seqs, [0, 1, 2, 3]);
        let late = drain(&mut i, 6 * 20_000 + REORDER_WINDOW_US + 1);
        let seqs: Vec<u8> = late.iter().map(|f| f.payload[0]).collect();
        assert_eq!(seqs, [5, 6]);
        assert_eq!(
            late[0].timestamp,
            5 * 960,
            "the gap stays visible in media time"
        );
        let s = i.stats();
        assert_eq!((s.late_or_duplicate, s.lost, s.reordered), (1, 1, 1));
        // A straggler for the given-up seq 4 is dropped.
        i.handle_packet(&pkt(4, 4 * 960, 7, &[4]), 300_000).unwrap();
        assert!(drain(&mut i, 400_000).is_empty());
    }

    #[test]
    fn sequence_and_timestamp_wrap() {
        let mut i = RtpIngest::new(None);
        let mut seq = 65_530u16;
        let mut ts = u32::MAX - 960 * 3;
        let mut out = Vec::new();
        for n in 0..20u64 {
            i.handle_packet(&pkt(seq, ts, 1, &[1]), n * 20_000).unwrap();
            out.extend(drain(&mut i, n * 20_000));
            seq = seq.wrapping_add(1);
            ts = ts.wrapping_add(960);
        }
        assert_eq!(out.len(), 20);
        assert!(out
            .windows(2)
            .all(|w| w[1].timestamp == w[0].timestamp + 960));
        assert_eq!(i.stats().restarts, 0);
    }

    #[test]
    fn ssrc_change_continues_the_timeline() {
        let mut i = RtpIngest::new(None);
        for k in 0..5u16 {
            i.handle_packet(&pkt(k, u32::from(k) * 960, 1, &[1]), u64::from(k) * 20_000)
                .unwrap();
        }
        let first = drain(&mut i, 100_000);
        let last = first.last().unwrap().timestamp;
        // The sender restarts 1 s later with a new SSRC, random seq and timestamp.
        let t = 80_000 + 1_000_000;
        for k in 0..5u16 {
            i.handle_packet(
                &pkt(40_000 + k, 123_456 + u32::from(k) * 960, 2, &[2]),
                t + u64::from(k) * 20_000,
            )
            .unwrap();
        }
        let second = drain(&mut i, t + 100_000);
        assert_eq!(second.len(), 5);
        let gap = second[0].timestamp - last;
        assert!(
            (960 + 47_000..=960 + 49_000).contains(&gap),
            "gap of {gap} samples for 1 s of silence"
        );
        assert!(second
            .windows(2)
            .all(|w| w[1].timestamp == w[0].timestamp + 960));
        assert_eq!(i.stats().restarts, 1);
    }

    #[test]
    fn packets_held_at_a_restart_come_out_first() {
        let mut i = RtpIngest::new(None);
        i.handle_packet(&pkt(10, 9600, 1, &[1]), 0).unwrap();
        i.handle_packet(&pkt(12, 11520, 1, &[3]), 10_000).unwrap(); // 11 missing: held
        assert_eq!(drain(&mut i, 10_000).len(), 1);
        i.handle_packet(&pkt(500, 0, 2, &[9]), 30_000).unwrap();
        let out = drain(&mut i, 30_000);
        let payloads: Vec<u8> = out.iter().map(|f| f.payload[0]).collect();
        assert_eq!(payloads, [3, 9]);
        assert!(out[1].timestamp > out[0].timestamp);
    }

    #[test]
    fn dtx_gaps_pass_through_and_wrong_payload_types_are_dropped() {
        let mut i = RtpIngest::new(Some(111));
        i.handle_packet(&pkt(1, 0, 1, &[1]), 0).unwrap();
        i.handle_packet(&pkt(2, 960 * 20, 1, &[2]), 400_000)
            .unwrap(); // 400 ms of DTX
        let out = drain(&mut i, 400_000);
        assert_eq!(out[1].timestamp - out[0].timestamp, 960 * 20);
        let mut other = pkt(3, 960 * 21, 1, &[3]);
        other[1] = 96;
        assert!(i.handle_packet(&other, 420_000).is_err());
        assert!(i.handle_packet(&[0u8; 5], 420_000).is_err());
        assert_eq!(i.stats().malformed, 2);
    }

    #[test]
    fn garbage_never_panics() {
        let mut i = RtpIngest::new(None);
        let mut x = 0x1234_5678_9abc_def0u64;
        for n in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 40) as usize;
            let mut buf: Vec<u8> = (0..len).map(|k| (x >> (k % 8 * 8)) as u8).collect();
            if n % 3 == 0 && len > 12 {
                buf[0] = 0x80;
            }
            let _ = i.handle_packet(&buf, n * 1000);
            while i.poll_frame(n * 1000).is_some() {}
        }
    }
}
