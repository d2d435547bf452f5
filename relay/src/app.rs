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
use tern_relay::{http, node, packaging};
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
    /// Loads the configuration, reports what is wrong or prints the effective values.
    CheckConfig,
}

pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
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
        return match toml_string(&cfg) {
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
    match runtime.block_on(run(cli.command, cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("tern: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn toml_string(cfg: &Config) -> Result<String> {
    // figment's TOML support brings serde-compatible output through its own toml dependency.
    Ok(serde_json::to_string_pretty(cfg)?)
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,str0m=warn,quinn=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Everything a subcommand started, stopped in reverse by [`Parts::stop`].
struct Parts {
    shutdown: watch::Sender<bool>,
    tasks: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
    temp_dir: Option<PathBuf>,
}

async fn run(command: Command, mut cfg: Config) -> Result<()> {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut parts = Parts {
        shutdown,
        tasks: Vec::new(),
        temp_dir: None,
    };
    let started = Instant::now();

    let (run_origin, run_relay, run_packager) = match command {
        Command::Demo => (true, true, true),
        Command::Origin => (true, false, false),
        Command::Relay => (false, true, false),
        Command::Package => (false, false, true),
        Command::CheckConfig => unreachable!("handled before the runtime starts"),
    };

    // The upstream's address and the certificates to trust for it.
    let mut upstream_roots: Option<Vec<CertificateDer<'static>>> = None;
    if run_origin {
        let demo = matches!(command, Command::Demo);
        if demo {
            // The demo's origin is private to this process: any free port will do.
            cfg.origin.listen = ([127, 0, 0, 1], 0).into();
        }
        let (addr, cert) = start_origin(&cfg, &mut parts, shutdown_rx.clone()).await?;
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

    let mut relay = None;
    if run_relay {
        let upstream = Upstream::new(cfg.upstream.addr, &cfg.upstream.server_name, &roots)?;
        let (r, task) = node::Relay::start(
            cfg.relay.webrtc_listen,
            cfg.relay.announce,
            cfg.relay.max_listeners,
            upstream,
            shutdown_rx.clone(),
        )
        .await?;
        parts.tasks.push(("relay", task));
        relay = Some(r);
    }

    let mut hls_root = None;
    let mut packaging_ids = Vec::new();
    if run_packager {
        // With S3 configured and no out_dir, `tern package` writes only to S3; the demo always
        // keeps a local copy for its own HTTP server.
        let out = match cfg.packager.out_dir.clone() {
            Some(d) => Some(d),
            None if matches!(command, Command::Demo) => {
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
        let upstream = Arc::new(Upstream::new(
            cfg.upstream.addr,
            &cfg.upstream.server_name,
            &roots,
        )?);
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
                shutdown_rx.clone(),
            );
            parts.tasks.push(("packager", task));
            packaging_ids.push(b.clone());
        }
        if let Some(out) = &out {
            info!(dir = %out.display(), "writing HLS");
        }
        hls_root = out;
    }

    let listener = tokio::net::TcpListener::bind(cfg.http.listen)
        .await
        .with_context(|| format!("binding HTTP {}", cfg.http.listen))?;
    let http_addr = listener.local_addr()?;
    let state = Arc::new(http::HttpState {
        relay,
        hls_root,
        web_dir: cfg.http.web_dir.clone(),
        max_body_bytes: cfg.http.max_body_bytes,
        metrics,
        started,
        packaging: packaging_ids.clone(),
    });
    parts.tasks.push((
        "http",
        tokio::spawn(http::serve(listener, state, shutdown_rx.clone())),
    ));

    print_banner(&command, http_addr, &cfg, &packaging_ids);
    wait_for_signal().await;
    info!("stopping");
    parts.stop().await;
    Ok(())
}

async fn start_origin(
    cfg: &Config,
    parts: &mut Parts,
    shutdown: watch::Receiver<bool>,
) -> Result<(std::net::SocketAddr, CertificateDer<'static>)> {
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
    let origin = Origin::bind(cfg.origin.listen, identity, registry)?;
    let addr = origin.local_addr()?;
    info!(%addr, "origin listening (QUIC)");
    let mut stop = shutdown;
    parts.tasks.push((
        "origin",
        tokio::spawn(origin.run(async move {
            let _ = stop.wait_for(|s| *s).await;
        })),
    ));
    Ok((addr, cert))
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
        Command::CheckConfig => {}
    }
    println!("  health:        {base}/health");
    println!("  metrics:       {base}/metrics");
    println!("Press Ctrl-C to stop.");
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
