//! The routing decision: which relay, or the CDN, serves a listener.
//!
//! [`decide`] is a pure function of its arguments. It reads no clock, does no I/O and
//! draws no random numbers; the shell gathers the fleet's state (polling `/health`) and the
//! client's location (mmdb lookup) and passes them in. In order:
//!
//! 1. A passive listener (`?passive=1`) goes to the CDN's HLS.
//! 2. A broadcast whose WebRTC audience (summed over the fleet) has reached
//!    `cdn_switch_threshold` sends new listeners to HLS: the CDN scales with bandwidth,
//!    relays with listeners.
//! 3. Candidates are relays that are healthy, not draining, and below `load_threshold` of
//!    their capacity. None → HLS.
//! 4. While the broadcast's audience is below `relay_activation_threshold`, listeners join
//!    relays that already carry it, if any has room: each relay pulls a broadcast from the
//!    origin once, so a small audience is not spread over every region's relay.
//! 5. Known coordinates → the nearest candidate by great-circle distance. Unknown → the
//!    least-loaded candidate of the client's continent's region (if configured) or of the
//!    default region; failing that, the least-loaded candidate anywhere.
//!
//! Ties break on load, then on relay id, so the result never depends on fleet order.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::lookup::{Coords, Location};

/// The last known state of one relay, as the shell assembled it.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayState {
    /// Unique id, e.g. "eu-1".
    pub id: String,
    /// Region name, e.g. "eu".
    pub region: String,
    /// Public base URL, e.g. `https://relay-1.eu.example.net` (no trailing slash needed).
    pub url: String,
    /// Where the relay is.
    pub coords: Coords,
    /// Listeners it can take.
    pub capacity: usize,
    /// It answered its last health check.
    pub healthy: bool,
    /// It is draining: serves who it has, takes no one new.
    pub draining: bool,
    /// Listeners now, all broadcasts.
    pub listeners: usize,
    /// Listeners now, per broadcast.
    pub per_broadcast: BTreeMap<String, usize>,
}

impl RelayState {
    fn load(&self) -> f64 {
        if self.capacity == 0 {
            return f64::INFINITY;
        }
        self.listeners as f64 / self.capacity as f64
    }

    fn carries(&self, broadcast: &str) -> usize {
        self.per_broadcast.get(broadcast).copied().unwrap_or(0)
    }
}

/// The operator's routing policy (the `[router]` configuration).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Region for clients whose location is unknown.
    pub default_region: String,
    /// Continent code (EU, NA, ...) → region, for clients whose database record has a
    /// continent but no coordinates.
    pub continent_regions: BTreeMap<String, String>,
    /// Below this many WebRTC listeners of a broadcast (fleet-wide), new listeners join
    /// relays that already carry it instead of activating more relays.
    pub relay_activation_threshold: usize,
    /// At this many WebRTC listeners of a broadcast (fleet-wide), new listeners go to HLS.
    /// 0 disables the switch.
    pub cdn_switch_threshold: usize,
    /// A relay with `listeners >= capacity × load_threshold` takes no new listeners.
    pub load_threshold: f64,
    /// The CDN's HLS URL; `{broadcast}` is replaced by the broadcast id.
    pub cdn_hls_url: String,
}

/// What is being asked.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    /// The broadcast id (already validated by the shell).
    pub broadcast: &'a str,
    /// Where the client is.
    pub location: &'a Location,
    /// The client asked for passive (HLS) listening.
    pub passive: bool,
}

/// How the listener should listen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// WHEP to a relay.
    Webrtc,
    /// HLS from the CDN.
    Hls,
}

/// Why, in one word; serialized in `snake_case` for `/v1/route`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The client asked for HLS.
    Passive,
    /// The broadcast's WebRTC audience reached `cdn_switch_threshold`.
    CdnSwitchThreshold,
    /// No healthy, non-draining relay is below its load threshold.
    NoRelayWithRoom,
    /// The nearest relay with room.
    Nearest,
    /// Below `relay_activation_threshold`: the nearest relay already carrying the broadcast.
    BelowActivationThreshold,
    /// Location unknown, continent known: the least-loaded relay of the continent's region.
    ContinentRegion,
    /// Location unknown: the least-loaded relay of the default region.
    DefaultRegion,
    /// Location unknown and the preferred region is full: the least-loaded relay anywhere.
    AnyRegion,
}

