//! Configuration: embedded defaults < TOML file < `TERN_*` environment < command-line flags.
//!
//! Every section rejects unknown keys, so a typo is an error at start-up instead of a silently
//! ignored setting. Environment keys use `__` between section and key:
//! `TERN_HTTP__LISTEN=0.0.0.0:8080`. docs/configuration.md lists every key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::Error;

/// Where the config file is read from when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tern/tern.toml";

/// The whole configuration of a `tern` process; each subcommand reads the sections it needs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The HTTP server (listener page, WHEP, HLS, health, metrics).
    pub http: HttpConfig,
    /// The origin: test-source broadcasts served over QUIC.
    pub origin: OriginConfig,
    /// Where relays and packagers pull broadcasts from.
    pub upstream: UpstreamConfig,
    /// The WebRTC fan-out.
    pub relay: RelayConfig,
    /// The HLS packager.
    pub packager: PackagerSection,
    /// Geo-routing of listeners to relays or the CDN (`tern router`, or any relay).
    pub router: RouterConfig,
    /// Logging; `level` can change live on SIGHUP.
    pub log: LogConfig,
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter: a level (`info`, `debug`) or directives (`info,tern_relay=debug`).
    /// `RUST_LOG`, when set, takes precedence.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
        }
    }
}

impl LogConfig {
    /// The filter directives to apply: `level`, with the chatty WebRTC and QUIC stacks kept at
    /// `warn` unless `level` names them itself.
    pub fn filter(&self) -> String {
        let mut f = String::new();
        for quiet in ["str0m", "quinn"] {
            if !self.level.contains(quiet) {
                f.push_str(quiet);
                f.push_str("=warn,");
            }
        }
        f.push_str(&self.level);
        f
    }
}

/// `[http]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the HTTP server.
    pub listen: SocketAddr,
    /// Folder holding the listener page's assets (hls.js under node_modules/).
    pub web_dir: PathBuf,
    /// Largest WHEP request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// A separate address for `/metrics` and `/admin/*`. When unset they are served on
    /// `listen`, and `/admin/*` answers only clients on loopback.
    pub admin_listen: Option<SocketAddr>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 8080).into(),
            web_dir: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../web")),
            max_body_bytes: 64 * 1024,
            admin_listen: None,
        }
    }
}

/// `[origin]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OriginConfig {
    /// UDP address of the QUIC server.
    pub listen: SocketAddr,
    /// PEM certificate chain; with `key`. Without both, a self-signed one is made at start.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// Where to write the (self-signed) certificate so relays can be told to trust it.
    pub cert_out: Option<PathBuf>,
    /// PEM CA (e.g. `ca.pem` from `tern certs`): when set, relays and packagers must present
    /// a certificate it issued (mutual TLS); any other peer is refused and logged.
    pub client_ca: Option<PathBuf>,
    /// Broadcast ids published from the built-in test source.
    pub test_broadcasts: Vec<String>,
    /// Channels of the test source (1 or 2).
    pub channels: u8,
    /// Opus bitrate of the test source, bits per second.
    pub bitrate: u32,
    /// RTP ingest endpoints opened at start: `[[origin.ingest]]` with `broadcast` and `listen`.
    pub ingest: Vec<IngestConfig>,
    /// Address that endpoints created through `POST /v1/ingest` bind to (port chosen then).
    pub ingest_api_bind: std::net::IpAddr,
}

/// `[[origin.ingest]]`: one broadcast fed by plain RTP/Opus (an SFU's plain transport).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// The broadcast id.
    pub broadcast: String,
    /// UDP address to receive RTP on.
    pub listen: SocketAddr,
}

impl Default for OriginConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 4443).into(),
            cert: None,
            key: None,
            cert_out: None,
            client_ca: None,
            test_broadcasts: vec!["demo".into()],
            channels: 2,
            bitrate: 64_000,
            ingest: Vec::new(),
            ingest_api_bind: [127, 0, 0, 1].into(),
        }
    }
}

/// `[upstream]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// UDP address of the origin (or upstream relay).
    pub addr: SocketAddr,
    /// Name the upstream's certificate must carry.
    pub server_name: String,
    /// PEM file of the certificate(s) or CA to trust for the upstream.
    pub ca: Option<PathBuf>,
    /// This node's PEM certificate, presented to an upstream that requires mutual TLS.
    pub cert: Option<PathBuf>,
    /// The private key of `cert`.
    pub key: Option<PathBuf>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            addr: ([127, 0, 0, 1], 4443).into(),
            server_name: "localhost".into(),
            ca: None,
            cert: None,
            key: None,
        }
    }
}

