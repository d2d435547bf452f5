//! The Janus streaming plugin under test, as the peer to compare against.
//!
//! A generated configuration folder loads only the HTTP transport and the streaming plugin,
//! with one RTP mountpoint for Opus fed by the bench's source. Each listener is a Janus
//! session with one streaming handle: `watch` → Janus offers → the listener answers with
//! `start`. Session timeouts are off, so idle sessions are never reaped during a run.
//!
//! Janus gathers no loopback candidates: its ICE is restricted to one interface
//! (`ice_enforce_list`), a veth end inside the bench's network namespace.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::client::Client;
use crate::sys::{free_tcp, free_udp, http, wait_http, Proc};

const MOUNTPOINT: u64 = 1;

/// How Janus runs media for its handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Loops {
    /// Janus's default: one event loop and thread per handle.
    PerHandle,
    /// `event_loops = N`: handles share N loops.
    Shared(u32),
}

pub(crate) struct Settings<'a> {
    pub(crate) binary: &'a str,
    /// Folder holding `plugins/` and `transports/` of the Janus install.
    pub(crate) lib_dir: &'a Path,
    /// The only interface Janus may gather ICE candidates on.
    pub(crate) iface: &'a str,
    /// That interface's address.
    pub(crate) ip: IpAddr,
    pub(crate) loops: Loops,
}

pub(crate) struct Janus {
    proc: Proc,
    api: SocketAddr,
    rtp_target: SocketAddr,
    dir: PathBuf,
    transaction: u64,
}

/// The generated `janus.jcfg`, `janus.transport.http.jcfg` and `janus.plugin.streaming.jcfg`.
pub(crate) fn config_files(
    dir: &Path,
    s: &Settings<'_>,
    api_port: u16,
    rtp_port: u16,
) -> Vec<(&'static str, String)> {
    let d = dir.display();
    let mut general = format!(
        "\tconfigs_folder = \"{d}\"\n\
         \tplugins_folder = \"{d}/plugins\"\n\
         \ttransports_folder = \"{d}/transports\"\n\
         \tevents_folder = \"{d}/none\"\n\
         \tloggers_folder = \"{d}/none\"\n\
         \tinterface = \"{ip}\"\n\
         \tdebug_level = 3\n\
         \tsession_timeout = 0\n",
        ip = s.ip,
    );
    if let Loops::Shared(n) = s.loops {
        let _ = writeln!(general, "\tevent_loops = {n}");
    }
    let core = format!(
        "general: {{\n{general}}}\n\
         media: {{\n\tipv6 = false\n}}\n\
         nat: {{\n\tice_enforce_list = \"{iface}\"\n}}\n",
        iface = s.iface
    );
    let transport = format!(
        "general: {{\n\tjson = \"plain\"\n\tbase_path = \"/janus\"\n\thttp = true\n\
         \tport = {api_port}\n\tip = \"127.0.0.1\"\n\thttps = false\n}}\n\
         admin: {{\n\tadmin_http = false\n\tadmin_https = false\n}}\n"
    );
    let streaming = format!(
        "general: {{\n\tevents = false\n}}\n\
         bench: {{\n\ttype = \"rtp\"\n\tid = {MOUNTPOINT}\n\tdescription = \"bench\"\n\
         \tmedia = ({{ type = \"audio\", mid = \"a\", port = {rtp_port}, pt = {pt}, codec = \"opus\" }})\n}}\n",
        pt = crate::source::PAYLOAD_TYPE
    );
    vec![
        ("janus.jcfg", core),
        ("janus.transport.http.jcfg", transport),
        ("janus.plugin.streaming.jcfg", streaming),
    ]
}

