//! Live configuration reload (SIGHUP).
//!
//! On SIGHUP the configuration is loaded again, with the same file and flags as at start. If
//! it is invalid, the error is logged and nothing changes. If it is valid, it is published on
//! a watch channel: any subsystem may [`subscribe`](Reloader::subscribe) and apply what it
//! can change live (today the log filter; later e.g. token keys, GeoIP databases, the fleet).
//! Keys that changed but are read only at start are logged as needing a restart.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::{self, Config, Overrides};
use crate::Error;

/// Keys that take effect on SIGHUP without a restart. A subsystem that starts applying a key
/// live adds it here (and subscribes to [`Reloader`]).
pub const LIVE_KEYS: &[&str] = &[
    "log.level",
    // The whole router section: a reload builds a new router and swaps it in.
    "router",
    "relay.auth.mode",
    "relay.auth.hs256_secret",
    "relay.auth.public_key",
    "relay.auth.previous_hs256_secret",
    "relay.auth.previous_public_key",
    "relay.sessions_per_minute",
    "relay.session_burst",
];

/// True if `key` (dotted) is a live key or lies under one (`router.fleet` under `router`).
pub fn is_live(key: &str) -> bool {
    LIVE_KEYS.iter().any(|k| {
        key == *k
            || key
                .strip_prefix(k)
                .is_some_and(|rest| rest.starts_with('.'))
    })
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Changed keys that apply now.
    pub applied: Vec<String>,
    /// Changed keys that keep their old value until the process restarts.
    pub needs_restart: Vec<String>,
}

/// Re-reads the configuration and hands the latest to subscribers.
#[derive(Debug)]
pub struct Reloader {
    path: Option<PathBuf>,
    overrides: Overrides,
    latest: watch::Sender<Arc<Config>>,
    /// What the process started with: restart-only keys are compared against this, so a key
    /// changed and changed back is not reported.
    started: Arc<Config>,
}

impl Reloader {
    /// A reloader for the configuration `initial`, loaded from `path` with `overrides`.
    pub fn new(path: Option<PathBuf>, overrides: Overrides, initial: Config) -> Self {
        let initial = Arc::new(initial);
        Self {
            path,
            overrides,
            latest: watch::Sender::new(initial.clone()),
            started: initial,
        }
    }

    /// The latest valid configuration, now and after every reload.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Config>> {
        self.latest.subscribe()
    }

    /// Loads the configuration again and publishes it if valid.
    pub fn reload(&self) -> Result<Outcome, Error> {
        let new = config::load(self.path.as_deref(), &self.overrides)?;
        Ok(self.publish(new))
    }

    /// Publishes `new` as the latest configuration and says what changed.
    pub fn publish(&self, new: Config) -> Outcome {
        let previous = self.latest.borrow().clone();
        let mut out = Outcome::default();
        for key in previous.changed_keys(&new) {
            if is_live(&key) {
                out.applied.push(key);
            }
        }
        for key in self.started.changed_keys(&new) {
            if !is_live(&key) {
                out.needs_restart.push(key);
            }
        }
        self.latest.send_replace(Arc::new(new));
        out
    }

    /// Reloads on every SIGHUP until `shutdown`, logging the outcome. `notifier` (systemd)
    /// is told `RELOADING=1` and then `READY=1`.
    #[cfg(unix)]
    pub async fn run_on_sighup(
        self: Arc<Self>,
        notifier: Option<Arc<crate::sdnotify::Notifier>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                error!("cannot handle SIGHUP, reload disabled: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = crate::stopped(&mut shutdown) => return,
                got = hup.recv() => if got.is_none() { return },
            }
            if let Some(n) = &notifier {
                n.send("RELOADING=1");
            }
            match self.reload() {
                Ok(out) => {
                    info!(applied = ?out.applied, "configuration reloaded");
                    if !out.needs_restart.is_empty() {
                        warn!(
                            keys = ?out.needs_restart,
                            "changed keys take effect only after a restart"
                        );
                    }
                }
                Err(e) => error!("configuration reload failed, keeping the current one: {e}"),
            }
            if let Some(n) = &notifier {
                n.send("READY=1");
            }
        }
    }
}

#[cfg(test)]
// figment's Jail closures return its (large) error type; fine in tests.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn reload_publishes_and_sorts_live_from_restart_keys() {
        Jail::expect_with(|jail| {
            jail.create_file("t.toml", "[log]\nlevel = \"info\"\n")?;
            let path = Some(PathBuf::from("t.toml"));
            let initial = config::load(path.as_deref(), &Overrides::default()).unwrap();
            let r = Reloader::new(path, Overrides::default(), initial);
            let mut rx = r.subscribe();

            jail.create_file(
                "t.toml",
                "[log]\nlevel = \"debug\"\n[relay]\nmax_listeners = 5\n",
            )?;
            let out = r.reload().unwrap();
            assert_eq!(out.applied, ["log.level"]);
            assert_eq!(out.needs_restart, ["relay.max_listeners"]);
            assert!(rx.has_changed().unwrap());
            assert_eq!(rx.borrow_and_update().log.level, "debug");

            // An invalid file changes nothing.
            jail.create_file("t.toml", "[log]\nlevel = \"trace\"\nbogus = 1\n")?;
            assert!(r.reload().is_err());
            assert!(!rx.has_changed().unwrap());

            // Back to the start values: nothing left that needs a restart.
            jail.create_file("t.toml", "[log]\nlevel = \"info\"\n")?;
            let out = r.reload().unwrap();
            assert_eq!(out.applied, ["log.level"]);
            assert!(out.needs_restart.is_empty());
            Ok(())
        });
    }
}
