//! Tern under test: `tern origin` with an RTP ingest endpoint fed by the bench's source, and
//! `tern relay` pulling that broadcast and serving WHEP listeners. Both are their own
//! processes; only the relay is measured.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::client::Client;
use crate::sys::{free_tcp, free_udp, http, wait_http, Proc};

const BROADCAST: &str = "bench";

pub(crate) struct Tern {
    // Dropped (killed) in declaration order: the relay before its origin.
    relay: Proc,
    _origin: Proc,
    relay_http: SocketAddr,
    rtp_target: SocketAddr,
    dir: PathBuf,
}

impl Tern {
    /// Starts origin and relay. The relay's WebRTC socket is on `relay_ip`.
    pub(crate) fn start(binary: &str, relay_ip: IpAddr, max_listeners: usize) -> Result<Self> {
        let origin_quic = free_udp([127, 0, 0, 1].into())?;
        let (origin_http, relay_http) = (free_tcp()?, free_tcp()?);
        let dir = std::env::temp_dir().join(format!("tern-relay-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let cert = dir.join("origin.pem");
        let quiet = |c: &mut Command| {
            c.env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null());
        };
        let mut oc = Command::new(binary);
        oc.args(["origin", "--http", &origin_http.to_string()])
            .env("TERN_ORIGIN__LISTEN", origin_quic.to_string())
            .env("TERN_ORIGIN__CERT_OUT", &cert)
            // Only the bench's RTP: no built-in test tone encoding next to the relay.
            .env("TERN_ORIGIN__TEST_BROADCASTS", "[]");
        quiet(&mut oc);
        let mut origin = Proc(oc.spawn().context("starting tern origin")?);
        wait_http(origin_http, "/health", &mut origin, "tern origin")?;
        let (status, body) = http(
            origin_http,
            "POST",
            "/v1/ingest",
            "application/json",
            format!(r#"{{"broadcast": "{BROADCAST}"}}"#).as_bytes(),
            Duration::from_secs(10),
        )?;
        if status != 201 {
            bail!("POST /v1/ingest answered {status}: {body}");
        }
        let endpoint: serde_json::Value = serde_json::from_str(&body)?;
        let rtp_target: SocketAddr = endpoint["address"]
            .as_str()
            .context("ingest endpoint without an address")?
            .parse()?;

        let mut rc = Command::new(binary);
        rc.args(["relay", "--http", &relay_http.to_string()])
            .env("TERN_UPSTREAM__ADDR", origin_quic.to_string())
            .env("TERN_UPSTREAM__CA", &cert)
            .env(
                "TERN_RELAY__WEBRTC_LISTEN",
                SocketAddr::new(relay_ip, 0).to_string(),
            )
            .env(
                "TERN_RELAY__MAX_LISTENERS",
                (max_listeners + 10).to_string(),
            )
            .env("TERN_RELAY__SESSIONS_PER_MINUTE", "1000000")
            .env("TERN_RELAY__SESSION_BURST", "1000000");
        quiet(&mut rc);
        let mut relay = Proc(rc.spawn().context("starting tern relay")?);
        wait_http(relay_http, "/health", &mut relay, "tern relay")?;
        Ok(Self {
            relay,
            _origin: origin,
            relay_http,
            rtp_target,
            dir,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.relay.pid()
    }

    /// The relay's own account of the time it adds (frame in from upstream → the last
    /// listener's packet handed to the kernel), p50 and p99 in ms, from its `/metrics`.
    pub(crate) fn fanout_ms(&self) -> Option<(f64, f64)> {
        let (status, body) = http(
            self.relay_http,
            "GET",
            "/metrics",
            "",
            b"",
            Duration::from_secs(5),
        )
        .ok()?;
        if status != 200 {
            return None;
        }
        Some((
            fanout_quantile(&body, "0.5")?,
            fanout_quantile(&body, "0.99")?,
        ))
    }

    /// Where RTP for the broadcast goes (the origin's ingest endpoint).
    pub(crate) fn rtp_target(&self) -> SocketAddr {
        self.rtp_target
    }

    /// WHEP: the listener offers, the relay answers.
    pub(crate) fn connect(&mut self, client: &mut Client) -> Result<()> {
        let (offer, pending) = client.offer()?;
        let (status, body) = http(
            self.relay_http,
            "POST",
            &format!("/whep/{BROADCAST}"),
            "application/sdp",
            offer.as_bytes(),
            Duration::from_secs(10),
        )?;
        if status != 201 {
            bail!("WHEP POST answered {status}: {body}");
        }
        client.accept_answer(pending, &body)
    }
}

impl Drop for Tern {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A quantile of the relay's fan-out time summary in ms (summed over shards' series, if a
/// label ever splits them: the largest wins).
fn fanout_quantile(metrics: &str, q: &str) -> Option<f64> {
    let key = format!("quantile=\"{q}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("tern_relay_frame_fanout_seconds{") && l.contains(&key))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(f64::max)
        .map(|s| s * 1000.0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_fanout_quantiles() {
        let m = "# TYPE tern_relay_frame_fanout_seconds summary\n\
                 tern_relay_frame_fanout_seconds{quantile=\"0.5\"} 0.00025\n\
                 tern_relay_frame_fanout_seconds{quantile=\"0.99\"} 0.0021\n\
                 tern_relay_frame_fanout_seconds_sum 1\n";
        assert_eq!(super::fanout_quantile(m, "0.5"), Some(0.25));
        assert_eq!(super::fanout_quantile(m, "0.99"), Some(2.1));
        assert_eq!(super::fanout_quantile(m, "0.9"), None);
    }
}