/// `[relay]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// The one UDP socket for every WebRTC listener. Port 0 picks a free port.
    pub webrtc_listen: SocketAddr,
    /// The address announced to listeners as the ICE candidate; required when
    /// `webrtc_listen` is a wildcard address (0.0.0.0 or ::), e.g. the host's public IP.
    pub announce: Option<SocketAddr>,
    /// Listeners this node accepts at once; more get 503.
    pub max_listeners: usize,
    /// Fan-out shards, each on its own core; 0 (the default) runs one per available core.
    pub fanout_threads: usize,
    /// New WHEP sessions allowed per client address (IPv6: per /64) per minute; more get 429.
    pub sessions_per_minute: u32,
    /// New sessions a client may open at once before the per-minute rate applies.
    pub session_burst: u32,
    /// On SIGTERM or `POST /admin/drain`, how long current listeners may stay before the
    /// process exits anyway.
    pub drain_timeout_seconds: u64,
    /// After the last listener of a broadcast leaves, the relay keeps its upstream
    /// subscription this long (a listener coming back meanwhile starts at once).
    pub unsubscribe_grace_seconds: u64,
    /// Who may listen.
    pub auth: AuthConfig,
    /// Serving the origin link to other relays and packagers (a cascade); off by default.
    pub link: LinkServerConfig,
}

/// `[relay.link]`: this relay as an upstream for other relays and packagers.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LinkServerConfig {
    /// UDP address of the QUIC server; unset (the default) serves no link.
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain downstream nodes verify (their `upstream.ca` trusts its CA).
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// PEM CA: when set, downstream nodes must present a certificate it issued.
    pub client_ca: Option<PathBuf>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            webrtc_listen: ([127, 0, 0, 1], 0).into(),
            announce: None,
            max_listeners: 1000,
            fanout_threads: 0,
            sessions_per_minute: 60,
            session_burst: 20,
            drain_timeout_seconds: 60,
            unsubscribe_grace_seconds: 30,
            auth: AuthConfig::default(),
            link: LinkServerConfig::default(),
        }
    }
}

/// How listeners authenticate.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// No token needed.
    #[default]
    Open,
    /// A JWT bearer token naming the broadcast (claim `broadcast`, or `"*"`) is required.
    Jwt,
}

/// `[relay.auth]`
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `open` or `jwt`.
    pub mode: AuthMode,
    /// HS256 shared secret (jwt mode; give this or `public_key`).
    pub hs256_secret: Option<String>,
    /// PEM public key for ES256 or EdDSA tokens (jwt mode).
    pub public_key: Option<PathBuf>,
    /// During a key rotation: the previous HS256 secret, still accepted beside the current key.
    pub previous_hs256_secret: Option<String>,
    /// During a key rotation: the previous PEM public key, still accepted.
    pub previous_public_key: Option<PathBuf>,
}

/// One rung of the AAC ladder.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RenditionConfig {
    /// Folder and playlist name, e.g. "64k".
    pub name: String,
    /// AAC bitrate in bits per second.
    pub bitrate: u32,
}

/// `[packager]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PackagerSection {
    /// Broadcasts to package.
    pub broadcasts: Vec<String>,
    /// Output folder; each broadcast gets a sub-folder. `tern demo` uses a fresh temporary
    /// folder when this is not set.
    pub out_dir: Option<PathBuf>,
    /// The AAC ladder.
    pub renditions: Vec<RenditionConfig>,
    /// Output channels (1 or 2).
    pub channels: u16,
    /// Target segment duration in seconds.
    pub segment_seconds: f64,
    /// Segments in the live playlist.
    pub window: usize,
    /// Keep every segment and leave a VOD playlist of the whole broadcast (EVENT while live,
    /// VOD + ENDLIST at the end) instead of a sliding window.
    pub record: bool,
    /// FFmpeg AAC coder: "twoloop" (FFmpeg's default, best quality) or "fast" (about twice
    /// the broadcasts per core; see docs/benchmarks.md).
    pub aac_coder: String,
    /// Push the HLS to S3 (or an S3-compatible store) for a CDN. With `out_dir` too, both get
    /// every object.
    pub s3: Option<S3Section>,
}

/// `[packager.s3]`: where the HLS goes for the CDN. Credentials come from the standard AWS
/// chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, web identity, ECS, IMDS).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct S3Section {
    /// AWS region of the bucket.
    pub region: String,
    /// Endpoint URL of an S3-compatible store (e.g. http://127.0.0.1:9000); unset for AWS.
    pub endpoint: Option<String>,
    /// Bucket name (required).
    pub bucket: String,
    /// Key prefix: objects go to `{prefix}/{broadcast}/...`.
    pub prefix: String,
    /// Path-style addressing (needed by most local S3-compatible servers).
    pub path_style: bool,
    /// Cache-Control of segments and init segments (never change once written).
    pub cache_control_segments: String,
    /// Cache-Control of live media playlists (about half a segment duration or less).
    pub cache_control_playlists: String,
    /// Cache-Control of the master playlist and of ended playlists.
    pub cache_control_master: String,
    /// Folder of the on-disk upload queue; each broadcast gets a sub-folder. Uploads left by a
    /// crash are resumed from here at the next start.
    pub spool_dir: PathBuf,
    /// Largest size of the queue per broadcast, in bytes (default 1 GiB ≈ 11 h of 64 + 128
    /// kbps): an S3 outage shorter than that loses nothing.
    pub spool_max_bytes: u64,
    /// Longest wait for one S3 request before it is retried, in seconds.
    pub request_timeout_seconds: f64,
    /// S3 requests in flight at once per broadcast (segments of different renditions go in
    /// parallel; ordering guarantees hold at any value).
    pub upload_concurrency: usize,
}

