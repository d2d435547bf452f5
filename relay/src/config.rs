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
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 8080).into(),
            web_dir: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../web")),
            max_body_bytes: 64 * 1024,
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
    /// Broadcast ids published from the built-in test source.
    pub test_broadcasts: Vec<String>,
    /// Channels of the test source (1 or 2).
    pub channels: u8,
    /// Opus bitrate of the test source, bits per second.
    pub bitrate: u32,
}

impl Default for OriginConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 4443).into(),
            cert: None,
            key: None,
            cert_out: None,
            test_broadcasts: vec!["demo".into()],
            channels: 2,
            bitrate: 64_000,
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
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            addr: ([127, 0, 0, 1], 4443).into(),
            server_name: "localhost".into(),
            ca: None,
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
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            webrtc_listen: ([127, 0, 0, 1], 0).into(),
            announce: None,
            max_listeners: 1000,
        }
    }
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
}

impl Default for S3Section {
    fn default() -> Self {
        Self {
            region: "us-east-1".into(),
            endpoint: None,
            bucket: String::new(),
            prefix: String::new(),
            path_style: false,
            cache_control_segments: "max-age=31536000, immutable".into(),
            cache_control_playlists: "max-age=1".into(),
            cache_control_master: "max-age=60".into(),
            spool_dir: PathBuf::from("/var/lib/tern/spool"),
            spool_max_bytes: 1 << 30,
            request_timeout_seconds: 10.0,
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
    let config: Config = fig.extract().map_err(|e| Error::Config(Box::new(e)))?;
    validate(&config).map_err(|e| Error::Config(Box::new(figment::Error::from(e))))?;
    Ok(config)
}

fn validate(c: &Config) -> Result<(), String> {
    for b in c
        .origin
        .test_broadcasts
        .iter()
        .chain(&c.packager.broadcasts)
    {
        b.parse::<tern_origin_link::BroadcastId>()
            .map_err(|e| e.to_string())?;
    }
    if !(1..=2).contains(&c.origin.channels) || !(1..=2).contains(&c.packager.channels) {
        return Err("channels must be 1 or 2".into());
    }
    if !(0.5..=10.0).contains(&c.packager.segment_seconds) {
        return Err("packager.segment_seconds must be between 0.5 and 10".into());
    }
    if c.packager.window == 0 {
        return Err("packager.window must be at least 1".into());
    }
    if c.packager.renditions.is_empty() {
        return Err("packager.renditions must name at least one rendition".into());
    }
    for r in &c.packager.renditions {
        let ok = !r.name.is_empty()
            && r.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok {
            return Err(format!("rendition name {:?}: use A-Z a-z 0-9 _ -", r.name));
        }
        if !(16_000..=512_000).contains(&r.bitrate) {
            return Err(format!(
                "rendition {}: bitrate must be 16000..=512000",
                r.name
            ));
        }
        // FFmpeg's AAC-LC encoder caps at 288 kbps per channel at 48 kHz (6144 bits per
        // 1024-sample frame): a mono rung above that would silently come out smaller.
        let per_channel = r.bitrate / u32::from(c.packager.channels.max(1));
        if per_channel > tern_packager::MAX_BITRATE_PER_CHANNEL {
            return Err(format!(
                "rendition {}: {} bits/s is more than AAC-LC carries for {} channel(s) \
                 ({} per channel)",
                r.name,
                r.bitrate,
                c.packager.channels,
                tern_packager::MAX_BITRATE_PER_CHANNEL
            ));
        }
    }
    if !["twoloop", "fast"].contains(&c.packager.aac_coder.as_str()) {
        return Err("packager.aac_coder must be \"twoloop\" or \"fast\"".into());
    }
    if let Some(s3) = &c.packager.s3 {
        if s3.bucket.is_empty() {
            return Err("packager.s3.bucket must be set".into());
        }
        if !(s3.request_timeout_seconds > 0.0 && s3.request_timeout_seconds <= 300.0) {
            return Err("packager.s3.request_timeout_seconds must be in (0, 300]".into());
        }
        if s3.spool_max_bytes < 1 << 20 {
            return Err("packager.s3.spool_max_bytes must be at least 1 MiB".into());
        }
    }
    if c.relay.max_listeners == 0 {
        return Err("relay.max_listeners must be at least 1".into());
    }
    Ok(())
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
}
