//! The `tern` command line: parses flags, loads config, starts the parts a subcommand names,
//! and stops them in order on Ctrl-C or SIGTERM. The only place that uses `anyhow`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tern_origin_link::tls::CertificateDer;
use tern_origin_link::tls::{self, Identity};
use tern_origin_link::{BroadcastId, Origin, Registry, Upstream};
use tern_relay::config::{self, Config, Overrides};
use tern_relay::reload::Reloader;
use tern_relay::sdnotify::{self, Notifier};
use tern_relay::{http, node, packaging, router};
use tokio::sync::watch;
use tracing::{error, info};

/// Tern: an edge relay and HLS packager for live audio.
///
/// Broadcasts travel origin → (QUIC) → relay → (WebRTC/WHEP) → listeners, and
/// relay/origin → packager → AAC HLS for passive listeners.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    /// Config file (TOML). Default: /etc/tern/tern.toml if it exists.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Address of the HTTP server (overrides http.listen).
    #[arg(long, global = true, value_name = "ADDR")]
    http: Option<std::net::SocketAddr>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Everything on localhost: origin with a test tone, relay, packager, listener page.
    Demo,
    /// The origin: publishes the test-source broadcasts over QUIC (origin.*).
    Origin,
    /// A relay: pulls broadcasts from upstream.* and serves WebRTC listeners over WHEP.
    Relay,
    /// A packager: pulls packager.broadcasts from upstream.* and writes HLS to packager.out_dir.
    Package,
    /// A geo-router: sends each listener to the nearest relay of router.fleet with room
    /// (`POST /whep/{b}` → 307, `GET /v1/route/{b}`), or to the CDN's HLS.
    Router,
    /// Loads the configuration, reports what is wrong or prints the effective values.
    CheckConfig,
    /// Makes a fleet CA in DIR (once) and a certificate for NAME signed by it, valid for the
    /// given DNS names and IPs: DIR/NAME.pem and DIR/NAME-key.pem. Relays trust DIR/ca.pem.
    Certs {
        /// Folder for the CA and the node files.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Replace NAME's existing certificate.
        #[arg(long)]
        force: bool,
        /// File name of the node (e.g. origin-1).
        name: String,
        /// DNS names and IP addresses the certificate is valid for.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Certs {
        dir,
        force,
        name,
        names,
    } = &cli.command
    {
        return match certs(dir, *force, name, names) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tern: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let overrides = Overrides {
        http_listen: cli.http,
    };
    let cfg = match config::load(cli.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tern: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Command::CheckConfig = cli.command {
        return match cfg.to_masked_toml() {
            Ok(s) => {
                println!("# configuration is valid; effective values:\n{s}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tern: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tern: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let log = init_tracing(&cfg);
    let reloader = Arc::new(Reloader::new(cli.config.clone(), overrides, cfg.clone()));
    match runtime.block_on(run(cli.command, cfg, Ops { reloader, log })) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("tern: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn certs(dir: &std::path::Path, force: bool, name: &str, names: &[String]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let id: BroadcastId = name
        .parse()
        .context("NAME becomes a file name: use A-Z a-z 0-9 _ -")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Keys are written readable by the owner only.
    let write = |path: PathBuf, text: &str, secret: bool| -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(if secret { 0o600 } else { 0o644 })
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        f.write_all(text.as_bytes())?;
        println!("wrote {}", path.display());
        Ok(())
    };
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    if !ca_key.exists() {
        let (cert, key) = tls::make_ca()?;
        write(ca_cert, &cert, false)?;
        write(ca_key.clone(), &key, true)?;
    }
    let (cert_path, key_path) = (
        dir.join(format!("{id}.pem")),
        dir.join(format!("{id}-key.pem")),
    );
    if cert_path.exists() && !force {
        bail!("{} exists; use --force to replace it", cert_path.display());
    }
    let ca_key_pem = std::fs::read_to_string(&ca_key)
        .with_context(|| format!("reading {}", ca_key.display()))?;
    let (cert, key) = tls::issue(&ca_key_pem, names)?;
    write(cert_path, &cert, false)?;
    write(key_path, &key, true)?;
    Ok(())
}

type LogHandle =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

/// Logs to stderr (the journal under systemd) with `log.level`, or `RUST_LOG` if set. Returns
/// a handle to change the filter live, or `None` when `RUST_LOG` pins it.
fn init_tracing(cfg: &Config) -> Option<LogHandle> {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::EnvFilter;
    let (filter, pinned) = match EnvFilter::try_from_default_env() {
        Ok(f) => (f, true),
        Err(_) => (EnvFilter::new(cfg.log.filter()), false),
    };
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    (!pinned).then_some(handle)
}

/// Operations plumbing handed to [`run`]: SIGHUP reload and the live log filter.
struct Ops {
    reloader: Arc<Reloader>,
    log: Option<LogHandle>,
}

impl Ops {
    /// Starts what serves systemd and SIGHUP: returns the notifier (if run by systemd).
    fn start(self, parts: &mut Parts, shutdown: &watch::Receiver<bool>) -> Option<Arc<Notifier>> {
        let notifier = Notifier::from_env().map(Arc::new);
        // Apply each new configuration's log filter.
        if let Some(log) = self.log {
            let mut latest = self.reloader.subscribe();
            let mut stop = shutdown.clone();
            parts.tasks.push((
                "log filter",
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            _ = tern_relay::stopped(&mut stop) => return,
                            changed = latest.changed() => if changed.is_err() { return },
                        }
                        let filter = latest.borrow_and_update().log.filter();
                        match log.reload(tracing_subscriber::EnvFilter::new(&filter)) {
                            Ok(()) => info!(%filter, "log filter applied"),
                            Err(e) => error!("applying the log filter: {e}"),
                        }
                    }
                }),
            ));
        } else {
            info!("RUST_LOG is set: log.level changes on reload are ignored");
        }
        parts.tasks.push((
            "reload",
            tokio::spawn(
                self.reloader
                    .clone()
                    .run_on_sighup(notifier.clone(), shutdown.clone()),
            ),
        ));
        notifier
    }
}

/// Sends `WATCHDOG=1` at half the interval systemd asked for, from the runtime itself, so a
/// wedged runtime stops the pings and systemd restarts the service.
fn start_watchdog(notifier: &Arc<Notifier>, parts: &mut Parts, shutdown: &watch::Receiver<bool>) {
    let Some(every) = sdnotify::watchdog_interval() else {
        return;
    };
    let (n, mut stop) = (notifier.clone(), shutdown.clone());
    parts.tasks.push((
        "watchdog",
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tern_relay::stopped(&mut stop) => return,
                    _ = tick.tick() => n.send("WATCHDOG=1"),
                }
            }
        }),
    ));
    info!(?every, "systemd watchdog pings on");
}