impl Default for S3Section {
    /// The packager crate's defaults, plus the spool, which only the service has.
    fn default() -> Self {
        let d = tern_packager::s3::S3Settings::default();
        Self {
            region: d.region,
            endpoint: d.endpoint,
            bucket: d.bucket,
            prefix: d.prefix,
            path_style: d.path_style,
            cache_control_segments: d.segment_cache_control,
            cache_control_playlists: d.playlist_cache_control,
            cache_control_master: d.master_cache_control,
            spool_dir: PathBuf::from("/var/lib/tern/spool"),
            spool_max_bytes: 1 << 30,
            request_timeout_seconds: d.attempt_timeout.as_secs_f64(),
            upload_concurrency: d.upload_concurrency,
        }
    }
}

impl S3Section {
    /// The packager crate's view of this section.
    pub fn settings(&self) -> tern_packager::s3::S3Settings {
        tern_packager::s3::S3Settings {
            region: self.region.clone(),
            endpoint: self.endpoint.clone(),
            bucket: self.bucket.clone(),
            prefix: self.prefix.clone(),
            path_style: self.path_style,
            segment_cache_control: self.cache_control_segments.clone(),
            playlist_cache_control: self.cache_control_playlists.clone(),
            master_cache_control: self.cache_control_master.clone(),
            attempt_timeout: Duration::from_secs_f64(self.request_timeout_seconds),
            upload_concurrency: self.upload_concurrency,
            ..tern_packager::s3::S3Settings::default()
        }
    }
}

impl Default for PackagerSection {
    fn default() -> Self {
        Self {
            broadcasts: vec!["demo".into()],
            out_dir: None,
            renditions: vec![
                RenditionConfig {
                    name: "64k".into(),
                    bitrate: 64_000,
                },
                RenditionConfig {
                    name: "128k".into(),
                    bitrate: 128_000,
                },
            ],
            channels: 2,
            segment_seconds: 2.0,
            window: 3,
            record: false,
            aac_coder: "twoloop".into(),
            s3: None,
        }
    }
}

impl PackagerSection {
    /// The target segment duration.
    pub fn segment_duration(&self) -> Duration {
        Duration::from_secs_f64(self.segment_seconds)
    }
}

/// One relay of the fleet the router sends listeners to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FleetRelay {
    /// Unique id, e.g. "eu-1".
    pub id: String,
    /// Region name, e.g. "eu".
    pub region: String,
    /// Public base URL listeners reach, e.g. `https://relay-1.eu.example.net`.
    pub url: String,
    /// Where the relay is, degrees.
    pub latitude: f64,
    /// Where the relay is, degrees.
    pub longitude: f64,
    /// Listeners it takes (its own `relay.max_listeners` also applies, whichever is lower).
    pub capacity: usize,
    /// Where the router polls its health, plain `http://` (e.g. over the private network).
    /// Default: `{url}/health`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_url: Option<String>,
}

impl FleetRelay {
    /// The URL the router polls.
    pub fn health_url(&self) -> String {
        match &self.health_url {
            Some(u) => u.clone(),
            None => format!("{}/health", self.url.trim_end_matches('/')),
        }
    }
}

/// `[router]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    /// The relays to route to. Empty: no router in `tern relay`; `tern router` needs one.
    pub fleet: Vec<FleetRelay>,
    /// Region for clients of unknown location; must be some relay's region.
    pub default_region: String,
    /// Continent code (EU, NA, AS, ...) → region, for clients with a continent but no
    /// coordinates in the database.
    pub continent_regions: std::collections::BTreeMap<String, String>,
    /// Below this many WebRTC listeners of a broadcast, new listeners join relays already
    /// carrying it rather than activating more relays.
    pub relay_activation_threshold: usize,
    /// At this many WebRTC listeners of a broadcast, new listeners go to HLS. 0: never.
    pub cdn_switch_threshold: usize,
    /// Fraction of a relay's capacity above which it takes no new listeners.
    pub load_threshold: f64,
    /// HLS URL for listeners sent to the CDN; `{broadcast}` is replaced.
    pub cdn_hls_url: String,
    /// How often each relay's `/health` is polled, milliseconds.
    pub poll_interval_ms: u64,
    /// Peers whose `X-Forwarded-For` is believed: IP addresses or CIDR blocks.
    pub trusted_proxies: Vec<String>,
    /// GeoIP databases. None: every client is of unknown location (default region).
    pub mmdb: tern_geoip::MmdbPaths,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            fleet: Vec::new(),
            default_region: String::new(),
            continent_regions: Default::default(),
            relay_activation_threshold: 200,
            cdn_switch_threshold: 100,
            load_threshold: 0.9,
            cdn_hls_url: "/hls/{broadcast}/master.m3u8".into(),
            poll_interval_ms: 2000,
            trusted_proxies: Vec::new(),
            mmdb: Default::default(),
        }
    }
}

