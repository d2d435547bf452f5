//! Relay load generator.
//!
//! Starts `tern origin` and `tern relay` as their own processes, connects N WebRTC listeners
//! to the relay over WHEP (each a real ICE + DTLS-SRTP handshake with str0m, on its own UDP
//! port), then measures for a window: packets delivered, the relay's user and kernel CPU
//! (from /proc), its resident memory, and loss on a sample of listeners that decrypt and
//! check every packet. The others only count datagrams (and keep ICE consent alive), so
//! the generator's cost stays below the relay's.
//!
//! `cargo run --release -p tern-bench-relay -- --tern target/release/tern --listeners 500`

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use str0m::change::SdpAnswer;
use str0m::media::{Direction, MediaKind};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};

#[derive(Parser)]
struct Args {
    /// The tern binary (a release build gives the meaningful figures).
    #[arg(long, default_value = "target/release/tern")]
    tern: String,
    /// Listener counts to measure, one run each.
    #[arg(long, value_delimiter = ',', default_value = "100,500")]
    listeners: Vec<usize>,
    /// Measurement window after all listeners are connected.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// One in this many listeners decrypts every packet (loss, payload checks).
    #[arg(long, default_value_t = 50)]
    sample_every: usize,
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}
fn free_tcp() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

fn wait_health(addr: SocketAddr) -> Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        if matches!(http(addr, "GET", "/health", b""), Ok((200, _))) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("no /health at {addr}")
}

/// (user, system) CPU seconds of a process, from /proc/PID/stat.
fn cpu(pid: u32) -> Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the command name.
    let tick = 100.0; // USER_HZ on Linux
    Ok((f[11].parse::<f64>()? / tick, f[12].parse::<f64>()? / tick))
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

#[derive(Default)]
struct Counters {
    datagrams: AtomicU64,
    sampled_frames: AtomicU64,
    sampled_gaps: AtomicU64,
}

/// One listener on its own thread-free socket, driven by the shared poller below.
struct Client {
    rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    sampled: bool,
    connected: bool,
    last_rtp_time: Option<u64>,
    next_timeout: Instant,
}

fn connect(relay_http: SocketAddr, sampled: bool) -> Result<Client> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.set_nonblocking(true)?;
    let local = socket.local_addr()?;
    let mut rtc = Rtc::builder()
        .set_crypto_provider(Arc::new(str0m::crypto::from_feature_flags()))
        .build(Instant::now());
    rtc.add_local_candidate(Candidate::host(local, "udp")?);
    let mut api = rtc.sdp_api();
    api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
    let (offer, pending) = api.apply().context("offer")?;
    let (status, body) = http(
        relay_http,
        "POST",
        "/whep/demo",
        offer.to_sdp_string().as_bytes(),
    )?;
    if status != 201 {
        bail!("WHEP POST answered {status}: {body}");
    }
    rtc.sdp_api()
        .accept_answer(pending, SdpAnswer::from_sdp_string(&body)?)?;
    Ok(Client {
        rtc,
        socket,
        local,
        sampled,
        connected: false,
        last_rtp_time: None,
        next_timeout: Instant::now(),
    })
}

impl Client {
    fn drain(&mut self, c: &Counters) {
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
                Ok(Output::Event(Event::MediaData(d))) => {
                    c.sampled_frames.fetch_add(1, Ordering::Relaxed);
                    let t = d.time.numer();
                    if self.last_rtp_time.is_some_and(|l| t != l + 960) {
                        c.sampled_gaps.fetch_add(1, Ordering::Relaxed);
                    }
                    self.last_rtp_time = Some(t);
                }
                Ok(Output::Event(_)) => {}
                Err(_) => return,
            }
        }
    }

    /// Reads everything waiting on the socket. SRTP is decrypted only on sampled clients, or
    /// before the session is up; otherwise RTP is just counted.
    fn pump(&mut self, buf: &mut [u8], c: &Counters, now: Instant) {
        while let Ok((n, source)) = self.socket.recv_from(buf) {
            let first = buf[0];
            let is_rtp = (128..192).contains(&first) && n > 12 && !(200..=206).contains(&buf[1]);
            if is_rtp {
                c.datagrams.fetch_add(1, Ordering::Relaxed);
                if self.connected && !self.sampled {
                    continue;
                }
            }
            let Ok(contents) = buf[..n].try_into() else {
                continue;
            };
            let input = Input::Receive(
                now,
                Receive {
                    proto: Protocol::Udp,
                    source,
                    destination: self.local,
                    contents,
                },
            );
            if self.rtc.handle_input(input).is_ok() {
                self.drain(c);
            }
        }
        if now >= self.next_timeout && self.rtc.handle_input(Input::Timeout(now)).is_ok() {
            self.drain(c);
        }
    }
}

