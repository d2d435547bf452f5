//! The geo-routing shell around [`tern_geoip::decide`]: polls each relay's `/health`, keeps
//! the fleet's last known state, reloads the GeoIP databases on SIGHUP or file change, and
//! answers "where should this client listen?".
//!
//! Tasks: one poller per relay (timeout, backoff while it is down) and one database
//! watcher. Request handling takes a read lock on the fleet state, does one mmdb lookup and
//! calls the pure decision; it never waits on the network.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Uri;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tern_geoip::lookup::Coords;
use tern_geoip::{decide, Decision, Location, Policy, RelayState, RouteRequest, SharedDb};
use tern_origin_link::BroadcastId;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::config::RouterConfig;
use crate::Error;

/// Largest `/health` body read from a relay.
const HEALTH_BODY_LIMIT: usize = 64 * 1024;

/// An IP network (`10.0.0.0/8`, `2001:db8::/32`) or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR block"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
            None => max,
        };
        Ok(Self { net, prefix })
    }
}

impl Cidr {
    /// True when `ip` is inside. IPv4-mapped IPv6 addresses count as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// The client's address: the socket peer, unless the peer is a trusted proxy; then the
/// `X-Forwarded-For` chain is walked from the right (the hop nearest us) to the first
/// address that is not a trusted proxy. Entries a client wrote itself sit further left and
/// are never reached past an untrusted hop, so a client cannot choose its location.
pub fn client_ip<'a>(
    peer: IpAddr,
    forwarded_for: impl Iterator<Item = &'a str>,
    trusted: &[Cidr],
) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let hops: Vec<&str> = forwarded_for.flat_map(|v| v.split(',')).collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !is_trusted(ip) {
                    break;
                }
            }
            // Garbage in the chain: believe nothing beyond it.
            Err(_) => break,
        }
    }
    client
}

/// What one health check found.
#[derive(Debug, Clone, PartialEq)]
pub enum Health {
    /// Answering. A draining relay is up (its listeners count) but takes no one new.
    Up {
        /// It reported `"draining": true` or status "draining".
        draining: bool,
        /// Listeners now.
        listeners: usize,
        /// Its own `relay.max_listeners`, if reported.
        capacity: Option<usize>,
        /// Listeners per broadcast.
        per_broadcast: BTreeMap<String, usize>,
    },
    /// Not answering, or not well.
    Down(String),
}

/// Reads a relay's `/health` answer. Pure, for tests.
pub fn parse_health(status: u16, body: &[u8]) -> Health {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Health::Down(format!("HTTP {status}, body is not JSON"));
    };
    let state = v.get("status").and_then(|s| s.as_str()).unwrap_or("");
    let draining = v.get("draining").and_then(|d| d.as_bool()) == Some(true) || state == "draining";
    // A draining relay may answer 503 so that load balancers skip it: still up for us.
    if !draining && (!(200..300).contains(&status) || state != "ok") {
        return Health::Down(format!("HTTP {status}, status {state:?}"));
    }
    let l = v.get("listeners");
    let num = |v: Option<&serde_json::Value>| v.and_then(|n| n.as_u64()).map(|n| n as usize);
    let per_broadcast = l
        .and_then(|l| l.get("per_broadcast"))
        .and_then(|p| p.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_u64()? as usize)))
                .collect()
        })
        .unwrap_or_default();
    if l.is_none_or(|l| l.is_null()) {
        return Health::Down("not a relay (no listeners in /health)".into());
    }
    Health::Up {
        draining,
        listeners: num(l.and_then(|l| l.get("total"))).unwrap_or(0),
        capacity: num(l.and_then(|l| l.get("capacity"))),
        per_broadcast,
    }
}

struct Member {
    health_url: Uri,
    configured_capacity: usize,
    last_error: RwLock<Option<String>>,
}