impl RouterConfig {
    /// The poll interval.
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }
}

/// Flags that override the file and the environment. Only flags actually given apply, so a
/// flag never clobbers a file value with a default.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overrides {
    /// `--http ADDR`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<SocketAddr>,
}

/// Loads the configuration. `path` is the `--config` flag: an explicit path must exist; the
/// default path is read only if it exists.
pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, Error> {
    let mut fig = Figment::from(Serialized::defaults(Config::default()));
    match path {
        Some(p) => {
            if !p.exists() {
                return Err(Error::Config(Box::new(figment::Error::from(format!(
                    "config file {} does not exist",
                    p.display()
                )))));
            }
            fig = fig.merge(Toml::file(p));
        }
        None => fig = fig.merge(Toml::file(DEFAULT_CONFIG_PATH)),
    }
    // Only `TERN_<SECTION>__<KEY>` variables are configuration: every top-level key is a
    // section, and other `TERN_*` variables (scripts' own, like TERN_BIN) are not ours to
    // reject. Unknown keys inside a section are still errors.
    fig = fig.merge(
        Env::prefixed("TERN_")
            .filter(|k| k.as_str().contains("__"))
            .split("__"),
    );
    if let Some(h) = overrides.http_listen {
        fig = fig.merge(Serialized::default("http.listen", h));
    }
    let config: Config = fig
        .extract()
        .map_err(|e| Error::Config(Box::new(all_errors(e))))?;
    validate(&config).map_err(|(key, msg)| Error::Config(Box::new(invalid(&fig, key, msg))))?;
    Ok(config)
}

/// figment may collect several errors but displays only the first: join them all, each with
/// its key and the file (or environment) it came from.
fn all_errors(e: figment::Error) -> figment::Error {
    if e.count() <= 1 {
        return e;
    }
    let all: Vec<String> = e.into_iter().map(|e| e.to_string()).collect();
    figment::Error::from(all.join("; "))
}

/// An error about `key` (dotted), naming where its value came from, like figment's own.
fn invalid(fig: &Figment, key: &str, msg: String) -> figment::Error {
    let metadata = fig.find_metadata(key).cloned();
    // figment names the key only when it knows where the value came from; a value left at
    // its default (e.g. a required key that is missing) gets the key in the message instead.
    let msg = if metadata.is_some() {
        msg
    } else {
        format!("{key}: {msg}")
    };
    let mut e = figment::Error::from(msg);
    e.path = key.split('.').map(String::from).collect();
    e.metadata = metadata;
    e.profile = Some(figment::Profile::Default);
    e
}

