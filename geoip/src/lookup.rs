//! Client address → location, from MaxMind DB (mmdb) files.
//!
//! Two schemas are understood, detected per record so one reader serves both:
//! - GeoIP2 / GeoLite2 City: `continent.code`, `country.iso_code`,
//!   `location.latitude` / `location.longitude`; one file answers IPv4 and IPv6.
//! - the flat city schema of the ip-location-db packages: `country_code`, `latitude`,
//!   `longitude` (no continent); IPv4 and IPv6 come in separate files, and the IPv6 file does
//!   not answer IPv4 addresses.
//!
//! A [`GeoDb`] is immutable once opened. [`SharedDb`] holds the current one behind an
//! `RwLock<Arc<GeoDb>>`: a reload opens and checks the new files first, outside the lock,
//! then swaps the pointer, so lookups never wait on file I/O and never see a half-loaded set.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use maxminddb::Reader;
use serde::{Deserialize, Serialize};

use crate::Error;

/// A two-letter code (ISO 3166 country, or MaxMind continent code), stored inline so a
/// lookup allocates nothing.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Code([u8; 2]);

impl Code {
    /// Parses two ASCII letters; anything else is `None`.
    pub fn new(s: &str) -> Option<Self> {
        match s.as_bytes() {
            [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => {
                Some(Self([a.to_ascii_uppercase(), b.to_ascii_uppercase()]))
            }
            _ => None,
        }
    }

    /// The code as text, upper case.
    pub fn as_str(&self) -> &str {
        // Both bytes were checked to be ASCII letters in `new`.
        std::str::from_utf8(&self.0).unwrap_or("??")
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Code {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A point on the globe, in degrees.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Coords {
    /// Latitude, −90..=90.
    pub lat: f64,
    /// Longitude, −180..=180.
    pub lon: f64,
}

impl Coords {
    /// A point, if both values are finite and in range.
    pub fn new(lat: f64, lon: f64) -> Option<Self> {
        let ok = lat.is_finite()
            && lon.is_finite()
            && (-90.0..=90.0).contains(&lat)
            && (-180.0..=180.0).contains(&lon);
        ok.then_some(Self { lat, lon })
    }
}

/// What the databases know about where a client is. Any part may be missing.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Location {
    /// Latitude and longitude.
    pub coords: Option<Coords>,
    /// ISO 3166-1 alpha-2 country.
    pub country: Option<Code>,
    /// Continent (AF, AN, AS, EU, NA, OC, SA); only the GeoIP2 schema carries it.
    pub continent: Option<Code>,
}

impl Location {
    /// True when nothing at all is known.
    pub fn is_unknown(&self) -> bool {
        self.coords.is_none() && self.country.is_none() && self.continent.is_none()
    }
}

/// The database files to load. Every path given must exist and be a valid MaxMind DB.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MmdbPaths {
    /// A GeoIP2/GeoLite2 City database (answers IPv4 and IPv6). Asked first.
    pub city: Option<PathBuf>,
    /// A flat city database for IPv4 (ip-location-db schema). Asked when `city` has no
    /// coordinates for an IPv4 client.
    pub ipv4: Option<PathBuf>,
    /// A flat city database for IPv6 (ip-location-db schema).
    pub ipv6: Option<PathBuf>,
}

impl MmdbPaths {
    /// True when no file is configured: every client then has an unknown location.
    pub fn is_empty(&self) -> bool {
        self.city.is_none() && self.ipv4.is_none() && self.ipv6.is_none()
    }

    fn iter(&self) -> impl Iterator<Item = &Path> {
        [&self.city, &self.ipv4, &self.ipv6]
            .into_iter()
            .filter_map(|p| p.as_deref())
    }
}

/// The fields Tern reads, in both schemas. Unknown fields are skipped by the decoder.
#[derive(Deserialize)]
struct Record<'a> {
    #[serde(borrow, default)]
    continent: Option<CodeField<'a>>,
    #[serde(borrow, default)]
    country: Option<IsoField<'a>>,
    #[serde(default)]
    location: Option<LocationField>,
    #[serde(borrow, default)]
    country_code: Option<&'a str>,
    #[serde(default)]
    latitude: Option<Num>,
    #[serde(default)]
    longitude: Option<Num>,
}

/// A coordinate stored as a double (GeoIP2) or a float (ip-location-db). The decoder is
/// strict about the stored type, so accept whichever number it finds.
struct Num(f64);

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Num;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_f64<E>(self, v: f64) -> Result<Num, E> {
                Ok(Num(v))
            }
            fn visit_f32<E>(self, v: f32) -> Result<Num, E> {
                Ok(Num(f64::from(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Num, E> {
                Ok(Num(v as f64))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Num, E> {
                Ok(Num(v as f64))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
struct CodeField<'a> {
    #[serde(borrow, default)]
    code: Option<&'a str>,
}

#[derive(Deserialize)]
struct IsoField<'a> {
    #[serde(borrow, default)]
    iso_code: Option<&'a str>,
}

#[derive(Deserialize)]
struct LocationField {
    #[serde(default)]
    latitude: Option<Num>,
    #[serde(default)]
    longitude: Option<Num>,
}

impl Record<'_> {
    fn location(&self) -> Location {
        let (lat, lon) = match &self.location {
            Some(l) => (&l.latitude, &l.longitude),
            None => (&self.latitude, &self.longitude),
        };
        let (lat, lon) = (lat.as_ref().map(|n| n.0), lon.as_ref().map(|n| n.0));
        let country = self
            .country
            .as_ref()
            .and_then(|c| c.iso_code)
            .or(self.country_code);
        Location {
            coords: lat.zip(lon).and_then(|(a, o)| Coords::new(a, o)),
            country: country.and_then(Code::new),
            continent: self
                .continent
                .as_ref()
                .and_then(|c| c.code)
                .and_then(Code::new),
        }
    }
}

struct Db {
    path: PathBuf,
    reader: Reader<Vec<u8>>,
}

impl Db {
    fn open(path: &Path) -> Result<Self, Error> {
        let bytes = std::fs::read(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |reason: String| Error::Invalid {
            path: path.to_owned(),
            reason,
        };
        let reader = Reader::from_source(bytes).map_err(|e| invalid(e.to_string()))?;
        let db = Self {
            path: path.to_owned(),
            reader,
        };
        // Opening reads only the metadata; a truncated or damaged search tree shows up on
        // the first lookups. Probe a few addresses now so such a file fails at start-up (or
        // is refused by a reload) instead of failing listeners' requests later.
        let probes: [IpAddr; 4] = [
            Ipv4Addr::new(81, 2, 69, 142).into(),
            Ipv4Addr::new(8, 8, 8, 8).into(),
            Ipv4Addr::new(223, 255, 255, 1).into(),
            Ipv6Addr::new(0x2001, 0x218, 0, 0, 0, 0, 0, 1).into(),
        ];
        for ip in probes {
            if ip.is_ipv6() && db.reader.metadata().ip_version == 4 {
                continue;
            }
            db.location(ip).map_err(|e| invalid(e.to_string()))?;
        }
        Ok(db)
    }

    fn location(&self, ip: IpAddr) -> Result<Option<Location>, Error> {
        let err = |e: maxminddb::MaxMindDbError| Error::Lookup {
            addr: ip,
            reason: e.to_string(),
        };
        let found = self.reader.lookup(ip).map_err(err)?;
        Ok(found
            .decode::<Record<'_>>()
            .map_err(err)?
            .map(|r| r.location()))
    }
}

/// One loaded set of database files. Immutable; see [`SharedDb`] for reloading.
pub struct GeoDb {
    city: Option<Db>,
    ipv4: Option<Db>,
    ipv6: Option<Db>,
}

impl fmt::Debug for GeoDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = |d: &Option<Db>| d.as_ref().map(|d| d.path.clone());
        f.debug_struct("GeoDb")
            .field("city", &p(&self.city))
            .field("ipv4", &p(&self.ipv4))
            .field("ipv6", &p(&self.ipv6))
            .finish()
    }
}

impl GeoDb {
    /// Opens every file named in `paths`. A missing, unreadable or corrupt file is an error
    /// naming that file.
    pub fn open(paths: &MmdbPaths) -> Result<Self, Error> {
        let open = |p: &Option<PathBuf>| p.as_deref().map(Db::open).transpose();
        Ok(Self {
            city: open(&paths.city)?,
            ipv4: open(&paths.ipv4)?,
            ipv6: open(&paths.ipv6)?,
        })
    }

    /// A database that knows nothing: every client's location is unknown.
    pub fn empty() -> Self {
        Self {
            city: None,
            ipv4: None,
            ipv6: None,
        }
    }

    /// Where `ip` is. IPv4-mapped IPv6 addresses (dual-stack sockets) are looked up as IPv4.
    /// An address no database knows gives an unknown (default) [`Location`]; an error means
    /// a database holds data that does not decode.
    pub fn lookup(&self, ip: IpAddr) -> Result<Location, Error> {
        let ip = ip.to_canonical();
        let mut best = Location::default();
        let flat = if ip.is_ipv4() { &self.ipv4 } else { &self.ipv6 };
        for db in [&self.city, flat].into_iter().flatten() {
            if let Some(l) = db.location(ip)? {
                if l.coords.is_some() {
                    // Keep the continent from the City schema when the flat file answers.
                    return Ok(Location {
                        continent: l.continent.or(best.continent),
                        country: l.country.or(best.country),
                        ..l
                    });
                }
                best = Location {
                    coords: best.coords,
                    country: best.country.or(l.country),
                    continent: best.continent.or(l.continent),
                };
            }
        }
        Ok(best)
    }
}

/// Modification time and length of each configured file: a change of either means reload.
type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(paths: &MmdbPaths) -> Stamp {
    paths
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

/// The current [`GeoDb`], swapped atomically on reload. Cheap to share (`Arc<SharedDb>`).
pub struct SharedDb {
    paths: MmdbPaths,
    current: RwLock<Arc<GeoDb>>,
    /// The files' stamp as of the last load attempt, successful or not, so a file that stays
    /// broken is reported once rather than on every check.
    seen: Mutex<Stamp>,
}

impl fmt::Debug for SharedDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedDb")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

impl SharedDb {
    /// Opens the files; errors as [`GeoDb::open`]. No paths at all is allowed: every client
    /// is then of unknown location.
    pub fn open(paths: MmdbPaths) -> Result<Self, Error> {
        let seen = stamp(&paths);
        let db = GeoDb::open(&paths)?;
        Ok(Self {
            paths,
            current: RwLock::new(Arc::new(db)),
            seen: Mutex::new(seen),
        })
    }

    /// The configured files.
    pub fn paths(&self) -> &MmdbPaths {
        &self.paths
    }

    /// The database in use now. A reload does not affect a `GeoDb` already handed out.
    pub fn current(&self) -> Arc<GeoDb> {
        // A panic while holding the write lock can only happen between two plain moves;
        // the value inside is still whole, so a poisoned lock is used as is.
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Looks `ip` up in the current database.
    pub fn lookup(&self, ip: IpAddr) -> Result<Location, Error> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .lookup(ip)
    }

    /// Opens the files again and, if every one is valid, swaps them in. On error the
    /// previous database stays in use.
    pub fn reload(&self) -> Result<(), Error> {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = stamp(&self.paths);
        let fresh = Arc::new(GeoDb::open(&self.paths)?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// Reloads when any file's modification time or length changed since the last attempt.
    /// `Ok(true)` means a new database is in use. A file caught half-written fails to load;
    /// the next change (the writer finishing) triggers another attempt.
    pub fn reload_if_changed(&self) -> Result<bool, Error> {
        let now = stamp(&self.paths);
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if *seen == now {
                return Ok(false);
            }
            *seen = now;
        }
        let fresh = Arc::new(GeoDb::open(&self.paths)?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(true)
    }
}