/// The router: fleet state, policy, GeoIP databases. Share as `Arc<Router>`.
pub struct Router {
    policy: Policy,
    trusted: Vec<Cidr>,
    db: Arc<SharedDb>,
    members: Vec<Member>,
    fleet: RwLock<Vec<RelayState>>,
    poll_interval: Duration,
}

impl Router {
    /// Builds the router from (validated) configuration and opens the GeoIP databases:
    /// a missing or corrupt database file is an error here, at start-up.
    pub fn new(cfg: &RouterConfig) -> Result<Arc<Self>, Error> {
        let db = Arc::new(SharedDb::open(cfg.mmdb.clone())?);
        if cfg.mmdb.is_empty() {
            warn!("router.mmdb names no database: every listener goes to the default region");
        }
        let mut members = Vec::new();
        let mut fleet = Vec::new();
        for f in &cfg.fleet {
            let health_url = f
                .health_url()
                .parse()
                .map_err(|e| Error::Io(format!("router.fleet {}: health URL: {e}", f.id)))?;
            let coords = Coords::new(f.latitude, f.longitude)
                .ok_or_else(|| Error::Io(format!("router.fleet {}: bad coordinates", f.id)))?;
            members.push(Member {
                health_url,
                configured_capacity: f.capacity,
                last_error: RwLock::new(None),
            });
            fleet.push(RelayState {
                id: f.id.clone(),
                region: f.region.clone(),
                url: f.url.trim_end_matches('/').to_owned(),
                coords,
                capacity: f.capacity,
                // Unknown until the first poll, which `start` waits for.
                healthy: false,
                draining: false,
                listeners: 0,
                per_broadcast: BTreeMap::new(),
            });
        }
        let trusted = cfg
            .trusted_proxies
            .iter()
            .map(|p| p.parse::<Cidr>().map_err(Error::Io))
            .collect::<Result<_, _>>()?;
        Ok(Arc::new(Self {
            policy: Policy {
                default_region: cfg.default_region.clone(),
                continent_regions: cfg.continent_regions.clone(),
                relay_activation_threshold: cfg.relay_activation_threshold,
                cdn_switch_threshold: cfg.cdn_switch_threshold,
                load_threshold: cfg.load_threshold,
                cdn_hls_url: cfg.cdn_hls_url.clone(),
            },
            trusted,
            db,
            members,
            fleet: RwLock::new(fleet),
            poll_interval: cfg.poll_interval(),
        }))
    }

    /// Polls every relay once (so the first routes see real state), then starts the
    /// pollers and the database watcher; they stop when `shutdown` flips to true.
    pub async fn start(
        self: &Arc<Self>,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<(&'static str, JoinHandle<()>)> {
        let mut first = tokio::task::JoinSet::new();
        for i in 0..self.members.len() {
            let me = self.clone();
            first.spawn(async move { me.poll(i).await });
        }
        while first.join_next().await.is_some() {}
        let up = self.read_fleet().iter().filter(|r| r.healthy).count();
        info!(relays = self.members.len(), up, "router: fleet polled");

        let mut tasks = Vec::new();
        for i in 0..self.members.len() {
            let me = self.clone();
            let mut stop = shutdown.clone();
            tasks.push((
                "router poller",
                tokio::spawn(async move {
                    let mut failures = 0u32;
                    let mut ok = me.read_fleet()[i].healthy;
                    loop {
                        if ok {
                            failures = 0;
                        } else {
                            failures += 1;
                        }
                        // Back off while a relay stays down (2×, then 4× the interval): it is
                        // already out of rotation, and a host in trouble needs no extra load.
                        let delay = me.poll_interval * (1 << failures.saturating_sub(1).min(2));
                        tokio::select! {
                            () = tokio::time::sleep(delay) => {}
                            () = crate::stopped(&mut stop) => return,
                        }
                        ok = me.poll(i).await;
                    }
                }),
            ));
        }
        let me = self.clone();
        let mut stop = shutdown;
        tasks.push((
            "geoip watcher",
            tokio::spawn(async move {
                #[cfg(unix)]
                let mut hup =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
                loop {
                    #[cfg(unix)]
                    let hangup = async {
                        match &mut hup {
                            Some(h) => {
                                h.recv().await;
                            }
                            None => std::future::pending().await,
                        }
                    };
                    #[cfg(not(unix))]
                    let hangup = std::future::pending::<()>();
                    let forced = tokio::select! {
                        () = tokio::time::sleep(me.poll_interval) => false,
                        () = hangup => true,
                        () = crate::stopped(&mut stop) => return,
                    };
                    let db = me.db.clone();
                    // Reading a 30 MB file is blocking work: keep it off the runtime threads.
                    let res = tokio::task::spawn_blocking(move || {
                        if forced {
                            db.reload().map(|()| true)
                        } else {
                            db.reload_if_changed()
                        }
                    })
                    .await;
                    match res {
                        Ok(Ok(true)) => info!("GeoIP databases reloaded"),
                        Ok(Ok(false)) => {}
                        Ok(Err(e)) => {
                            warn!("GeoIP reload refused, keeping the previous databases: {e}")
                        }
                        Err(e) => warn!("GeoIP reload task: {e}"),
                    }
                }
            }),
        ));
        tasks
    }

    fn read_fleet(&self) -> std::sync::RwLockReadGuard<'_, Vec<RelayState>> {
        // Writers only assign plain fields; a poisoned lock still holds a whole value.
        self.fleet.read().unwrap_or_else(|e| e.into_inner())
    }

