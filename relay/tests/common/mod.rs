//! Helpers shared by the process-level tests: start `tern`, speak minimal HTTP.
#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_tcp() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
pub fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

pub fn text(b: Vec<u8>) -> String {
    String::from_utf8(b).unwrap()
}

/// `tern certs --dir DIR NAME NAMES...`: the fleet CA (made once) and NAME's certificate.
pub fn certs(dir: &std::path::Path, name: &str, names: &[&str]) {
    let ok = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["certs", "--dir"])
        .arg(dir)
        .arg(name)
        .args(names)
        .status()
        .unwrap()
        .success();
    assert!(ok, "tern certs");
}

/// A running `tern` process and its HTTP address.
pub struct Tern {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Tern {
    /// Starts `tern <command>` with extra environment, and waits for `/health`.
    pub fn start(command: &str, env: &[(&str, String)]) -> Self {
        Self::start_with_args(command, &[], env)
    }

    /// As [`Tern::start`], with extra flags (e.g. `--config PATH`).
    pub fn start_with_args(command: &str, args: &[&str], env: &[(&str, String)]) -> Self {
        let addr = free_tcp();
        let child = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args([command, "--http", &addr.to_string()])
            .args(args)
            .env("RUST_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("tern starts");
        let t = Self { child, addr };
        t.wait_for("/health", Duration::from_secs(20));
        t
    }

    pub fn get(&self, path: &str) -> (u16, Vec<u8>) {
        request(self.addr, "GET", path, None, &[])
    }

    pub fn wait_for(&self, path: &str, timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        loop {
            if TcpStream::connect(self.addr).is_ok() {
                if let (200, body) = self.get(path) {
                    return body;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{path} not served within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGINT, then the process must exit 0 promptly.
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "tern exited with {status}");
                return;
            }
            assert!(Instant::now() < deadline, "tern did not stop on SIGINT");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tern {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// A minimal HTTP/1.1 client: one request per connection, `Connection: close`.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> (u16, Vec<u8>) {
    let (status, body, _) = request_full(addr, method, path, content_type, body, None);
    (status, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[..line_end]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[line_end + 2..line_end + 2 + size]);
        b = &b[line_end + 2 + size + 2..];
    }
}

/// A WebRTC listener (str0m, full ICE, real UDP) running on its own thread.
pub struct Listener {
    /// Frames received so far: (RTP time, payload size).
    pub frames: std::sync::Arc<std::sync::Mutex<Vec<(u64, usize)>>>,
    /// The WHEP session URL path.
    pub location: String,
    /// The relay's SDP answer.
    pub answer: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Listener {
    /// POSTs an offer to `/whep/{broadcast}` (with a bearer token if given). On 201, listens
    /// until dropped; otherwise returns the status and body.
    pub fn start(
        addr: SocketAddr,
        broadcast: &str,
        token: Option<&str>,
    ) -> Result<Self, (u16, String)> {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        use str0m::change::SdpAnswer;
        use str0m::media::{Direction, MediaKind};
        use str0m::net::{Protocol, Receive};
        use str0m::{Candidate, Event, Input, Output, Rtc};

        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let local = socket.local_addr().unwrap();
        let mut rtc = Rtc::builder()
            .set_crypto_provider(Arc::new(str0m::crypto::from_feature_flags()))
            .build(Instant::now());
        rtc.add_local_candidate(Candidate::host(local, "udp").unwrap());
        let mut api = rtc.sdp_api();
        api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
        let (offer, pending) = api.apply().unwrap();
        let (status, body, location) = request_full(
            addr,
            "POST",
            &format!("/whep/{broadcast}"),
            Some("application/sdp"),
            offer.to_sdp_string().as_bytes(),
            token,
        );
        if status != 201 {
            return Err((status, text(body)));
        }
        let answer_sdp = text(body);
        let answer = SdpAnswer::from_sdp_string(&answer_sdp).unwrap();
        rtc.sdp_api().accept_answer(pending, answer).unwrap();

        let frames = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, st) = (frames.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 2000];
            while !st.load(Ordering::Relaxed) {
                let timeout = match rtc.poll_output() {
                    Ok(Output::Timeout(t)) => t,
                    Ok(Output::Transmit(t)) => {
                        let _ = socket.send_to(&t.contents, t.destination);
                        continue;
                    }
                    Ok(Output::Event(Event::MediaData(d))) => {
                        f.lock().unwrap().push((d.time.numer(), d.data.len()));
                        continue;
                    }
                    Ok(Output::Event(_)) => continue,
                    Err(_) => return,
                };
                let wait = timeout
                    .saturating_duration_since(Instant::now())
                    .clamp(Duration::from_millis(1), Duration::from_millis(50));
                socket.set_read_timeout(Some(wait)).unwrap();
                let input = match socket.recv_from(&mut buf) {
                    Ok((n, source)) => match buf[..n].try_into() {
                        Ok(contents) => Input::Receive(
                            Instant::now(),
                            Receive {
                                proto: Protocol::Udp,
                                source,
                                destination: local,
                                contents,
                            },
                        ),
                        Err(_) => continue,
                    },
                    Err(_) => Input::Timeout(Instant::now()),
                };
                if rtc.handle_input(input).is_err() {
                    return;
                }
            }
        });
        Ok(Self {
            frames,
            location: location.unwrap_or_default(),
            answer: answer_sdp,
            stop,
            thread: Some(thread),
        })
    }

    /// Frames received so far.
    pub fn count(&self) -> usize {
        self.frames.lock().unwrap().len()
    }

    /// Waits until at least `n` frames arrived, or panics after `timeout`.
    pub fn wait_frames(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.count() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} frames within {timeout:?}",
                self.count()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Like [`request`], with an optional bearer token, also returning the Location header.
pub fn request_full(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
    token: Option<&str>,
) -> (u16, Vec<u8>, Option<String>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(ct) = content_type {
        head.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // The server may answer (413) before reading a large body; a failed write is fine then.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response");
    let status: u16 = std::str::from_utf8(&raw[9..12]).unwrap().parse().unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let location = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("location: ")
                .or_else(|| l.strip_prefix("Location: "))
        })
        .map(str::to_owned);
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, body, location)
}

impl Tern {
    /// Waits for the process to exit on its own; panics after `timeout`.
    pub fn wait_exit(mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "tern still running after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends a signal by name (e.g. "TERM").
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .unwrap()
            .success());
    }
}