impl Janus {
    pub(crate) fn start(s: &Settings<'_>) -> Result<Self> {
        // /proc/net/dev lists this network namespace's interfaces (/sys may show another's).
        let dev = std::fs::read_to_string("/proc/self/net/dev")?;
        let iface_here = dev
            .lines()
            .any(|l| l.trim_start().split(':').next() == Some(s.iface));
        if !iface_here {
            bail!(
                "no interface {}: Janus gathers no loopback candidates, so it runs inside a \
                 network namespace with a veth pair (bench/relay/janus-vs-tern.sh)",
                s.iface
            );
        }
        let loops = match s.loops {
            Loops::PerHandle => "threads".to_owned(),
            Loops::Shared(n) => format!("loops{n}"),
        };
        let dir =
            std::env::temp_dir().join(format!("tern-bench-janus-{}-{loops}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["plugins", "transports", "none"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        for (sub, lib) in [
            ("plugins", "libjanus_streaming.so"),
            ("transports", "libjanus_http.so"),
        ] {
            let from = s.lib_dir.join(sub).join(lib);
            if !from.exists() {
                bail!(
                    "{} not found (is Debian's janus installed?)",
                    from.display()
                );
            }
            std::os::unix::fs::symlink(&from, dir.join(sub).join(lib))?;
        }
        let api = free_tcp()?;
        // The mountpoint binds every address; RTP arrives on loopback like Tern's ingest.
        let rtp_target = free_udp([127, 0, 0, 1].into())?;
        for (name, text) in config_files(&dir, s, api.port(), rtp_target.port()) {
            std::fs::write(dir.join(name), text)?;
        }
        let log = std::fs::File::create(dir.join("janus.log"))?;
        let mut cmd = Command::new(s.binary);
        cmd.arg("-F")
            .arg(&dir)
            .arg("-C")
            .arg(dir.join("janus.jcfg"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut proc = Proc(
            cmd.spawn()
                .with_context(|| format!("starting {}", s.binary))?,
        );
        wait_http(api, "/janus/info", &mut proc, "janus")
            .with_context(|| format!("see {}", dir.join("janus.log").display()))?;
        Ok(Self {
            proc,
            api,
            rtp_target,
            dir,
            transaction: 0,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The end of Janus's log, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("janus.log")).unwrap_or_default();
        let lines: Vec<_> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Where RTP for the mountpoint goes.
    pub(crate) fn rtp_target(&self) -> SocketAddr {
        self.rtp_target
    }

    fn call(&mut self, path: &str, mut request: Value, timeout: Duration) -> Result<Value> {
        self.transaction += 1;
        request["transaction"] = json!(self.transaction.to_string());
        let (status, body) = http(
            self.api,
            "POST",
            path,
            "application/json",
            request.to_string().as_bytes(),
            timeout,
        )?;
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("Janus answered {status}: {body}"))?;
        if v["janus"] == "error" {
            bail!("Janus error on {path}: {}", v["error"]);
        }
        Ok(v)
    }

    /// Waits for the event that carries Janus's SDP offer on `session`.
    fn offer(&mut self, session: u64) -> Result<String> {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            // A long poll: answers as soon as an event is queued (or after 30 s, empty).
            let (_, body) = http(
                self.api,
                "GET",
                &format!("/janus/{session}?maxev=10"),
                "application/json",
                b"",
                Duration::from_secs(40),
            )?;
            let v: Value = serde_json::from_str(&body)
                .with_context(|| format!("Janus long poll answered: {body}"))?;
            let events = match v {
                Value::Array(a) => a,
                other => vec![other],
            };
            for e in events {
                if let Some(err) = e["plugindata"]["data"].get("error") {
                    bail!("streaming plugin refused watch: {err}");
                }
                if e["jsep"]["type"] == "offer" {
                    return e["jsep"]["sdp"]
                        .as_str()
                        .map(str::to_owned)
                        .context("offer without sdp");
                }
            }
        }
        bail!("no offer from Janus within 20 s")
    }

    /// create → attach → watch → (Janus offers) → the listener answers → start.
    pub(crate) fn connect(&mut self, client: &mut Client) -> Result<()> {
        let t = Duration::from_secs(10);
        let created = self.call("/janus", json!({"janus": "create"}), t)?;
        let session = created["data"]["id"].as_u64().context("session id")?;
        let attached = self.call(
            &format!("/janus/{session}"),
            json!({"janus": "attach", "plugin": "janus.plugin.streaming"}),
            t,
        )?;
        let handle = attached["data"]["id"].as_u64().context("handle id")?;
        let path = format!("/janus/{session}/{handle}");
        self.call(
            &path,
            json!({"janus": "message", "body": {"request": "watch", "id": MOUNTPOINT}}),
            t,
        )?;
        let offer = self.offer(session)?;
        let answer = client.answer(&offer).context("answering Janus's offer")?;
        self.call(
            &path,
            json!({
                "janus": "message",
                "body": {"request": "start"},
                "jsep": {"type": "answer", "sdp": answer}
            }),
            t,
        )?;
        Ok(())
    }
}

impl Drop for Janus {
    fn drop(&mut self) {
        let _ = self.proc.0.kill();
        let _ = self.proc.0.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(loops: Loops) -> Settings<'static> {
        Settings {
            binary: "janus",
            lib_dir: Path::new("/usr/lib/x86_64-linux-gnu/janus"),
            iface: "d0",
            ip: [10, 77, 0, 1].into(),
            loops,
        }
    }

    #[test]
    fn config_loads_one_transport_one_plugin_and_the_opus_mountpoint() {
        let files = config_files(Path::new("/tmp/j"), &settings(Loops::Shared(2)), 8088, 5002);
        let core = &files[0].1;
        assert!(core.contains("event_loops = 2"), "{core}");
        assert!(core.contains("session_timeout = 0"));
        assert!(core.contains("ice_enforce_list = \"d0\""));
        assert!(core.contains("plugins_folder = \"/tmp/j/plugins\""));
        assert!(files[1].1.contains("port = 8088"));
        assert!(files[2].1.contains(
            r#"media = ({ type = "audio", mid = "a", port = 5002, pt = 111, codec = "opus" })"#
        ));
        let per_handle = config_files(Path::new("/tmp/j"), &settings(Loops::PerHandle), 1, 2);
        assert!(!per_handle[0].1.contains("event_loops"));
    }
}
