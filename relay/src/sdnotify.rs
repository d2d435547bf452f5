//! systemd's service notification protocol (`sd_notify`), in the few lines it takes: one
//! datagram of `KEY=VALUE` lines to the Unix socket named by `$NOTIFY_SOCKET` (a path, or an
//! abstract name written with a leading `@`).
//!
//! `tern` sends `READY=1` once it serves, `WATCHDOG=1` at half of `$WATCHDOG_USEC` while its
//! runtime is alive, `RELOADING=1`/`READY=1` around a SIGHUP reload and `STOPPING=1` when it
//! begins to stop. Without `$NOTIFY_SOCKET` (not run by systemd) every call does nothing.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    target: String,
}

impl Notifier {
    /// The notifier systemd asked for, if any (`$NOTIFY_SOCKET`).
    pub fn from_env() -> Option<Self> {
        let target = std::env::var("NOTIFY_SOCKET").ok()?;
        match Self::new(&target) {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!("NOTIFY_SOCKET={target}: {e}; not notifying systemd");
                None
            }
        }
    }

    /// A notifier for the socket `target`: a filesystem path, or `@name` for an abstract one.
    pub fn new(target: &str) -> io::Result<Self> {
        if target.is_empty() || !(target.starts_with('/') || target.starts_with('@')) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not an absolute path or an @abstract name",
            ));
        }
        Ok(Self {
            socket: UnixDatagram::unbound()?,
            target: target.to_string(),
        })
    }

    /// Sends `state`: newline-separated `KEY=VALUE` assignments, e.g. `READY=1\nSTATUS=serving`.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        let sent = match self.target.strip_prefix('@') {
            #[cfg(target_os = "linux")]
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
                self.socket.send_to_addr(state.as_bytes(), &addr)?
            }
            #[cfg(not(target_os = "linux"))]
            Some(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "abstract sockets need Linux",
                ))
            }
            None => self.socket.send_to(state.as_bytes(), &self.target)?,
        };
        if sent != state.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short datagram"));
        }
        Ok(())
    }

    /// [`notify`](Self::notify), logging instead of failing: a lost notification must not stop
    /// the service (systemd's own timeouts report it).
    pub fn send(&self, state: &str) {
        if let Err(e) = self.notify(state) {
            tracing::warn!(state, "sd_notify to {}: {e}", self.target);
        }
    }
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, if it is set and meant for this
/// process (`$WATCHDOG_PID` absent or equal to our pid).
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

/// [`watchdog_interval`] over given values, for tests.
pub fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != me {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifies_a_real_datagram_socket() {
        let dir = std::env::temp_dir().join(format!("tern-sdnotify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();

        let n = Notifier::new(path.to_str().unwrap()).unwrap();
        n.notify("READY=1\nSTATUS=serving").unwrap();
        n.notify("WATCHDOG=1").unwrap();
        let mut buf = [0u8; 256];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving");
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn notifies_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("tern-sdnotify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Notifier::new(&format!("@{name}"))
            .unwrap()
            .notify("STOPPING=1")
            .unwrap();
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1");
    }

    #[test]
    fn refuses_relative_targets_and_reports_a_missing_socket() {
        assert!(Notifier::new("relative.sock").is_err());
        assert!(Notifier::new("").is_err());
        let n = Notifier::new("/nonexistent/tern/notify.sock").unwrap();
        assert!(n.notify("READY=1").is_err());
        n.send("READY=1"); // logs, does not panic
    }

    #[test]
    fn watchdog_interval_is_half_and_only_for_us() {
        assert_eq!(
            watchdog_interval_from(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval_from(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(watchdog_interval_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval_from(None, None, 7), None);
    }
}
