//! Tern's geo-routing core: where a client is (MaxMind DB files), and which relay, or the CDN,
//! should serve it.
//!
//! - [`lookup`]: client address → [`Location`], from a GeoIP2/GeoLite2 City database and/or
//!   the flat city databases of the ip-location-db packages (separate IPv4 and IPv6 files).
//!   [`SharedDb`] swaps a freshly loaded set of files in atomically, so a reload (SIGHUP, file
//!   change) never fails or blocks a lookup in flight.
//! - [`decide`]: the routing decision. A pure function of the client's location, the fleet's
//!   last known state and the policy: no I/O, no clock, no randomness, so a table of cases
//!   tests it completely and two routers given the same inputs answer the same.
//!
//! The shell that polls relays' `/health` and serves `/v1/route` lives in the relay crate
//! (`tern_relay::router`); this crate does not depend on tokio or on any socket.

pub mod decide;
pub mod lookup;

pub use decide::{decide, Decision, Policy, Reason, RelayState, RouteRequest, Tier};
pub use lookup::{GeoDb, Location, MmdbPaths, SharedDb};

/// The one error type of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A database file could not be read.
    #[error("reading GeoIP database {path}: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A database file is not a valid MaxMind DB, or not of a schema Tern understands.
    #[error("GeoIP database {path} is not usable: {reason}")]
    Invalid {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// A database answered a lookup with data that does not decode. Only that lookup fails.
    #[error("GeoIP lookup of {addr}: {reason}")]
    Lookup {
        /// The address looked up.
        addr: std::net::IpAddr,
        /// Why.
        reason: String,
    },
}