/// Checks what types alone cannot; an error is `(dotted key, message)`.
fn validate(c: &Config) -> Result<(), (&'static str, String)> {
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(c.log.filter()) {
        return Err(("log.level", format!("not a log filter: {e}")));
    }
    for (key, list) in [
        ("origin.test_broadcasts", &c.origin.test_broadcasts),
        ("packager.broadcasts", &c.packager.broadcasts),
    ] {
        for b in list {
            b.parse::<tern_origin_link::BroadcastId>()
                .map_err(|e| (key, e.to_string()))?;
        }
    }
    for i in &c.origin.ingest {
        i.broadcast
            .parse::<tern_origin_link::BroadcastId>()
            .map_err(|e| ("origin.ingest", e.to_string()))?;
    }
    if !(1..=2).contains(&c.origin.channels) {
        return Err(("origin.channels", "must be 1 or 2".into()));
    }
    if !(1..=2).contains(&c.packager.channels) {
        return Err(("packager.channels", "must be 1 or 2".into()));
    }
    if !(0.5..=10.0).contains(&c.packager.segment_seconds) {
        return Err((
            "packager.segment_seconds",
            "must be between 0.5 and 10".into(),
        ));
    }
    if c.packager.window == 0 {
        return Err(("packager.window", "must be at least 1".into()));
    }
    if c.packager.renditions.is_empty() {
        return Err((
            "packager.renditions",
            "must name at least one rendition".into(),
        ));
    }
    for r in &c.packager.renditions {
        let ok = !r.name.is_empty()
            && r.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok {
            return Err((
                "packager.renditions",
                format!("rendition name {:?}: use A-Z a-z 0-9 _ -", r.name),
            ));
        }
        if !(16_000..=512_000).contains(&r.bitrate) {
            return Err((
                "packager.renditions",
                format!("rendition {}: bitrate must be 16000..=512000", r.name),
            ));
        }
        // FFmpeg's AAC-LC encoder caps at 288 kbps per channel at 48 kHz (6144 bits per
        // 1024-sample frame): a mono rung above that would silently come out smaller.
        let per_channel = r.bitrate / u32::from(c.packager.channels.max(1));
        if per_channel > tern_packager::MAX_BITRATE_PER_CHANNEL {
            return Err((
                "packager.renditions",
                format!(
                    "rendition {}: {} bits/s is more than AAC-LC carries for {} channel(s) \
                     ({} per channel)",
                    r.name,
                    r.bitrate,
                    c.packager.channels,
                    tern_packager::MAX_BITRATE_PER_CHANNEL
                ),
            ));
        }
    }
    if !["twoloop", "fast"].contains(&c.packager.aac_coder.as_str()) {
        return Err((
            "packager.aac_coder",
            "must be \"twoloop\" or \"fast\"".into(),
        ));
    }
    if let Some(s3) = &c.packager.s3 {
        if s3.bucket.is_empty() {
            return Err(("packager.s3.bucket", "must be set".into()));
        }
        if !(s3.request_timeout_seconds > 0.0 && s3.request_timeout_seconds <= 300.0) {
            return Err((
                "packager.s3.request_timeout_seconds",
                "must be in (0, 300]".into(),
            ));
        }
        if s3.spool_max_bytes < 1 << 20 {
            return Err((
                "packager.s3.spool_max_bytes",
                "must be at least 1 MiB".into(),
            ));
        }
        if !(1..=64).contains(&s3.upload_concurrency) {
            return Err(("packager.s3.upload_concurrency", "must be 1 to 64".into()));
        }
    }
    if c.relay.auth.mode == AuthMode::Jwt
        && c.relay.auth.hs256_secret.is_none() == c.relay.auth.public_key.is_none()
    {
        return Err((
            "relay.auth.mode",
            "\"jwt\" needs exactly one of relay.auth.hs256_secret or relay.auth.public_key".into(),
        ));
    }
    for (key, secret) in [
        ("relay.auth.hs256_secret", &c.relay.auth.hs256_secret),
        (
            "relay.auth.previous_hs256_secret",
            &c.relay.auth.previous_hs256_secret,
        ),
    ] {
        if secret.as_ref().is_some_and(|s| s.len() < 16) {
            return Err((key, "must be at least 16 characters".into()));
        }
    }
    if c.relay.auth.previous_hs256_secret.is_some() && c.relay.auth.previous_public_key.is_some() {
        return Err((
            "relay.auth.previous_hs256_secret",
            "give at most one previous key (this or relay.auth.previous_public_key)".into(),
        ));
    }
    if c.relay.max_listeners == 0 {
        return Err(("relay.max_listeners", "must be at least 1".into()));
    }
    if c.relay.fanout_threads > 64 {
        return Err(("relay.fanout_threads", "must be at most 64".into()));
    }
    let link = &c.relay.link;
    if link.listen.is_some() && (link.cert.is_none() || link.key.is_none()) {
        return Err((
            "relay.link.listen",
            "serving the link needs relay.link.cert and relay.link.key (tern certs makes them)"
                .into(),
        ));
    }
    if link.listen.is_some() && link.listen == Some(c.upstream.addr) {
        return Err((
            "relay.link.listen",
            "is this relay's own upstream.addr: it would subscribe to itself".into(),
        ));
    }
    validate_router(&c.router).map_err(|m| ("router", m))
}

fn validate_router(r: &RouterConfig) -> Result<(), String> {
    let mut ids = std::collections::BTreeSet::new();
    for f in &r.fleet {
        if !ids.insert(f.id.as_str()) {
            return Err(format!("router.fleet: relay id {:?} appears twice", f.id));
        }
        if !(f.url.starts_with("http://") || f.url.starts_with("https://")) {
            return Err(format!(
                "router.fleet {}: url must start with http:// or https://",
                f.id
            ));
        }
        let health = f.health_url();
        if !health.starts_with("http://") || health.parse::<hyper::Uri>().is_err() {
            return Err(format!(
                "router.fleet {}: health is polled over plain http; set health_url (got {health:?})",
                f.id
            ));
        }
        if tern_geoip::lookup::Coords::new(f.latitude, f.longitude).is_none() {
            return Err(format!(
                "router.fleet {}: latitude/longitude out of range",
                f.id
            ));
        }
        if f.capacity == 0 {
            return Err(format!(
                "router.fleet {}: capacity must be at least 1",
                f.id
            ));
        }
    }
    if !r.fleet.is_empty() && !r.fleet.iter().any(|f| f.region == r.default_region) {
        return Err(format!(
            "router.default_region {:?} is not the region of any relay in router.fleet",
            r.default_region
        ));
    }
    if !(r.load_threshold > 0.0 && r.load_threshold <= 1.0) {
        return Err("router.load_threshold must be in (0, 1]".into());
    }
    if !r.cdn_hls_url.contains("{broadcast}") {
        return Err("router.cdn_hls_url must contain {broadcast}".into());
    }
    if r.poll_interval_ms < 100 {
        return Err("router.poll_interval_ms must be at least 100".into());
    }
    for p in &r.trusted_proxies {
        p.parse::<crate::router::Cidr>()
            .map_err(|e| format!("router.trusted_proxies: {e}"))?;
    }
    Ok(())
}

/// Parts of key names whose values are never printed: any key containing one of these
/// (case-insensitive), e.g. `hs256_secret`, `secret_access_key`, `password`, `token_keys`.
pub const SECRET_MARKERS: &[&str] = &["secret", "password", "token", "private_key"];

/// What a secret value is shown as.
pub const MASK: &str = "********";

