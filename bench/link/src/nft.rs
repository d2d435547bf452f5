//! Loss from the kernel instead of the proxy: nftables drops UDP datagrams on the input hook,
//! to cross-check the proxy's loss model.
//!
//! The rules match only datagrams addressed to the proxy's two sockets, so each direction
//! loses datagrams at one point of the path, where the proxy's own model would drop them
//! (as they arrive at the proxy, before its delay): client → proxy for the way up, origin →
//! proxy for the way down. Dropping on every loopback input would hit each datagram twice
//! (at the proxy and again at its destination) and double the loss.
//!
//! Only ever inside a network namespace of its own (`unshare -n`, see `nft-check.sh`):
//! [`NftLoss::install`] refuses any namespace that has an interface other than loopback.

use std::process::Command;

use anyhow::{bail, Context};

/// Name of the nftables table this module owns; deleted on drop.
const TABLE: &str = "tern_link_loss";

/// Installed loss rules; dropping this deletes them.
pub struct NftLoss {
    ports: [u16; 2],
}

impl NftLoss {
    /// Drops `loss` (0..=1, resolution 0.01 %) of the UDP datagrams arriving at
    /// `ports[0]` (client → proxy) and `ports[1]` (origin → proxy), counting them.
    pub fn install(ports: [u16; 2], loss: f64) -> anyhow::Result<Self> {
        ensure_own_namespace()?;
        // `numgen random mod 10000 < N`: the rule nftables documents for random loss, with
        // 0.01 % steps (2 % is `< 200`, the same as `mod 100 < 2`).
        let per_10k = (loss.clamp(0.0, 1.0) * 10_000.0).round() as u32;
        let _ = nft(&format!("delete table inet {TABLE}"));
        nft(&format!("add table inet {TABLE}"))?;
        nft(&format!(
            "add chain inet {TABLE} inp {{ type filter hook input priority 0 ; policy accept ; }}"
        ))?;
        for port in ports {
            // First a counter of every datagram, then the random drop with its own counter.
            nft(&format!(
                "add rule inet {TABLE} inp meta l4proto udp udp dport {port} counter"
            ))?;
            nft(&format!(
                "add rule inet {TABLE} inp meta l4proto udp udp dport {port} \
                 numgen random mod 10000 < {per_10k} counter drop"
            ))?;
        }
        Ok(Self { ports })
    }

    /// (seen, dropped) datagrams for each of the two ports, like the proxy's counters.
    pub fn stats(&self) -> anyhow::Result<[(u64, u64); 2]> {
        let out = nft(&format!("list chain inet {TABLE} inp"))?;
        let mut stats = [(0, 0); 2];
        for line in out.lines() {
            let Some(packets) = counter_packets(line) else {
                continue;
            };
            for (i, port) in self.ports.iter().enumerate() {
                if line.contains(&format!("dport {port} ")) {
                    if line.contains(" drop") {
                        stats[i].1 = packets;
                    } else {
                        stats[i].0 = packets;
                    }
                }
            }
        }
        Ok(stats)
    }
}

impl Drop for NftLoss {
    fn drop(&mut self) {
        let _ = nft(&format!("delete table inet {TABLE}"));
    }
}

/// The packet count of a rule line as `nft list` prints it: `... counter packets N bytes M ...`.
fn counter_packets(line: &str) -> Option<u64> {
    let mut words = line.split_whitespace();
    words.find(|w| *w == "packets")?;
    words.next()?.parse().ok()
}

fn nft(command: &str) -> anyhow::Result<String> {
    let out = Command::new("nft")
        .args(command.split_whitespace())
        .output()
        .context("running nft (apt-get install nftables)")?;
    if !out.status.success() {
        bail!(
            "nft {command}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fails unless this process's network namespace has nothing but loopback (what a fresh
/// `unshare -n` gives), so the rules can never land in a ruleset that carries real traffic.
pub fn ensure_own_namespace() -> anyhow::Result<()> {
    // /proc/self/net is the calling process's namespace (unlike /sys/class/net, which shows
    // the namespace /sys was mounted from).
    let dev =
        std::fs::read_to_string("/proc/self/net/dev").context("reading /proc/self/net/dev")?;
    let others = interfaces(&dev)
        .into_iter()
        .filter(|i| *i != "lo")
        .collect::<Vec<_>>();
    if !others.is_empty() {
        bail!(
            "refusing to install nftables rules in a network namespace with {}; \
             run inside `unshare -n` (bench/link/nft-check.sh does)",
            others.join(", ")
        );
    }
    Ok(())
}

/// Interface names in /proc/net/dev (two header lines, then `name: counters...`).
fn interfaces(dev: &str) -> Vec<&str> {
    dev.lines()
        .skip(2)
        .filter_map(|l| l.split_once(':'))
        .map(|(name, _)| name.trim())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_read_from_nft_listing() {
        let line = "\t\tmeta l4proto udp udp dport 40000 numgen random mod 10000 < 200 \
                    counter packets 17 bytes 2400 drop";
        assert_eq!(counter_packets(line), Some(17));
        assert_eq!(
            counter_packets("\t\ttype filter hook input priority filter;"),
            None
        );
    }

    #[test]
    fn only_a_loopback_only_namespace_is_accepted() {
        let dev = "Inter-|   Receive\n face |bytes\n    lo: 1 2 3\n  eth0: 4 5 6\n";
        assert_eq!(interfaces(dev), ["lo", "eth0"]);
        let own = std::fs::read_to_string("/proc/self/net/dev").unwrap();
        if interfaces(&own).iter().any(|i| *i != "lo") {
            let err = NftLoss::install([1, 2], 0.5).err().expect("refused");
            assert!(err.to_string().contains("refusing"), "{err}");
        }
    }
}