    /// One health check of relay `i`; updates its state. Returns whether it is up.
    async fn poll(&self, i: usize) -> bool {
        let m = &self.members[i];
        let timeout =
            (self.poll_interval / 2).clamp(Duration::from_millis(100), Duration::from_secs(2));
        let health = match fetch(&m.health_url, timeout).await {
            Ok((status, body)) => parse_health(status, &body),
            Err(e) => Health::Down(e),
        };
        let mut fleet = self.fleet.write().unwrap_or_else(|e| e.into_inner());
        let r = &mut fleet[i];
        let was = (r.healthy, r.draining);
        let up = match health {
            Health::Up {
                draining,
                listeners,
                capacity,
                per_broadcast,
            } => {
                r.healthy = true;
                r.draining = draining;
                r.listeners = listeners;
                r.capacity =
                    capacity.map_or(m.configured_capacity, |c| c.min(m.configured_capacity));
                r.per_broadcast = per_broadcast;
                *m.last_error.write().unwrap_or_else(|e| e.into_inner()) = None;
                true
            }
            Health::Down(why) => {
                r.healthy = false;
                if was.0 {
                    warn!(relay = %r.id, "relay down: {why}");
                } else {
                    debug!(relay = %r.id, "relay still down: {why}");
                }
                *m.last_error.write().unwrap_or_else(|e| e.into_inner()) = Some(why);
                false
            }
        };
        if (r.healthy, r.draining) != was && r.healthy {
            info!(relay = %r.id, draining = r.draining, "relay up");
        }
        up
    }

    /// The client address to locate, given the socket peer and any `X-Forwarded-For`.
    pub fn client_ip<'a>(
        &self,
        peer: IpAddr,
        forwarded_for: impl Iterator<Item = &'a str>,
    ) -> IpAddr {
        client_ip(peer, forwarded_for, &self.trusted)
    }

    /// Where `client` should listen to `broadcast`.
    pub fn route(&self, broadcast: &BroadcastId, client: IpAddr, passive: bool) -> Decision {
        let location = self.db.lookup(client).unwrap_or_else(|e| {
            debug!("{e}");
            Location::default()
        });
        let fleet = self.read_fleet();
        let d = decide(
            &RouteRequest {
                broadcast: broadcast.as_str(),
                location: &location,
                passive,
            },
            &fleet,
            &self.policy,
        );
        drop(fleet);
        metrics::counter!("tern_route_decisions_total", "tier" => tier_label(&d)).increment(1);
        d
    }

    /// The fleet as last polled, for `/health`.
    pub fn fleet_json(&self) -> serde_json::Value {
        let fleet = self.read_fleet();
        let relays: Vec<_> = fleet
            .iter()
            .zip(&self.members)
            .map(|(r, m)| {
                json!({
                    "id": r.id, "region": r.region, "healthy": r.healthy, "draining": r.draining,
                    "listeners": r.listeners, "capacity": r.capacity,
                    "error": *m.last_error.read().unwrap_or_else(|e| e.into_inner()),
                })
            })
            .collect();
        json!({ "relays": relays })
    }
}