/// Everything a subcommand started, stopped in reverse by [`Parts::stop`].
struct Parts {
    shutdown: watch::Sender<bool>,
    tasks: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
    temp_dir: Option<PathBuf>,
}

async fn run(command: Command, mut cfg: Config, ops: Ops) -> Result<()> {
    // Latencies that alerts and dashboards take quantiles of across instances are exported
    // as histograms (buckets aggregate; a summary's quantiles do not). The other histograms
    // stay summaries.
    let latency_buckets = [
        0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0,
    ];
    let mut builder = metrics_exporter_prometheus::PrometheusBuilder::new();
    for name in [
        "tern_relay_upstream_latency_seconds",
        "tern_packager_segment_upload_latency_seconds",
    ] {
        builder = builder
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(name.into()),
                &latency_buckets,
            )
            .context("metric buckets")?;
    }
    let metrics = builder
        .install_recorder()
        .context("installing the metrics recorder")?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut parts = Parts {
        shutdown,
        tasks: Vec::new(),
        temp_dir: None,
    };
    let started = Instant::now();
    // SIGHUP's default action ends the process: take it over before anything else.
    let reloader = ops.reloader.clone();
    let notifier = ops.start(&mut parts, &shutdown_rx);

    let (run_origin, run_relay, run_packager) = match command {
        Command::Demo => (true, true, true),
        Command::Origin => (true, false, false),
        Command::Relay => (false, true, false),
        Command::Package => (false, false, true),
        Command::Router => (false, false, false),
        Command::CheckConfig | Command::Certs { .. } => {
            unreachable!("handled before the runtime starts")
        }
    };

    // The upstream's address and the certificates to trust for it.
    let mut upstream_roots: Option<Vec<CertificateDer<'static>>> = None;
    let mut ingest = None;
    if run_origin {
        let demo = matches!(command, Command::Demo);
        if demo {
            // The demo's origin is private to this process: any free port will do.
            cfg.origin.listen = ([127, 0, 0, 1], 0).into();
        }
        let (addr, cert, manager) = start_origin(&cfg, &mut parts, shutdown_rx.clone()).await?;
        ingest = Some((manager, cfg.origin.ingest_api_bind));
        cfg.upstream.addr = addr;
        cfg.upstream.server_name = "localhost".into();
        upstream_roots = Some(vec![cert]);
    }
    let roots = match upstream_roots {
        Some(r) => r,
        None if run_relay || run_packager => {
            let ca = cfg.upstream.ca.as_ref().context(
                "upstream.ca is not set: give the PEM certificate (or CA) of the origin to trust",
            )?;
            tls::load_certs(ca)?
        }
        None => Vec::new(),
    };

    let relay = if run_relay {
        Some(start_relay(&cfg, &roots, &mut parts, &shutdown_rx).await?)
    } else {
        None
    };
    let (hls_root, packaging_ids) = if run_packager {
        let demo = matches!(command, Command::Demo);
        start_packaging(&cfg, demo, &roots, &mut parts, &shutdown_rx).await?
    } else {
        (None, Vec::new())
    };

    let listener = tokio::net::TcpListener::bind(cfg.http.listen)
        .await
        .with_context(|| format!("binding HTTP {}", cfg.http.listen))?;
    let http_addr = listener.local_addr()?;
    let admin_listener = match cfg.http.admin_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding the admin listener {a}"))?,
        ),
        None => None,
    };

    // The demo routes its listeners too, to its own relay, so the page's player takes the
    // same path as in production.
    let auto_fleet = matches!(command, Command::Demo) && cfg.router.fleet.is_empty();
    if auto_fleet {
        // Polled over loopback; offered to listeners as a path on this same server, so the
        // page works whatever address the browser reached it by (even with --http 0.0.0.0:…).
        let mut poll = http_addr;
        if poll.ip().is_unspecified() {
            poll.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        cfg.router.fleet = vec![config::FleetRelay {
            id: "local".into(),
            region: "local".into(),
            url: String::new(),
            latitude: 0.0,
            longitude: 0.0,
            capacity: cfg.relay.max_listeners,
            health_url: Some(format!("http://{poll}/health")),
        }];
        cfg.router.default_region = "local".into();
    }
    let router = match command {
        Command::Router if cfg.router.fleet.is_empty() => {
            bail!("router.fleet is empty: list the relays to route listeners to")
        }
        Command::Router | Command::Relay | Command::Demo if !cfg.router.fleet.is_empty() => {
            Some(router::Router::new(&cfg.router)?)
        }
        _ => None,
    };
    let state = Arc::new(http::HttpState {
        relay: relay.clone(),
        hls_root,
        web_dir: cfg.http.web_dir.clone(),
        max_body_bytes: cfg.http.max_body_bytes,
        metrics,
        started,
        packaging: packaging_ids.clone(),
        auth: std::sync::RwLock::new(Arc::new(listener_auth(&cfg.relay.auth)?)),
        limiter: std::sync::Mutex::new(tern_relay::limits::RateLimiter::new(
            cfg.relay.sessions_per_minute,
            cfg.relay.session_burst,
        )),
        admin_separate: admin_listener.is_some(),
        ingest,
        router: std::sync::RwLock::new(router.clone()),
    });
    // Listener auth and rate limits apply on SIGHUP: rotate token keys without dropping anyone.
    {
        let (state, mut latest, mut stop) =
            (state.clone(), reloader.subscribe(), shutdown_rx.clone());
        parts.tasks.push((
            "auth reload",
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tern_relay::stopped(&mut stop) => return,
                        changed = latest.changed() => if changed.is_err() { return },
                    }
                    let cfg = latest.borrow_and_update().clone();
                    match listener_auth(&cfg.relay.auth) {
                        Ok(auth) => {
                            *state.auth.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(auth);
                            info!(mode = ?cfg.relay.auth.mode, "listener auth reloaded");
                        }
                        // Keep the keys in force rather than lock everyone out or let all in.
                        Err(e) => {
                            error!("listener auth not reloaded, keeping the current keys: {e:#}")
                        }
                    }
                    state
                        .limiter
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .reconfigure(cfg.relay.sessions_per_minute, cfg.relay.session_burst);
                }
            }),
        ));
    }
    if let Some(admin) = admin_listener {
        info!(addr = %admin.local_addr()?, "admin and metrics listening");
        parts.tasks.push((
            "admin http",
            tokio::spawn(http::serve(
                admin,
                state.clone(),
                http::Surface::Admin,
                shutdown_rx.clone(),
            )),
        ));
    }
    // Serve first: in the demo the router polls this very server.
    parts.tasks.push((
        "http",
        tokio::spawn(http::serve(
            listener,
            state.clone(),
            http::Surface::Public,
            shutdown_rx.clone(),
        )),
    ));
    if let Some(r) = &router {
        let (generation, tasks) = start_router(r, &shutdown_rx).await;
        parts.tasks.extend(tasks);
        // The demo's fleet is its own relay, made at start: nothing in a file to reload.
        if !auto_fleet {
            reload_router(
                state.clone(),
                reloader.subscribe(),
                cfg.router.clone(),
                generation,
                &mut parts,
                &shutdown_rx,
            );
        }
    }

    print_banner(&command, http_addr, &cfg, &packaging_ids);
    if let Some(n) = &notifier {
        start_watchdog(n, &mut parts, &shutdown_rx);
        n.send(&format!("READY=1\nSTATUS=serving, HTTP on {http_addr}"));
    }
    if wait_for_stop(relay.as_ref()).await == Stop::Drain {
        if let Some(relay) = &relay {
            if let Some(n) = &notifier {
                n.send("STATUS=draining: refusing new listeners");
            }
            drain(relay, Duration::from_secs(cfg.relay.drain_timeout_seconds)).await;
        }
    }
    info!("stopping");
    if let Some(n) = &notifier {
        n.send("STOPPING=1");
    }
    parts.stop().await;
    Ok(())
}

