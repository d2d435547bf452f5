//! The RTP/Opus source both servers are fed: the same packets at the same pace.
//!
//! Ten seconds of Tern's test signal (a tone with a tick every second, stereo, 64 kb/s) are
//! encoded once with libopus, then sent in a loop as plain RTP (payload type 111, one 20 ms
//! frame per packet) to whatever address the server under test receives on. A packet's send
//! time is remembered by frame, so a sampled listener can tell how long a payload took to
//! reach it without anything added to the stream.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tern_origin_link::testsrc::TestSource;

/// Frames in the loop: 10 s. The signal repeats every second, so the loop is seamless.
const LOOP_FRAMES: usize = 500;
const FRAME: Duration = Duration::from_millis(20);
const SAMPLES_PER_FRAME: u32 = 960;
pub(crate) const PAYLOAD_TYPE: u8 = 111;
const SSRC: u32 = 0x7e57_0001;

/// The encoded frames, and which frame indexes carry a given payload (identical frames occur).
pub(crate) struct Frames {
    payloads: Vec<Vec<u8>>,
    by_payload: HashMap<Vec<u8>, Vec<usize>>,
}

impl Frames {
    pub(crate) fn encode() -> Result<Self> {
        let mut src = TestSource::new(2, 64_000).context("Opus encoder (libopus via FFmpeg)")?;
        let mut payloads = Vec::with_capacity(LOOP_FRAMES);
        while payloads.len() < LOOP_FRAMES {
            if let Some(f) = src.next_frame(0)? {
                payloads.push(f.payload.to_vec());
            }
        }
        let mut by_payload: HashMap<Vec<u8>, Vec<usize>> = HashMap::new();
        for (i, p) in payloads.iter().enumerate() {
            by_payload.entry(p.clone()).or_default().push(i);
        }
        Ok(Self {
            payloads,
            by_payload,
        })
    }

    /// Mean payload size in bytes.
    pub(crate) fn mean_size(&self) -> f64 {
        self.payloads.iter().map(Vec::len).sum::<usize>() as f64 / self.payloads.len() as f64
    }
}

/// A running sender. Stops when dropped.
pub(crate) struct Source {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    frames: Arc<Frames>,
    epoch: Instant,
    stop: AtomicBool,
    sent: AtomicU64,
    /// Per frame index: when it was last sent, in ns since `epoch` (0 = never).
    sent_at: Vec<AtomicU64>,
}

impl Source {
    /// Starts sending to `to` from a socket on loopback.
    pub(crate) fn start(frames: Arc<Frames>, to: SocketAddr) -> Result<Self> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        let shared = Arc::new(Shared {
            sent_at: (0..frames.payloads.len())
                .map(|_| AtomicU64::new(0))
                .collect(),
            frames,
            epoch: Instant::now(),
            stop: AtomicBool::new(false),
            sent: AtomicU64::new(0),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("rtp-source".into())
            .spawn(move || send_loop(&s, &socket, to))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Packets sent so far.
    pub(crate) fn sent(&self) -> u64 {
        self.shared.sent.load(Ordering::Relaxed)
    }

    /// How long ago the most recent packet carrying `payload` was sent, if it was.
    pub(crate) fn age_of(&self, payload: &[u8], now: Instant) -> Option<Duration> {
        let s = &self.shared;
        let at = s.frames.by_payload.get(payload)?.iter().filter_map(|&i| {
            match s.sent_at[i].load(Ordering::Relaxed) {
                0 => None,
                ns => Some(s.epoch + Duration::from_nanos(ns)),
            }
        });
        at.filter(|&t| t <= now).max().map(|t| now - t)
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Sends one packet every 20 ms on an absolute schedule (a late wake-up is caught up, so the
/// long-run rate is exactly 50 packets per second).
fn send_loop(s: &Shared, socket: &UdpSocket, to: SocketAddr) {
    let mut packet = Vec::with_capacity(1500);
    let start = Instant::now();
    let mut n: u64 = 0;
    while !s.stop.load(Ordering::Relaxed) {
        let due = start + FRAME * n as u32;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
            continue;
        }
        let i = (n % s.frames.payloads.len() as u64) as usize;
        packet.clear();
        packet.push(0x80);
        packet.push(if n == 0 { 0x80 } else { 0 } | PAYLOAD_TYPE);
        packet.extend_from_slice(&(n as u16).to_be_bytes());
        packet.extend_from_slice(&(n as u32).wrapping_mul(SAMPLES_PER_FRAME).to_be_bytes());
        packet.extend_from_slice(&SSRC.to_be_bytes());
        packet.extend_from_slice(&s.frames.payloads[i]);
        let sent_ns = (Instant::now() - s.epoch).as_nanos().max(1) as u64;
        s.sent_at[i].store(sent_ns, Ordering::Relaxed);
        if socket.send_to(&packet, to).is_ok() {
            s.sent.fetch_add(1, Ordering::Relaxed);
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_paced_rtp_and_knows_when_each_payload_left() {
        let frames = Arc::new(Frames::encode().unwrap());
        assert_eq!(frames.payloads.len(), LOOP_FRAMES);
        assert!(frames.mean_size() > 100.0, "64 kb/s is ~160 bytes a frame");
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        // Taken before the sender's clock starts, so the bound below holds however the two
        // threads are scheduled.
        let t0 = Instant::now();
        let source = Source::start(frames.clone(), rx.local_addr().unwrap()).unwrap();
        let mut buf = [0u8; 1500];
        let mut last: Option<(u16, u32)> = None;
        for _ in 0..25 {
            let n = rx.recv(&mut buf).unwrap();
            assert_eq!(buf[0], 0x80);
            assert_eq!(buf[1] & 0x7f, PAYLOAD_TYPE);
            let seq = u16::from_be_bytes([buf[2], buf[3]]);
            let ts = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
            if let Some((s, t)) = last {
                assert_eq!(seq, s.wrapping_add(1));
                assert_eq!(ts, t.wrapping_add(SAMPLES_PER_FRAME));
            }
            last = Some((seq, ts));
            let age = source.age_of(&buf[12..n], Instant::now()).unwrap();
            assert!(age < Duration::from_millis(200), "{age:?}");
        }
        // The 25th packet is due 24 intervals of 20 ms after the first.
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(480), "{took:?}");
        // The sender counts a packet once `send_to` has returned, which can be after the
        // receiver already read it: give the count a moment to catch up.
        let deadline = Instant::now() + Duration::from_secs(1);
        while source.sent() < 25 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(source.sent() >= 25, "{} counted", source.sent());
        assert!(source
            .age_of(b"not an opus frame", Instant::now())
            .is_none());
        drop(source);
        assert_eq!(Arc::strong_count(&frames), 1, "the sender thread has ended");
    }
}