fn tier_label(d: &Decision) -> &'static str {
    match d.tier {
        tern_geoip::Tier::Webrtc => "webrtc",
        tern_geoip::Tier::Hls => "hls",
    }
}

/// GET over plain HTTP/1.1 with an overall timeout: (status, body).
async fn fetch(uri: &Uri, timeout: Duration) -> Result<(u16, Bytes), String> {
    let work = async {
        let host = uri.host().ok_or("no host in the health URL")?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(80);
        let stream = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        // The connection task ends when `sender` is dropped at the end of this request.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let authority = uri.authority().map_or(host, |a| a.as_str());
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, authority)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), HEALTH_BODY_LIMIT)
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok::<_, String>((status, body))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_blocks() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains(ip("10.200.1.1")));
        assert!(c.contains(ip("::ffff:10.1.1.1")));
        assert!(!c.contains(ip("11.0.0.1")));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:1::5")) && !v6.contains(ip("2001:db9::1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.9")));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("example.net".parse::<Cidr>().is_err());
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let trusted: Vec<Cidr> = vec!["127.0.0.1".parse().unwrap(), "10.0.0.0/8".parse().unwrap()];
        let t = |peer: &str, xff: &[&str]| client_ip(ip(peer), xff.iter().copied(), &trusted);
        // Untrusted peer: its header is ignored.
        assert_eq!(t("203.0.113.9", &["81.2.69.142"]), ip("203.0.113.9"));
        // Trusted peer: the nearest untrusted hop.
        assert_eq!(t("127.0.0.1", &["81.2.69.142"]), ip("81.2.69.142"));
        assert_eq!(
            t("127.0.0.1", &["1.1.1.1, 81.2.69.142, 10.0.0.7"]),
            ip("81.2.69.142")
        );
        // Several header lines form one list.
        assert_eq!(
            t("127.0.0.1", &["1.1.1.1", "81.2.69.142"]),
            ip("81.2.69.142")
        );
        assert_eq!(t("127.0.0.1", &["2001:218::1"]), ip("2001:218::1"));
        // Garbage: stop at the last good hop.
        assert_eq!(t("127.0.0.1", &["81.2.69.142, junk"]), ip("127.0.0.1"));
        assert_eq!(t("127.0.0.1", &[]), ip("127.0.0.1"));
    }

    #[test]
    fn health_answers() {
        let ok = br#"{"status":"ok","listeners":{"total":7,"per_broadcast":{"demo":5,"b":2},"capacity":50}}"#;
        assert_eq!(
            parse_health(200, ok),
            Health::Up {
                draining: false,
                listeners: 7,
                capacity: Some(50),
                per_broadcast: [("demo".to_string(), 5), ("b".to_string(), 2)].into(),
            }
        );
        let draining = br#"{"status":"draining","draining":true,"listeners":{"total":3,"per_broadcast":{},"capacity":50}}"#;
        for status in [200, 503] {
            assert!(matches!(
                parse_health(status, draining),
                Health::Up {
                    draining: true,
                    listeners: 3,
                    ..
                }
            ));
        }
        assert!(matches!(parse_health(500, ok), Health::Down(_)));
        assert!(matches!(parse_health(200, b"<html>"), Health::Down(_)));
        // A router or packager answers /health too, but serves no listeners.
        assert!(matches!(
            parse_health(200, br#"{"status":"ok","listeners":null}"#),
            Health::Down(_)
        ));
    }
}