/// True if values under this key name must not be printed.
pub fn is_secret_key(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_MARKERS.iter().any(|m| name.contains(m))
}

/// Any serializable value as a TOML table, with the value of every secret-named key (at any
/// depth, also inside arrays of tables) replaced by [`MASK`]. Unset options are left out.
pub fn masked<T: Serialize>(value: &T) -> Result<toml::Table, Error> {
    let mut v = toml::Value::try_from(value)
        .map_err(|e| Error::Config(Box::new(figment::Error::from(e.to_string()))))?;
    mask(&mut v);
    match v {
        toml::Value::Table(t) => Ok(t),
        other => Err(Error::Config(Box::new(figment::Error::from(format!(
            "expected a table, got {}",
            other.type_str()
        ))))),
    }
}

fn mask(v: &mut toml::Value) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                if is_secret_key(k) {
                    *v = toml::Value::String(MASK.into());
                } else {
                    mask(v);
                }
            }
        }
        toml::Value::Array(a) => a.iter_mut().for_each(mask),
        _ => {}
    }
}

impl Config {
    /// The effective configuration as TOML that `load` accepts back, secrets masked.
    pub fn to_masked_toml(&self) -> Result<String, Error> {
        toml::to_string_pretty(&masked(self)?)
            .map_err(|e| Error::Config(Box::new(figment::Error::from(e.to_string()))))
    }

    /// Dotted keys whose values differ between `self` and `new` (arrays compare whole, so a
    /// changed rendition reports `packager.renditions`). Secret values are compared too but
    /// only their key is ever reported.
    pub fn changed_keys(&self, new: &Self) -> Vec<String> {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        if let (Ok(x), Ok(y)) = (toml::Value::try_from(self), toml::Value::try_from(new)) {
            flatten("", &x, &mut a);
            flatten("", &y, &mut b);
        }
        let mut keys: Vec<String> = a
            .iter()
            .filter(|(k, v)| !b.iter().any(|(k2, v2)| k2 == k && v2 == v))
            .chain(b.iter().filter(|(k, _)| !a.iter().any(|(k2, _)| k2 == k)))
            .map(|(k, _)| k.clone())
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }
}

fn flatten(prefix: &str, v: &toml::Value, out: &mut Vec<(String, toml::Value)>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => out.push((prefix.to_string(), other.clone())),
    }
}