fn run(args: &Args, listeners: usize) -> Result<()> {
    let origin_udp = free_udp();
    let (origin_http, relay_http) = (free_tcp(), free_tcp());
    let dir = std::env::temp_dir().join(format!("tern-relay-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cert = dir.join("origin.pem");
    let quiet = |c: &mut Command| {
        c.env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    };
    let mut oc = Command::new(&args.tern);
    oc.args(["origin", "--http", &origin_http.to_string()])
        .env("TERN_ORIGIN__LISTEN", origin_udp.to_string())
        .env("TERN_ORIGIN__CERT_OUT", &cert);
    quiet(&mut oc);
    let _origin = Proc(oc.spawn().context("starting tern origin")?);
    wait_health(origin_http)?;
    let mut rc = Command::new(&args.tern);
    rc.args(["relay", "--http", &relay_http.to_string()])
        .env("TERN_UPSTREAM__ADDR", origin_udp.to_string())
        .env("TERN_UPSTREAM__CA", &cert)
        .env("TERN_RELAY__MAX_LISTENERS", (listeners + 10).to_string())
        .env("TERN_RELAY__SESSIONS_PER_MINUTE", "1000000")
        .env("TERN_RELAY__SESSION_BURST", "1000000");
    quiet(&mut rc);
    let relay = Proc(rc.spawn().context("starting tern relay")?);
    let pid = relay.0.id();
    wait_health(relay_http)?;
    let rss_idle = rss_kib(pid)?;

    let counters = Counters::default();
    let mut clients = Vec::with_capacity(listeners);
    let t_connect = Instant::now();
    let mut buf = vec![0u8; 2048];
    for i in 0..listeners {
        clients.push(connect(relay_http, i % args.sample_every == 0)?);
        // Keep the earlier ones' handshakes moving while the rest are created.
        let now = Instant::now();
        for c in clients.iter_mut() {
            c.pump(&mut buf, &counters, now);
        }
    }
    while clients.iter().any(|c| !c.connected) {
        if t_connect.elapsed() > Duration::from_secs(60) {
            bail!(
                "{} of {listeners} listeners connected within 60 s",
                clients.iter().filter(|c| c.connected).count()
            );
        }
        let now = Instant::now();
        for c in clients.iter_mut() {
            c.pump(&mut buf, &counters, now);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let connect_time = t_connect.elapsed();
    // Settle, then measure a window.
    let settle = Instant::now() + Duration::from_secs(2);
    while Instant::now() < settle {
        let now = Instant::now();
        for c in clients.iter_mut() {
            c.pump(&mut buf, &counters, now);
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let (u0, s0) = cpu(pid)?;
    let d0 = counters.datagrams.load(Ordering::Relaxed);
    let (f0, g0) = (
        counters.sampled_frames.load(Ordering::Relaxed),
        counters.sampled_gaps.load(Ordering::Relaxed),
    );
    let t0 = Instant::now();
    let window = Duration::from_secs(args.seconds);
    while t0.elapsed() < window {
        let now = Instant::now();
        for c in clients.iter_mut() {
            c.pump(&mut buf, &counters, now);
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let secs = t0.elapsed().as_secs_f64();
    let (u1, s1) = cpu(pid)?;
    let rss = rss_kib(pid)?;
    let packets = counters.datagrams.load(Ordering::Relaxed) - d0;
    let frames = counters.sampled_frames.load(Ordering::Relaxed) - f0;
    let gaps = counters.sampled_gaps.load(Ordering::Relaxed) - g0;
    let sampled = clients.iter().filter(|c| c.sampled).count();
    let expected = (listeners as f64 * 50.0 * secs) as u64;
    let (user, sys) = (u1 - u0, s1 - s0);
    let per = |cpu: f64| cpu * 1e6 / packets.max(1) as f64;
    println!(
        "| {listeners} | {:.1} s | {:.0} | {:.1}% | {:.1} | {:.1}% | {:.1} | {:.1} | {:.1} | {} / {} frames, {} gaps |",
        connect_time.as_secs_f64(),
        packets as f64 / secs,
        (1.0 - packets as f64 / expected as f64) * 100.0,
        per(user),
        user / secs * 100.0,
        per(sys),
        per(user + sys),
        (rss.saturating_sub(rss_idle)) as f64 / listeners as f64,
        frames,
        (50.0 * secs * sampled as f64) as u64,
        gaps
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    println!("| listeners | connect all | packets/s delivered | missing | relay user µs/pkt | relay user CPU | relay kernel µs/pkt | relay total µs/pkt | RSS KiB/listener | sampled listeners |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for &n in &args.listeners {
        run(&args, n)?;
    }
    Ok(())
}