/// A UDP forwarder between one client and `target` that can cut the link (drop everything
/// both ways) on demand. Runs until dropped.
pub struct CutProxy {
    /// Where clients send.
    pub addr: SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl CutProxy {
    pub fn start(target: SocketAddr) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").unwrap();
        back.connect(target).unwrap();
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        }
        let addr = front.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let (front2, back2) = (front.try_clone().unwrap(), back.try_clone().unwrap());
        let (c1, s1, cl1) = (cut.clone(), stop.clone(), client.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s1.load(Ordering::Relaxed) {
                if let Ok((n, from)) = front.recv_from(&mut buf) {
                    *cl1.lock().unwrap() = Some(from);
                    if !c1.load(Ordering::Relaxed) {
                        let _ = back.send(&buf[..n]);
                    }
                }
            }
        });
        let (c2, s2) = (cut.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s2.load(Ordering::Relaxed) {
                if let Ok(n) = back2.recv(&mut buf) {
                    let to = *client.lock().unwrap();
                    if let (false, Some(to)) = (c2.load(Ordering::Relaxed), to) {
                        let _ = front2.send_to(&buf[..n], to);
                    }
                }
            }
        });
        Self { addr, cut, stop }
    }

    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Listens to `demo` at `relay` for `dur` over WebRTC (the relay must admit it and answer as
/// ICE-lite); returns the frames received: (RTP time, payload size).
pub fn listen_for(relay: SocketAddr, dur: Duration) -> Vec<(u64, usize)> {
    let l = Listener::start(relay, "demo", None)
        .unwrap_or_else(|(status, body)| panic!("WHEP POST answered {status}: {body}"));
    assert!(l.answer.contains("a=ice-lite"), "the relay is ICE-lite");
    std::thread::sleep(dur);
    let frames = l.frames.lock().unwrap().clone();
    frames
}