/// The certificate a relay or packager presents to its upstream, if configured.
/// Starts the WebRTC fan-out (and, with `[relay.link]`, the link server for cascades).
async fn start_relay(
    cfg: &Config,
    roots: &[CertificateDer<'static>],
    parts: &mut Parts,
    shutdown: &watch::Receiver<bool>,
) -> Result<node::Relay> {
    let upstream = upstream(cfg, roots)?;
    let (r, task) = node::Relay::start(
        cfg.relay.webrtc_listen,
        cfg.relay.announce,
        cfg.relay.max_listeners,
        cfg.relay.fanout_threads,
        upstream,
        Duration::from_secs(cfg.relay.unsubscribe_grace_seconds),
        shutdown.clone(),
    )
    .await?;
    parts.tasks.push(("relay", task));
    if let Some(listen) = cfg.relay.link.listen {
        start_link_server(cfg, listen, &r, parts, shutdown.clone())?;
    }
    Ok(r)
}

/// Starts one packager per configured broadcast; returns the local HLS folder (if any) and
/// the broadcasts packaged.
async fn start_packaging(
    cfg: &Config,
    demo: bool,
    roots: &[CertificateDer<'static>],
    parts: &mut Parts,
    shutdown: &watch::Receiver<bool>,
) -> Result<(Option<PathBuf>, Vec<String>)> {
    let mut ids = Vec::new();
    // With S3 configured and no out_dir, `tern package` writes only to S3; the demo always
    // keeps a local copy for its own HTTP server.
    let out = match cfg.packager.out_dir.clone() {
        Some(d) => Some(d),
        None if demo => {
            let d = std::env::temp_dir().join(format!("tern-demo-{}", std::process::id()));
            parts.temp_dir = Some(d.clone());
            Some(d)
        }
        None if cfg.packager.s3.is_some() => None,
        None => bail!("packager.out_dir is not set (and no [packager.s3])"),
    };
    if let Some(out) = &out {
        std::fs::create_dir_all(out)
            .with_context(|| format!("creating the HLS folder {}", out.display()))?;
    }
    let s3 = match &cfg.packager.s3 {
        Some(s) => {
            let settings = s.settings();
            std::fs::create_dir_all(&s.spool_dir).with_context(|| {
                format!("creating the S3 spool folder {}", s.spool_dir.display())
            })?;
            info!(bucket = %settings.bucket, endpoint = ?settings.endpoint,
                spool = %s.spool_dir.display(), "pushing HLS to S3");
            Some(packaging::S3Output {
                client: tern_packager::s3::client(&settings).await,
                settings,
                spool_dir: s.spool_dir.clone(),
                spool_max_bytes: s.spool_max_bytes,
            })
        }
        None => None,
    };
    let upstream = Arc::new(upstream(cfg, roots)?);
    for b in &cfg.packager.broadcasts {
        let id: BroadcastId = b.parse()?;
        let task = packaging::spawn(
            id,
            upstream.clone(),
            packaging::settings(&cfg.packager),
            packaging::Output {
                dir: out.as_ref().map(|o| o.join(b)),
                s3: s3.clone(),
            },
            shutdown.clone(),
        );
        parts.tasks.push(("packager", task));
        ids.push(b.clone());
    }
    if let Some(out) = &out {
        info!(dir = %out.display(), "writing HLS");
    }
    Ok((out, ids))
}

/// Serves the origin link from this relay (a cascade hop): downstream relays and packagers
/// subscribe here, and the relay pulls each broadcast from its own upstream once.
fn start_link_server(
    cfg: &Config,
    listen: std::net::SocketAddr,
    relay: &node::Relay,
    parts: &mut Parts,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let link = &cfg.relay.link;
    let (Some(cert), Some(key)) = (&link.cert, &link.key) else {
        // config::load validated this.
        bail!("relay.link.listen needs relay.link.cert and relay.link.key");
    };
    let identity = Identity::from_pem_files(cert, key)?;
    let client_roots = match &link.client_ca {
        Some(path) => Some(tls::load_certs(path)?),
        None => None,
    };
    let server = Origin::bind_with(listen, identity, relay.clone(), client_roots)
        .with_context(|| format!("binding relay.link.listen {listen}"))?
        .with_node_id(relay.node_id());
    info!(addr = %server.local_addr()?, node = %relay.node_id(), "serving the origin link (QUIC)");
    parts.tasks.push((
        "link server",
        tokio::spawn(server.run(async move {
            let _ = stop.wait_for(|s| *s).await;
        })),
    ));
    Ok(())
}

/// The configured upstream (origin or hub), trusting `roots`.
fn upstream(cfg: &Config, roots: &[CertificateDer<'static>]) -> Result<Upstream> {
    Ok(Upstream::with_identity(
        cfg.upstream.addr,
        &cfg.upstream.server_name,
        roots,
        client_identity(cfg)?,
    )?)
}

fn client_identity(cfg: &Config) -> Result<Option<Identity>> {
    match (&cfg.upstream.cert, &cfg.upstream.key) {
        (Some(c), Some(k)) => Ok(Some(Identity::from_pem_files(c, k)?)),
        (None, None) => Ok(None),
        _ => bail!("upstream.cert and upstream.key must be set together"),
    }
}

fn listener_auth(cfg: &config::AuthConfig) -> Result<tern_relay::auth::Auth> {
    use tern_relay::auth::{Auth, Verifier};
    fn verifier(
        secret: &Option<String>,
        public_key: &Option<PathBuf>,
        key: &str,
    ) -> Result<Option<Verifier>> {
        Ok(match (secret, public_key) {
            (Some(secret), _) => Some(Verifier::hs256(secret.as_bytes())),
            (None, Some(path)) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("reading relay.auth.{key} {}", path.display()))?;
                Some(Verifier::from_public_pem(&pem)?)
            }
            (None, None) => None,
        })
    }
    Ok(match cfg.mode {
        config::AuthMode::Open => Auth::Open,
        config::AuthMode::Jwt => {
            // config::load validated that one of the two is set.
            let Some(current) = verifier(&cfg.hs256_secret, &cfg.public_key, "public_key")? else {
                bail!("relay.auth.mode = \"jwt\" needs a secret or a public key");
            };
            let previous = verifier(
                &cfg.previous_hs256_secret,
                &cfg.previous_public_key,
                "previous_public_key",
            )?;
            Auth::Jwt(Box::new(match previous {
                Some(p) => current.with_previous(p),
                None => current,
            }))
        }
    })
}

/// Starts a router's pollers under a stop signal of their own, which global shutdown also
/// flips, so that a reload can retire one router while the process goes on.
async fn start_router(
    router: &Arc<router::Router>,
    shutdown: &watch::Receiver<bool>,
) -> (
    watch::Sender<bool>,
    Vec<(&'static str, tokio::task::JoinHandle<()>)>,
) {
    let (generation, stop) = watch::channel(false);
    let (g, mut global) = (generation.clone(), shutdown.clone());
    tokio::spawn(async move {
        tokio::select! {
            () = tern_relay::stopped(&mut global) => { let _ = g.send(true); }
            // This generation was retired by a reload.
            _ = g.closed() => {}
        }
    });
    // `start` polls every relay once before returning, so a new router never routes blind.
    let tasks = router.start(stop).await;
    (generation, tasks)
}

/// On SIGHUP with a changed `[router]`: builds the new router, lets it poll its fleet, swaps
/// it in, then stops the old one. An invalid section keeps the router in force.
fn reload_router(
    state: Arc<http::HttpState>,
    mut latest: watch::Receiver<Arc<Config>>,
    mut current: config::RouterConfig,
    mut generation: watch::Sender<bool>,
    parts: &mut Parts,
    shutdown: &watch::Receiver<bool>,
) {
    let (shutdown, mut stop) = (shutdown.clone(), shutdown.clone());
    parts.tasks.push((
        "router reload",
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tern_relay::stopped(&mut stop) => return,
                    changed = latest.changed() => if changed.is_err() { return },
                }
                let next = latest.borrow_and_update().router.clone();
                if next == current {
                    continue;
                }
                if next.fleet.is_empty() {
                    error!("router.fleet is empty in the new configuration: keeping the current router");
                    continue;
                }
                match router::Router::new(&next) {
                    Ok(r) => {
                        let (g, _tasks) = start_router(&r, &shutdown).await;
                        *state.router.write().unwrap_or_else(|e| e.into_inner()) = Some(r);
                        let _ = generation.send(true);
                        generation = g;
                        info!(relays = next.fleet.len(), "router reloaded with the new fleet");
                        current = next;
                    }
                    Err(e) => error!("router not reloaded, keeping the current one: {e}"),
                }
            }
        }),
    ));
}