/// Where to send the listener.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// WebRTC or HLS.
    pub tier: Tier,
    /// The WHEP endpoint (`{relay url}/whep/{broadcast}`) or the CDN's HLS URL.
    pub url: String,
    /// The chosen relay, for WebRTC.
    pub relay_id: Option<String>,
    /// The chosen relay's region, for WebRTC.
    pub region: Option<String>,
    /// Why.
    pub reason: Reason,
}

/// Great-circle distance in kilometres (haversine, mean Earth radius).
pub fn distance_km(a: Coords, b: Coords) -> f64 {
    const R: f64 = 6371.0088;
    let (la1, la2) = (a.lat.to_radians(), b.lat.to_radians());
    let dla = la2 - la1;
    let dlo = (b.lon - a.lon).to_radians();
    let h = (dla / 2.0).sin().powi(2) + la1.cos() * la2.cos() * (dlo / 2.0).sin().powi(2);
    2.0 * R * h.sqrt().min(1.0).asin()
}

/// Chooses the tier and the relay for one listener. See the module docs for the rules.
pub fn decide(req: &RouteRequest<'_>, fleet: &[RelayState], policy: &Policy) -> Decision {
    let hls = |reason| Decision {
        tier: Tier::Hls,
        url: policy.cdn_hls_url.replace("{broadcast}", req.broadcast),
        relay_id: None,
        region: None,
        reason,
    };
    if req.passive {
        return hls(Reason::Passive);
    }
    // Draining relays still serve their listeners: they count toward the audience.
    let audience: usize = fleet
        .iter()
        .filter(|r| r.healthy)
        .map(|r| r.carries(req.broadcast))
        .sum();
    if policy.cdn_switch_threshold > 0 && audience >= policy.cdn_switch_threshold {
        return hls(Reason::CdnSwitchThreshold);
    }
    let has_room = |r: &&RelayState| {
        r.healthy
            && !r.draining
            && r.capacity > 0
            && (r.listeners as f64) < r.capacity as f64 * policy.load_threshold
    };
    if !fleet.iter().any(|r| has_room(&r)) {
        return hls(Reason::NoRelayWithRoom);
    }
    let carrying = |r: &&RelayState| has_room(r) && r.carries(req.broadcast) > 0;
    let consolidate =
        audience < policy.relay_activation_threshold && fleet.iter().any(|r| carrying(&r));

    let by_load = |a: &&RelayState, b: &&RelayState| {
        a.load()
            .partial_cmp(&b.load())
            .unwrap_or(Ordering::Equal)
            .then_with(|| a.id.cmp(&b.id))
    };
    let pick = |filter: &dyn Fn(&&RelayState) -> bool| -> Option<&RelayState> {
        match req.location.coords {
            Some(c) => fleet.iter().filter(filter).min_by(|a, b| {
                distance_km(c, a.coords)
                    .partial_cmp(&distance_km(c, b.coords))
                    .unwrap_or(Ordering::Equal)
                    .then_with(|| by_load(a, b))
            }),
            None => fleet.iter().filter(filter).min_by(by_load),
        }
    };

    let chosen = if consolidate {
        pick(&carrying).map(|r| (r, Reason::BelowActivationThreshold))
    } else if req.location.coords.is_some() {
        pick(&has_room).map(|r| (r, Reason::Nearest))
    } else {
        let continent_region = req
            .location
            .continent
            .and_then(|c| policy.continent_regions.get(c.as_str()));
        let in_region = |region: &str| pick(&|r: &&RelayState| has_room(r) && r.region == region);
        continent_region
            .and_then(|reg| in_region(reg).map(|r| (r, Reason::ContinentRegion)))
            .or_else(|| in_region(&policy.default_region).map(|r| (r, Reason::DefaultRegion)))
            .or_else(|| pick(&has_room).map(|r| (r, Reason::AnyRegion)))
    };
    match chosen {
        Some((r, reason)) => Decision {
            tier: Tier::Webrtc,
            url: format!("{}/whep/{}", r.url.trim_end_matches('/'), req.broadcast),
            relay_id: Some(r.id.clone()),
            region: Some(r.region.clone()),
            reason,
        },
        // Unreachable in practice (a relay with room exists), but never panic on a route.
        None => hls(Reason::NoRelayWithRoom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lookup::Code;

    fn relay(id: &str, region: &str, lat: f64, lon: f64) -> RelayState {
        RelayState {
            id: id.into(),
            region: region.into(),
            url: format!("https://{id}.example.net"),
            coords: Coords::new(lat, lon).unwrap(),
            capacity: 100,
            healthy: true,
            draining: false,
            listeners: 0,
            per_broadcast: BTreeMap::new(),
        }
    }

    /// Frankfurt, Virginia, Singapore.
    fn fleet() -> Vec<RelayState> {
        vec![
            relay("eu-1", "eu", 50.11, 8.68),
            relay("us-1", "us", 38.95, -77.45),
            relay("ap-1", "ap", 1.35, 103.82),
        ]
    }

    fn policy() -> Policy {
        Policy {
            default_region: "us".into(),
            continent_regions: [
                ("EU".to_string(), "eu".to_string()),
                ("AS".into(), "ap".into()),
            ]
            .into(),
            relay_activation_threshold: 0,
            cdn_switch_threshold: 0,
            load_threshold: 0.9,
            cdn_hls_url: "https://cdn.example.net/hls/{broadcast}/master.m3u8".into(),
        }
    }

    fn at(lat: f64, lon: f64) -> Location {
        Location {
            coords: Coords::new(lat, lon),
            ..Location::default()
        }
    }

    fn continent(c: &str) -> Location {
        Location {
            continent: Code::new(c),
            ..Location::default()
        }
    }

    fn with(f: impl Fn(&mut Vec<RelayState>)) -> Vec<RelayState> {
        let mut v = fleet();
        f(&mut v);
        v
    }

    fn listeners(r: &mut RelayState, broadcast: &str, n: usize) {
        r.listeners += n;
        *r.per_broadcast.entry(broadcast.into()).or_default() += n;
    }

    #[test]
    fn decision_table() {
        let london = at(51.51, -0.09);
        let seattle = at(47.25, -122.31);
        let tokyo = at(35.69, 139.69);
        let unknown = Location::default();
        struct Case {
            name: &'static str,
            location: Location,
            passive: bool,
            fleet: Vec<RelayState>,
            policy: Policy,
            want: (Tier, Option<&'static str>, Reason),
        }
        let cases = vec![
            Case {
                name: "london → frankfurt",
                location: london,
                passive: false,
                fleet: fleet(),
                policy: policy(),
                want: (Tier::Webrtc, Some("eu-1"), Reason::Nearest),
            },
            Case {
                name: "seattle → virginia",
                location: seattle,
                passive: false,
                fleet: fleet(),
                policy: policy(),
                want: (Tier::Webrtc, Some("us-1"), Reason::Nearest),
            },
            Case {
                name: "tokyo → singapore",
                location: tokyo,
                passive: false,
                fleet: fleet(),
                policy: policy(),
                want: (Tier::Webrtc, Some("ap-1"), Reason::Nearest),
            },
            Case {
                name: "passive → cdn",
                location: london,
                passive: true,
                fleet: fleet(),
                policy: policy(),
                want: (Tier::Hls, None, Reason::Passive),
            },
            Case {
                name: "unknown → default region",
                location: unknown,
                passive: false,
                fleet: fleet(),
                policy: policy(),
                want: (Tier::Webrtc, Some("us-1"), Reason::DefaultRegion),
            },
            Case {
                name: "continent only → its region",
                location: continent("EU"),
                passive: false,
                fleet: fleet(),
                policy: policy(),
                want: (Tier::Webrtc, Some("eu-1"), Reason::ContinentRegion),
            },
            Case {
                name: "unmapped continent → default region",
                location: continent("SA"),
                passive: false,
                fleet: fleet(),
                policy: policy(),
                want: (Tier::Webrtc, Some("us-1"), Reason::DefaultRegion),
            },
            Case {
                name: "nearest down → next nearest",
                location: london,
                passive: false,
                fleet: with(|f| f[0].healthy = false),
                policy: policy(),
                want: (Tier::Webrtc, Some("us-1"), Reason::Nearest),
            },
            Case {
                name: "nearest draining → next nearest",
                location: london,
                passive: false,
                fleet: with(|f| f[0].draining = true),
                policy: policy(),
                want: (Tier::Webrtc, Some("us-1"), Reason::Nearest),
            },
            Case {
                name: "nearest at load threshold → next nearest",
                location: london,
                passive: false,
                fleet: with(|f| f[0].listeners = 90),
                policy: policy(),
                want: (Tier::Webrtc, Some("us-1"), Reason::Nearest),
            },
            Case {
                name: "nearest just under load threshold",
                location: london,
                passive: false,
                fleet: with(|f| f[0].listeners = 89),
                policy: policy(),
                want: (Tier::Webrtc, Some("eu-1"), Reason::Nearest),
            },
            Case {
                name: "default region full → any region",
                location: unknown,
                passive: false,
                fleet: with(|f| {
                    f[1].listeners = 100;
                    f[2].listeners = 50;
                    f[0].listeners = 10;
                }),
                policy: policy(),
                want: (Tier::Webrtc, Some("eu-1"), Reason::AnyRegion),
            },
            Case {
                name: "every relay full → cdn",
                location: london,
                passive: false,
                fleet: with(|f| {
                    for r in f.iter_mut() {
                        r.listeners = 95
                    }
                }),
                policy: policy(),
                want: (Tier::Hls, None, Reason::NoRelayWithRoom),
            },
            Case {
                name: "every relay down → cdn",
                location: unknown,
                passive: false,
                fleet: with(|f| {
                    for r in f.iter_mut() {
                        r.healthy = false
                    }
                }),
                policy: policy(),
                want: (Tier::Hls, None, Reason::NoRelayWithRoom),
            },
            Case {
                name: "empty fleet → cdn",
                location: london,
                passive: false,
                fleet: vec![],
                policy: policy(),
                want: (Tier::Hls, None, Reason::NoRelayWithRoom),
            },
            Case {
                name: "zero capacity is never chosen",
                location: london,
                passive: false,
                fleet: with(|f| f[0].capacity = 0),
                policy: policy(),
                want: (Tier::Webrtc, Some("us-1"), Reason::Nearest),
            },
            Case {
                name: "broadcast at cdn switch threshold → cdn",
                location: london,
                passive: false,
                fleet: with(|f| {
                    listeners(&mut f[1], "demo", 30);
                    listeners(&mut f[2], "demo", 20);
                }),
                policy: Policy {
                    cdn_switch_threshold: 50,
                    ..policy()
                },
                want: (Tier::Hls, None, Reason::CdnSwitchThreshold),
            },
            Case {
                name: "other broadcasts do not count toward the switch",
                location: london,
                passive: false,
                fleet: with(|f| listeners(&mut f[1], "other", 60)),
                policy: Policy {
                    cdn_switch_threshold: 50,
                    ..policy()
                },
                want: (Tier::Webrtc, Some("eu-1"), Reason::Nearest),
            },
            Case {
                name: "down relays' stale counts do not count",
                location: london,
                passive: false,
                fleet: with(|f| {
                    listeners(&mut f[1], "demo", 60);
                    f[1].healthy = false;
                }),
                policy: Policy {
                    cdn_switch_threshold: 50,
                    ..policy()
                },
                want: (Tier::Webrtc, Some("eu-1"), Reason::Nearest),
            },
            Case {
                name: "draining relays' listeners still count",
                location: london,
                passive: false,
                fleet: with(|f| {
                    listeners(&mut f[1], "demo", 60);
                    f[1].draining = true;
                }),
                policy: Policy {
                    cdn_switch_threshold: 50,
                    ..policy()
                },
                want: (Tier::Hls, None, Reason::CdnSwitchThreshold),
            },
            Case {
                name: "small audience joins the relay already carrying it",
                location: london,
                passive: false,
                fleet: with(|f| listeners(&mut f[2], "demo", 5)),
                policy: Policy {
                    relay_activation_threshold: 200,
                    ..policy()
                },
                want: (Tier::Webrtc, Some("ap-1"), Reason::BelowActivationThreshold),
            },
            Case {
                name: "of several carrying relays, the nearest",
                location: london,
                passive: false,
                fleet: with(|f| {
                    listeners(&mut f[1], "demo", 5);
                    listeners(&mut f[2], "demo", 5);
                }),
                policy: Policy {
                    relay_activation_threshold: 200,
                    ..policy()
                },
                want: (Tier::Webrtc, Some("us-1"), Reason::BelowActivationThreshold),
            },
            Case {
                name: "audience at activation threshold → nearest",
                location: london,
                passive: false,
                fleet: with(|f| listeners(&mut f[2], "demo", 85)),
                policy: Policy {
                    relay_activation_threshold: 80,
                    ..policy()
                },
                want: (Tier::Webrtc, Some("eu-1"), Reason::Nearest),
            },
            Case {
                name: "carrying relay full → activate the nearest",
                location: london,
                passive: false,
                fleet: with(|f| {
                    listeners(&mut f[2], "demo", 5);
                    f[2].listeners = 95;
                }),
                policy: Policy {
                    relay_activation_threshold: 200,
                    ..policy()
                },
                want: (Tier::Webrtc, Some("eu-1"), Reason::Nearest),
            },
            Case {
                name: "no broadcast carried yet → nearest",
                location: tokyo,
                passive: false,
                fleet: fleet(),
                policy: Policy {
                    relay_activation_threshold: 200,
                    ..policy()
                },
                want: (Tier::Webrtc, Some("ap-1"), Reason::Nearest),
            },
        ];
        for c in cases {
            let d = decide(
                &RouteRequest {
                    broadcast: "demo",
                    location: &c.location,
                    passive: c.passive,
                },
                &c.fleet,
                &c.policy,
            );
            let got = (d.tier, d.relay_id.as_deref(), d.reason);
            assert_eq!(got, c.want, "{}", c.name);
            match d.tier {
                Tier::Hls => {
                    assert_eq!(
                        d.url, "https://cdn.example.net/hls/demo/master.m3u8",
                        "{}",
                        c.name
                    );
                    assert_eq!(d.region, None);
                }
                Tier::Webrtc => {
                    let id = d.relay_id.as_deref().unwrap();
                    assert_eq!(
                        d.url,
                        format!("https://{id}.example.net/whep/demo"),
                        "{}",
                        c.name
                    );
                    assert_eq!(d.region.as_deref(), Some(&id[..2]), "{}", c.name);
                }
            }
        }
    }

    #[test]
    fn ties_break_on_load_then_id_whatever_the_fleet_order() {
        let here = at(10.0, 10.0);
        let mut twins = vec![relay("b", "x", 20.0, 20.0), relay("a", "x", 20.0, 20.0)];
        let req = RouteRequest {
            broadcast: "demo",
            location: &here,
            passive: false,
        };
        assert_eq!(
            decide(&req, &twins, &policy()).relay_id.as_deref(),
            Some("a")
        );
        twins.reverse();
        assert_eq!(
            decide(&req, &twins, &policy()).relay_id.as_deref(),
            Some("a")
        );
        twins[0].listeners = 10; // "a" is now busier
        assert_eq!(
            decide(&req, &twins, &policy()).relay_id.as_deref(),
            Some("b")
        );
    }

    #[test]
    fn distances_are_great_circle() {
        let london = Coords::new(51.5074, -0.1278).unwrap();
        let paris = Coords::new(48.8566, 2.3522).unwrap();
        let d = distance_km(london, paris);
        assert!((d - 343.5).abs() < 2.0, "{d}");
        // Across the antimeridian: Fiji to Samoa is short, not half the planet.
        let fiji = Coords::new(-18.0, 178.0).unwrap();
        let samoa = Coords::new(-13.8, -172.0).unwrap();
        assert!(distance_km(fiji, samoa) < 1200.0);
        assert_eq!(distance_km(london, london), 0.0);
    }

    #[test]
    fn trailing_slash_in_relay_url_is_harmless() {
        let mut f = fleet();
        f[0].url = "https://eu-1.example.net/".into();
        let london = at(51.5, 0.0);
        let d = decide(
            &RouteRequest {
                broadcast: "b1",
                location: &london,
                passive: false,
            },
            &f,
            &policy(),
        );
        assert_eq!(d.url, "https://eu-1.example.net/whep/b1");
    }
}