#[cfg(test)]
// figment's Jail closures return its (large) error type; fine in tests.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn file_env_and_flags_layer_in_order() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "t.toml",
                "[http]\nlisten = \"127.0.0.1:9000\"\n[relay]\nmax_listeners = 5\n",
            )?;
            jail.set_env("TERN_RELAY__MAX_LISTENERS", "7");
            jail.set_env("TERN_BIN", "/not/config");
            let c = load(Some(Path::new("t.toml")), &Overrides::default()).unwrap();
            assert_eq!(c.http.listen, "127.0.0.1:9000".parse().unwrap());
            assert_eq!(c.relay.max_listeners, 7, "env beats file");
            let c = load(
                Some(Path::new("t.toml")),
                &Overrides {
                    http_listen: Some("127.0.0.1:9100".parse().unwrap()),
                },
            )
            .unwrap();
            assert_eq!(
                c.http.listen,
                "127.0.0.1:9100".parse().unwrap(),
                "flag beats file"
            );
            Ok(())
        });
    }

    #[test]
    fn absent_flag_does_not_clobber_the_file() {
        Jail::expect_with(|jail| {
            jail.create_file("t.toml", "[http]\nlisten = \"127.0.0.1:9000\"\n")?;
            let c = load(Some(Path::new("t.toml")), &Overrides::default()).unwrap();
            assert_eq!(c.http.listen, "127.0.0.1:9000".parse().unwrap());
            Ok(())
        });
    }

    #[test]
    fn s3_section_from_file_and_env() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "s.toml",
                "[packager]\nrecord = true\n[packager.s3]\nbucket = \"hls\"\npath_style = true\n",
            )?;
            jail.set_env("TERN_PACKAGER__S3__ENDPOINT", "http://127.0.0.1:9000");
            let c = load(Some(Path::new("s.toml")), &Overrides::default()).unwrap();
            assert!(c.packager.record);
            let s3 = c.packager.s3.unwrap();
            assert_eq!(s3.bucket, "hls");
            assert!(s3.path_style);
            assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
            assert_eq!(s3.cache_control_segments, "max-age=31536000, immutable");
            assert_eq!(s3.cache_control_playlists, "max-age=1");
            assert_eq!(s3.upload_concurrency, 4);
            assert_eq!(s3.settings().upload_concurrency, 4);
            jail.create_file(
                "u.toml",
                "[packager.s3]\nbucket = \"hls\"\nupload_concurrency = 0\n",
            )?;
            let e = load(Some(Path::new("u.toml")), &Overrides::default()).unwrap_err();
            assert!(e.to_string().contains("upload_concurrency"), "{e}");
            jail.set_env("TERN_PACKAGER__S3__UPLOAD_CONCURRENCY", "8");
            let c = load(Some(Path::new("s.toml")), &Overrides::default()).unwrap();
            assert_eq!(c.packager.s3.unwrap().settings().upload_concurrency, 8);
            // Environment alone creates the section too.
            jail.set_env("TERN_PACKAGER__S3__BUCKET", "b2");
            let c = load(None, &Overrides::default()).unwrap();
            assert_eq!(c.packager.s3.unwrap().bucket, "b2");
            jail.create_file("n.toml", "[packager.s3]\nregion = \"eu-west-1\"\n")?;
            jail.clear_env();
            let e = load(Some(Path::new("n.toml")), &Overrides::default()).unwrap_err();
            assert!(e.to_string().contains("bucket"), "{e}");
            jail.create_file(
                "m.toml",
                "[packager]\nchannels = 1\n[[packager.renditions]]\nname = \"hi\"\nbitrate = 320000\n",
            )?;
            let e = load(Some(Path::new("m.toml")), &Overrides::default()).unwrap_err();
            assert!(e.to_string().contains("per channel"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn link_server_needs_its_identity_and_not_itself_upstream() {
        Jail::expect_with(|jail| {
            jail.create_file("l.toml", "[relay.link]\nlisten = \"127.0.0.1:4500\"\n")?;
            let e = load(Some(Path::new("l.toml")), &Overrides::default()).unwrap_err();
            assert!(e.to_string().contains("relay.link.cert"), "{e}");
            jail.create_file(
                "s.toml",
                "[upstream]\naddr = \"127.0.0.1:4500\"\n[relay.link]\nlisten = \"127.0.0.1:4500\"\n\
                 cert = \"n.pem\"\nkey = \"n-key.pem\"\n",
            )?;
            let e = load(Some(Path::new("s.toml")), &Overrides::default()).unwrap_err();
            assert!(e.to_string().contains("subscribe to itself"), "{e}");
            jail.create_file(
                "ok.toml",
                "[upstream]\naddr = \"127.0.0.1:4443\"\n[relay.link]\nlisten = \"127.0.0.1:4500\"\n\
                 cert = \"n.pem\"\nkey = \"n-key.pem\"\nclient_ca = \"ca.pem\"\n",
            )?;
            let c = load(Some(Path::new("ok.toml")), &Overrides::default()).unwrap();
            assert_eq!(c.relay.link.listen, Some("127.0.0.1:4500".parse().unwrap()));
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        Jail::expect_with(|jail| {
            jail.create_file("a.toml", "[http]\nlisten_on = \"127.0.0.1:9000\"\n")?;
            let e = load(Some(Path::new("a.toml")), &Overrides::default()).unwrap_err();
            assert!(e.to_string().contains("listen_on"), "{e}");
            jail.create_file("b.toml", "[packager]\nbroadcasts = [\"../etc\"]\n")?;
            assert!(load(Some(Path::new("b.toml")), &Overrides::default()).is_err());
            jail.create_file("c.toml", "[relay]\nmax_listeners = \"many\"\n")?;
            assert!(load(Some(Path::new("c.toml")), &Overrides::default()).is_err());
            assert!(load(Some(Path::new("missing.toml")), &Overrides::default()).is_err());
            jail.set_env("TERN_RELAY__MAX_LISTENRS", "7");
            let e = load(None, &Overrides::default()).unwrap_err();
            assert!(e.to_string().contains("max_listenrs"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn errors_name_the_key_and_the_file() {
        Jail::expect_with(|jail| {
            jail.create_file("w.toml", "[packager]\nwindow = 0\n")?;
            let e = load(Some(Path::new("w.toml")), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("packager.window") && e.contains("w.toml"), "{e}");
            jail.create_file("t.toml", "[relay]\nmax_listeners = \"many\"\n")?;
            let e = load(Some(Path::new("t.toml")), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("relay.max_listeners") && e.contains("t.toml"),
                "{e}"
            );
            jail.create_file("l.toml", "[log]\nlevel = \"info,=][\"\n")?;
            let e = load(Some(Path::new("l.toml")), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("log.level") && e.contains("l.toml"), "{e}");
            jail.set_env("TERN_RELAY__MAX_LISTENERS", "0");
            // figment names environment keys as written: RELAY.MAX_LISTENERS.
            let e = load(None, &Overrides::default()).unwrap_err().to_string();
            assert!(
                e.to_lowercase().contains("relay.max_listeners") && e.contains("TERN_"),
                "{e}"
            );
            Ok(())
        });
    }

    #[test]
    fn secrets_are_masked_at_any_depth() {
        let v = serde_json::json!({
            "relay": {
                "max_listeners": 5,
                "auth": { "hs256_secret": "s3cr3t", "issuer": "tern" },
            },
            "packager": { "s3": { "secret_access_key": "AKIA/xyz", "access_key_id": "AKIA" } },
            "db": { "Password": "hunter2", "token_keys": [{ "id": "k1" }] },
            "tls": { "private_key": "-----BEGIN", "key": "/etc/tern/key.pem" },
            "fleet": [{ "id": "r1", "api_token": "t" }],
        });
        let t = masked(&v).unwrap();
        let text = toml::to_string(&t).unwrap();
        for secret in ["s3cr3t", "AKIA/xyz", "hunter2", "k1", "-----BEGIN", "\"t\""] {
            assert!(!text.contains(secret), "{secret} leaked:\n{text}");
        }
        for kept in [
            "tern",
            "/etc/tern/key.pem",
            "\"AKIA\"",
            "r1",
            "max_listeners = 5",
        ] {
            assert!(text.contains(kept), "{kept} missing:\n{text}");
        }
        assert_eq!(t["relay"]["auth"]["hs256_secret"].as_str(), Some(MASK));
        assert_eq!(t["fleet"][0]["api_token"].as_str(), Some(MASK));
    }

    #[test]
    fn printed_config_loads_back_unchanged() {
        Jail::expect_with(|jail| {
            let mut c = Config::default();
            c.relay.announce = Some("203.0.113.9:3478".parse().unwrap());
            c.log.level = "debug".into();
            let text = c.to_masked_toml().unwrap();
            jail.create_file("p.toml", &text)?;
            let back = load(Some(Path::new("p.toml")), &Overrides::default()).unwrap();
            assert_eq!(back, c, "{text}");
            Ok(())
        });
    }

    #[test]
    fn changed_keys_lists_what_differs() {
        let a = Config::default();
        let mut b = a.clone();
        assert!(a.changed_keys(&b).is_empty());
        b.log.level = "debug".into();
        b.relay.max_listeners = 9;
        b.relay.announce = Some("203.0.113.9:3478".parse().unwrap());
        b.packager.renditions.pop();
        assert_eq!(
            a.changed_keys(&b),
            [
                "log.level",
                "packager.renditions",
                "relay.announce",
                "relay.max_listeners"
            ]
        );
    }

    #[test]
    fn log_filter_keeps_the_stacks_quiet_unless_named() {
        let mut l = LogConfig::default();
        assert_eq!(l.filter(), "str0m=warn,quinn=warn,info");
        l.level = "debug,str0m=debug".into();
        assert_eq!(l.filter(), "quinn=warn,debug,str0m=debug");
    }

    #[test]
    fn router_section() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "r.toml",
                r#"
[router]
default_region = "eu"
poll_interval_ms = 500
trusted_proxies = ["127.0.0.1", "10.0.0.0/8", "::1"]
cdn_hls_url = "https://cdn.example.net/hls/{broadcast}/master.m3u8"
mmdb = { city = "/var/lib/tern/GeoLite2-City.mmdb" }
fleet = [
  { id = "eu-1", region = "eu", url = "https://relay-1.eu.example.net", latitude = 50.1, longitude = 8.7, capacity = 1000, health_url = "http://10.0.1.5:8080/health" },
  { id = "us-1", region = "us", url = "http://192.0.2.10:8080", latitude = 39.0, longitude = -77.5, capacity = 500 },
]
"#,
            )?;
            let c = load(Some(Path::new("r.toml")), &Overrides::default()).unwrap();
            let r = &c.router;
            assert_eq!(r.fleet.len(), 2);
            assert_eq!(r.fleet[0].health_url(), "http://10.0.1.5:8080/health");
            assert_eq!(r.fleet[1].health_url(), "http://192.0.2.10:8080/health");
            assert_eq!(r.relay_activation_threshold, 200, "runbook default");
            assert_eq!(r.cdn_switch_threshold, 100, "runbook default");
            assert_eq!(r.poll_interval(), Duration::from_millis(500));
            assert!(r.mmdb.ipv4.is_none());

            jail.set_env("TERN_ROUTER__LOAD_THRESHOLD", "0.75");
            let c = load(Some(Path::new("r.toml")), &Overrides::default()).unwrap();
            assert_eq!(c.router.load_threshold, 0.75);

            // An https relay with no plain-http health URL cannot be polled.
            jail.create_file("h.toml", "[router]\ndefault_region = \"ap\"\nfleet = [{ id = \"ap-1\", region = \"ap\", url = \"https://x\", latitude = 1.0, longitude = 1.0, capacity = 1 }]\n")?;
            let e = load(Some(Path::new("h.toml")), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("health_url"), "{e}");
            jail.create_file("u.toml", "[router]\nfleets = []\n")?;
            let e = load(Some(Path::new("u.toml")), &Overrides::default()).unwrap_err();
            assert!(e.to_string().contains("fleets"), "{e}");
            jail.create_file("p.toml", "[router]\ntrusted_proxies = [\"10.0.0.0/33\"]\n")?;
            assert!(load(Some(Path::new("p.toml")), &Overrides::default()).is_err());
            jail.create_file("d.toml", "[router]\ndefault_region = \"mars\"\nfleet = [{ id = \"a\", region = \"eu\", url = \"http://a\", latitude = 0.0, longitude = 0.0, capacity = 1 }]\n")?;
            let e = load(Some(Path::new("d.toml")), &Overrides::default()).unwrap_err();
            assert!(e.to_string().contains("default_region"), "{e}");
            Ok(())
        });
    }
}
