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
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(ct) = content_type {
        head.push_str(&format!("Content-Type: {ct}\r\n"));
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
    let mut body = raw[split + 4..].to_vec();
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
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