/// Refuses new listeners, then waits until the last one leaves or `cap` passes. A second
/// Ctrl-C or SIGTERM ends the wait at once.
async fn drain(relay: &node::Relay, cap: Duration) {
    relay.start_drain();
    let left = relay.snapshot().total;
    info!(listeners = left, "draining for at most {cap:?}");
    tokio::select! {
        () = relay.emptied() => info!("drained: no listener left"),
        () = tokio::time::sleep(cap) => info!(listeners = relay.snapshot().total, "drain timeout reached"),
        _ = wait_for_signal() => info!("second signal: stopping now"),
    }
}

async fn start_origin(
    cfg: &Config,
    parts: &mut Parts,
    shutdown: watch::Receiver<bool>,
) -> Result<(
    std::net::SocketAddr,
    CertificateDer<'static>,
    Arc<tern_origin_link::ingest::IngestManager>,
)> {
    let identity = match (&cfg.origin.cert, &cfg.origin.key) {
        (Some(c), Some(k)) => Identity::from_pem_files(c, k)?,
        (None, None) => Identity::self_signed(&["localhost", "127.0.0.1"])?,
        _ => bail!("origin.cert and origin.key must be set together"),
    };
    if let Some(out) = &cfg.origin.cert_out {
        std::fs::write(out, identity.cert_pem())
            .with_context(|| format!("writing the origin certificate to {}", out.display()))?;
        info!(path = %out.display(), "origin certificate written");
    }
    let cert = identity.chain[0].clone();
    let registry = Registry::new();
    for b in &cfg.origin.test_broadcasts {
        let id: BroadcastId = b.parse()?;
        let source = tern_origin_link::testsrc::TestSource::new(
            cfg.origin.channels,
            cfg.origin.bitrate as usize,
        )?;
        let publisher = registry.publish(id, cfg.origin.channels);
        let mut stop = shutdown.clone();
        parts.tasks.push((
            "test source",
            tokio::spawn(async move {
                let stopped = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                if let Err(e) = tern_origin_link::testsrc::run(source, publisher, stopped).await {
                    error!("test source stopped: {e}");
                }
            }),
        ));
    }
    let client_roots = match &cfg.origin.client_ca {
        Some(path) => Some(tls::load_certs(path)?),
        None => None,
    };
    let origin = Origin::bind_with(cfg.origin.listen, identity, registry.clone(), client_roots)?;
    let addr = origin.local_addr()?;
    info!(%addr, "origin listening (QUIC)");
    let mut stop = shutdown;
    parts.tasks.push((
        "origin",
        tokio::spawn(origin.run(async move {
            let _ = stop.wait_for(|s| *s).await;
        })),
    ));
    let manager = tern_origin_link::ingest::IngestManager::new(registry, cfg.origin.channels);
    for i in &cfg.origin.ingest {
        let ep = manager
            .create(i.broadcast.parse()?, i.listen)
            .await
            .with_context(|| format!("opening RTP ingest for {} on {}", i.broadcast, i.listen))?;
        info!(broadcast = %ep.broadcast, addr = %ep.addr, "send RTP/Opus here");
    }
    Ok((addr, cert, manager))
}

