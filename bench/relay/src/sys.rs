//! Processes, free ports, one-shot HTTP and /proc readings.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A child process that is killed when dropped.
pub(crate) struct Proc(pub(crate) Child);

impl Proc {
    pub(crate) fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Fails if the process has already exited (it should be serving).
    pub(crate) fn check_alive(&mut self, what: &str) -> Result<()> {
        if let Some(status) = self.0.try_wait()? {
            bail!("{what} exited: {status}");
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn free_udp(ip: IpAddr) -> Result<SocketAddr> {
    Ok(UdpSocket::bind((ip, 0))?.local_addr()?)
}

pub(crate) fn free_tcp() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// One HTTP/1.1 exchange on a fresh connection: (status, body).
pub(crate) fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

/// Joins a chunked body (RFC 9112 §7.1): hex size line, data, CRLF, until size 0.
fn dechunk(mut rest: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size_line, after) = rest.split_once("\r\n").context("chunk size line")?;
        let hex = size_line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(hex, 16).with_context(|| format!("chunk size {hex:?}"))?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(after.get(..size).context("chunk shorter than its size")?);
        rest = after.get(size..).unwrap_or("").trim_start_matches("\r\n");
    }
}

/// Waits until `GET path` answers 200.
pub(crate) fn wait_http(addr: SocketAddr, path: &str, proc: &mut Proc, what: &str) -> Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        proc.check_alive(what)?;
        if matches!(
            http(addr, "GET", path, "text/plain", b"", Duration::from_secs(5)),
            Ok((200, _))
        ) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{what}: no answer on http://{addr}{path} within 20 s")
}

/// (user, system) CPU seconds of a process, all its threads, from /proc/PID/stat.
pub(crate) fn cpu(pid: u32) -> Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the command name.
    let tick = 100.0; // USER_HZ on Linux
    Ok((f[11].parse::<f64>()? / tick, f[12].parse::<f64>()? / tick))
}

/// Resident memory of a process, KiB.
pub(crate) fn rss_kib(pid: u32) -> Result<u64> {
    status_field(pid, "VmRSS:")
}

/// Threads of a process.
pub(crate) fn threads(pid: u32) -> Result<u64> {
    status_field(pid, "Threads:")
}

fn status_field(pid: u32, key: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(key))
        .with_context(|| key.to_owned())?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("status value")?
        .parse()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_chunked_bodies() {
        assert_eq!(
            dechunk("4\r\nWiki\r\n6;x=1\r\npedia \r\n0\r\n\r\n").unwrap(),
            "Wikipedia "
        );
        assert!(dechunk("9\r\nshort\r\n0\r\n\r\n").is_err());
        assert!(dechunk("zz\r\n").is_err());
    }

    #[test]
    fn reads_own_cpu_and_memory() {
        let pid = std::process::id();
        let (u0, _) = cpu(pid).unwrap();
        let t0 = Instant::now();
        let mut x = 0u64;
        while t0.elapsed() < Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let (u1, s1) = cpu(pid).unwrap();
        assert!(u1 - u0 >= 0.05, "user CPU after a 300 ms spin: {}", u1 - u0);
        assert!(s1 >= 0.0);
        assert!(rss_kib(pid).unwrap() > 100);
        assert!(threads(pid).unwrap() >= 1);
    }
}
