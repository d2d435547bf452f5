//! Relay load generator: Tern's relay, and the Janus streaming plugin as the peer to compare
//! against, under the same load.
//!
//! For each listener count and each server in turn: start the server as its own process(es),
//! feed it the same Opus RTP (see `source`), connect N WebRTC listeners (each a real ICE +
//! DTLS-SRTP handshake with str0m, on its own UDP port: WHEP towards Tern, Janus's REST API
//! towards Janus), then measure for a window: packets delivered, the server's user and kernel
//! CPU (from /proc, all threads), its resident memory, and loss and latency on a sample of
//! listeners that decrypt and check every packet. The others only count datagrams (and keep
//! ICE consent alive), so the generator's cost stays below the servers'.
//!
//! `cargo run --release -p tern-bench-relay -- --tern target/release/tern --listeners 500`
//! Tern and Janus side by side: `bench/relay/janus-vs-tern.sh` (a network namespace).

mod client;
mod janus;
mod source;
mod sys;
mod tern;

use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};

use crate::client::{pump_all, Client, Counters};
use crate::janus::{Janus, Loops};
use crate::source::{Frames, Source};
use crate::sys::{cpu, rss_kib, threads};
use crate::tern::Tern;

#[derive(Parser)]
struct Args {
    /// The tern binary (a release build gives the meaningful figures).
    #[arg(long, default_value = "target/release/tern")]
    tern: String,
    /// Servers to measure, in this order for each listener count.
    #[arg(long, value_delimiter = ',', default_value = "tern")]
    servers: Vec<ServerKind>,
    /// Listener counts to measure, one run per server each.
    #[arg(long, value_delimiter = ',', default_value = "100,500")]
    listeners: Vec<usize>,
    /// Measurement window after all listeners are connected.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Time between the last connection and the window.
    #[arg(long, default_value_t = 2)]
    settle: u64,
    /// One in this many listeners decrypts every packet (loss, latency, payload checks).
    #[arg(long, default_value_t = 50)]
    sample_every: usize,
    /// Address the servers' WebRTC side uses (Tern's relay socket, Janus's ICE candidate).
    #[arg(long, default_value = "127.0.0.1")]
    server_ip: IpAddr,
    /// Address the listeners bind to.
    #[arg(long, default_value = "127.0.0.1")]
    listener_ip: IpAddr,
    /// The Janus binary.
    #[arg(long, default_value = "janus")]
    janus: String,
    /// Janus's library folder (with plugins/ and transports/).
    #[arg(long, default_value = "/usr/lib/x86_64-linux-gnu/janus")]
    janus_lib: PathBuf,
    /// The interface holding --server-ip; Janus gathers candidates only there.
    #[arg(long, default_value = "d0")]
    janus_iface: String,
    /// `event_loops` for `--servers janus` (janus-threads uses Janus's thread per handle).
    #[arg(long, default_value_t = 2)]
    janus_event_loops: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ServerKind {
    /// `tern relay` (with `tern origin` upstream, not measured).
    Tern,
    /// Janus streaming plugin, handles sharing `--janus-event-loops` loops.
    Janus,
    /// Janus streaming plugin with its default thread per handle.
    JanusThreads,
}

enum Server {
    Tern(Tern),
    Janus(Janus),
}

impl Server {
    fn start(args: &Args, kind: ServerKind, listeners: usize) -> Result<Self> {
        let janus = |loops| {
            Janus::start(&janus::Settings {
                binary: &args.janus,
                lib_dir: &args.janus_lib,
                iface: &args.janus_iface,
                ip: args.server_ip,
                loops,
            })
            .map(Self::Janus)
        };
        match kind {
            ServerKind::Tern => Tern::start(&args.tern, args.server_ip, listeners).map(Self::Tern),
            ServerKind::Janus => janus(Loops::Shared(args.janus_event_loops)),
            ServerKind::JanusThreads => janus(Loops::PerHandle),
        }
    }
    fn pid(&self) -> u32 {
        match self {
            Self::Tern(t) => t.pid(),
            Self::Janus(j) => j.pid(),
        }
    }
    fn fanout_ms(&self) -> Option<(f64, f64)> {
        match self {
            Self::Tern(t) => t.fanout_ms(),
            Self::Janus(_) => None,
        }
    }
    fn rtp_target(&self) -> std::net::SocketAddr {
        match self {
            Self::Tern(t) => t.rtp_target(),
            Self::Janus(j) => j.rtp_target(),
        }
    }
    /// What the server logged last, if it keeps a log.
    fn log_tail(&self) -> String {
        match self {
            Self::Tern(_) => String::new(),
            Self::Janus(j) => format!("\nJanus's log ends:\n{}", j.log_tail()),
        }
    }
    fn connect(&mut self, client: &mut Client) -> Result<()> {
        match self {
            Self::Tern(t) => t.connect(client),
            Self::Janus(j) => j.connect(client),
        }
    }
}

fn label(args: &Args, kind: ServerKind) -> String {
    match kind {
        ServerKind::Tern => "Tern".into(),
        ServerKind::Janus => format!("Janus, event_loops = {}", args.janus_event_loops),
        ServerKind::JanusThreads => "Janus, thread per listener".into(),
    }
}

/// One server at one listener count.
struct Measured {
    kind: ServerKind,
    listeners: usize,
    connect: Duration,
    secs: f64,
    packets: u64,
    expected: u64,
    user: f64,
    sys: f64,
    rss_per_listener: f64,
    threads: u64,
    latency_us: Vec<u32>,
    sampled_frames: u64,
    sampled_expected: u64,
    gaps: u64,
    bench_cpu: f64,
    /// The server's own p50/p99 of the time it adds per frame, ms (Tern only).
    fanout_ms: Option<(f64, f64)>,
}

impl Measured {
    fn per_packet(&self, cpu: f64) -> f64 {
        cpu * 1e6 / self.packets.max(1) as f64
    }
    fn total_us(&self) -> f64 {
        self.per_packet(self.user + self.sys)
    }
    fn missing(&self) -> f64 {
        (1.0 - self.packets as f64 / self.expected.max(1) as f64) * 100.0
    }
    fn latency(&self, q: f64) -> f64 {
        let mut l = self.latency_us.clone();
        l.sort_unstable();
        match l.len() {
            0 => f64::NAN,
            n => f64::from(l[((n - 1) as f64 * q) as usize]) / 1000.0,
        }
    }
}

fn run(args: &Args, frames: &Arc<Frames>, kind: ServerKind, listeners: usize) -> Result<Measured> {
    let mut server = Server::start(args, kind, listeners)?;
    let pid = server.pid();
    let source = Source::start(frames.clone(), server.rtp_target())?;
    // Let the stream reach the server before anyone asks for it.
    std::thread::sleep(Duration::from_millis(500));
    let rss_idle = rss_kib(pid)?;

    let mut counters = Counters::default();
    let mut clients = Vec::with_capacity(listeners);
    let mut buf = vec![0u8; 2048];
    let t_connect = Instant::now();
    for i in 0..listeners {
        let mut client = Client::new(args.listener_ip, i % args.sample_every == 0)?;
        server
            .connect(&mut client)
            .with_context(|| format!("listener {i}{}", server.log_tail()))?;
        clients.push(client);
        // Keep the earlier ones' handshakes moving while the rest are created.
        let now = Instant::now();
        for c in clients.iter_mut() {
            c.pump(&mut buf, &mut counters, &source, now);
        }
    }
    while clients.iter().any(|c| !c.connected) {
        if t_connect.elapsed() > Duration::from_secs(60) {
            bail!(
                "{}: {} of {listeners} listeners connected within 60 s{}",
                label(args, kind),
                clients.iter().filter(|c| c.connected).count(),
                server.log_tail()
            );
        }
        let now = Instant::now();
        pump_all(
            &mut clients,
            &mut buf,
            &mut counters,
            &source,
            now,
            Duration::ZERO,
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let connect = t_connect.elapsed();
    let pause = Duration::from_micros(500);
    let settle = Instant::now() + Duration::from_secs(args.settle);
    pump_all(
        &mut clients,
        &mut buf,
        &mut counters,
        &source,
        settle,
        pause,
    );

    let me = std::process::id();
    let ((u0, s0), (bu0, bs0)) = (cpu(pid)?, cpu(me)?);
    let (d0, f0, g0, sent0) = (
        counters.datagrams,
        counters.sampled_frames,
        counters.sampled_gaps,
        source.sent(),
    );
    counters.record_latency = true;
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(args.seconds);
    pump_all(&mut clients, &mut buf, &mut counters, &source, end, pause);
    let secs = t0.elapsed().as_secs_f64();
    let ((u1, s1), (bu1, bs1)) = (cpu(pid)?, cpu(me)?);
    let sent = source.sent() - sent0;
    let rss = rss_kib(pid)?;
    let fanout_ms = server.fanout_ms();
    let sampled = clients.iter().filter(|c| c.sampled).count() as u64;
    Ok(Measured {
        kind,
        listeners,
        connect,
        secs,
        packets: counters.datagrams - d0,
        expected: sent * listeners as u64,
        user: u1 - u0,
        sys: s1 - s0,
        rss_per_listener: rss.saturating_sub(rss_idle) as f64 / listeners as f64,
        threads: threads(pid)?,
        latency_us: std::mem::take(&mut counters.latency_us),
        sampled_frames: counters.sampled_frames - f0,
        sampled_expected: sent * sampled,
        gaps: counters.sampled_gaps - g0,
        bench_cpu: (bu1 - bu0 + bs1 - bs0) / secs * 100.0,
        fanout_ms,
    })
}

fn print_row(args: &Args, m: &Measured) {
    println!(
        "| {} | {} | {:.1} s | {:.0} | {:.2}% | {:.1} | {:.1} | **{:.1}** | {:.0}% | {:.1} | {} | {:.1} / {:.1} ms | {} | {} / {} frames, {} gaps | {:.0}% |",
        m.listeners,
        label(args, m.kind),
        m.connect.as_secs_f64(),
        m.packets as f64 / m.secs,
        m.missing(),
        m.per_packet(m.user),
        m.per_packet(m.sys),
        m.total_us(),
        (m.user + m.sys) / m.secs * 100.0,
        m.rss_per_listener,
        m.threads,
        m.latency(0.5),
        m.latency(0.99),
        m.fanout_ms
            .map_or("–".into(), |(p50, p99)| format!("{p50:.2} / {p99:.2} ms")),
        m.sampled_frames,
        m.sampled_expected,
        m.gaps,
        m.bench_cpu,
    );
    let _ = std::io::stdout().flush();
}

fn main() -> Result<()> {
    let args = Args::parse();
    let frames = Arc::new(Frames::encode()?);
    println!(
        "Source: Opus stereo, 50 RTP packets/s, mean payload {:.0} bytes ({:.0} kb/s); window {} s after {} s settling.\n",
        frames.mean_size(),
        frames.mean_size() * 8.0 * 50.0 / 1000.0,
        args.seconds,
        args.settle
    );
    println!("| listeners | server | connect all | packets/s delivered | missing | user µs/pkt | kernel µs/pkt | total µs/pkt | server CPU | RSS KiB/listener | threads | latency p50 / p99 (sampled) | relay adds p50 / p99 | sampled listeners | generator CPU |");
    println!(
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    let mut all = Vec::new();
    for &n in &args.listeners {
        for &kind in &args.servers {
            let m = run(&args, &frames, kind, n)?;
            print_row(&args, &m);
            all.push(m);
        }
    }
    // Ratios of each other server to Tern at the same listener count (same run).
    let others: Vec<_> = all.iter().filter(|m| m.kind != ServerKind::Tern).collect();
    if !others.is_empty() && all.iter().any(|m| m.kind == ServerKind::Tern) {
        println!("\n| listeners | compared with Tern | CPU per packet, total | user | kernel | RSS per listener |");
        println!("| --- | --- | --- | --- | --- | --- |");
        for o in others {
            let Some(t) = all
                .iter()
                .find(|m| m.kind == ServerKind::Tern && m.listeners == o.listeners)
            else {
                continue;
            };
            let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
            println!(
                "| {} | {} | **{:.1}×** | {:.1}× | {:.1}× | {:.1}× |",
                o.listeners,
                label(&args, o.kind),
                ratio(o.total_us(), t.total_us()),
                ratio(o.per_packet(o.user), t.per_packet(t.user)),
                ratio(o.per_packet(o.sys), t.per_packet(t.sys)),
                ratio(o.rss_per_listener, t.rss_per_listener),
            );
        }
    }
    Ok(())
}