impl Parts {
    async fn stop(self) {
        let _ = self.shutdown.send(true);
        for (name, task) in self.tasks {
            match tokio::time::timeout(Duration::from_secs(10), task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!("{name} task failed: {e}"),
                Err(_) => error!("{name} did not stop within 10 s"),
            }
        }
        if let Some(d) = self.temp_dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn print_banner(command: &Command, http: std::net::SocketAddr, cfg: &Config, packaging: &[String]) {
    let base = format!("http://{http}");
    println!("tern {} running ({command:?})", env!("CARGO_PKG_VERSION"));
    match command {
        Command::Demo => {
            let b = cfg
                .origin
                .test_broadcasts
                .first()
                .map(String::as_str)
                .unwrap_or("demo");
            println!("  broadcast:     {b}");
            println!("  listener page: {base}/?broadcast={b}");
            println!("  WHEP:          {base}/whep/{b}");
            println!("  HLS:           {base}/hls/{b}/master.m3u8");
        }
        Command::Relay => println!("  WHEP:          {base}/whep/{{broadcast}}"),
        Command::Package => {
            for b in packaging {
                println!("  HLS:           {base}/hls/{b}/master.m3u8");
            }
        }
        Command::Origin => println!("  origin (QUIC): {}", cfg.origin.listen),
        Command::Router => {
            println!("  route:         {base}/v1/route/{{broadcast}}");
            println!("  WHEP (307):    {base}/whep/{{broadcast}}");
        }
        Command::CheckConfig | Command::Certs { .. } => {}
    }
    println!("  health:        {base}/health");
    println!("  metrics:       {base}/metrics");
    println!("Press Ctrl-C to stop.");
}

#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// Ctrl-C (SIGINT): stop now, closing sessions cleanly.
    Now,
    /// SIGTERM or an admin drain on a relay: let listeners leave first.
    Drain,
}

async fn wait_for_stop(relay: Option<&node::Relay>) -> Stop {
    let drain_requested = async {
        match relay {
            Some(r) => r.drain_requested().await,
            None => std::future::pending().await,
        }
    };
    #[cfg(unix)]
    {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            let _ = tokio::signal::ctrl_c().await;
            return Stop::Now;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => Stop::Now,
            _ = term.recv() => if relay.is_some() { Stop::Drain } else { Stop::Now },
            () = drain_requested => Stop::Drain,
        }
    }
    #[cfg(not(unix))]
    tokio::select! {
        _ = tokio::signal::ctrl_c() => Stop::Now,
        () = drain_requested => Stop::Drain,
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
