//! Origin-link latency under injected delay and loss.
//!
//! `cargo run --release -p tern-bench-link --bin link-latency -- --seconds 60`
//! runs every standard scenario and prints one line each; `--rtt-ms`/`--loss` run one, and
//! `--bottleneck` runs link-mapping's relay-falls-behind scenario over the product link.
//!
//! `--compare-nft` (inside a network namespace of its own: `bench/link/nft-check.sh`) runs
//! the two loss scenarios of the requirement twice, alternately: loss from the proxy's seeded
//! model, then from nftables with the proxy adding only the delay; one line each.

use std::time::Duration;

use clap::Parser;
use tern_bench_link::impair::{Bottleneck, Profile};
use tern_bench_link::latency;

#[derive(Parser)]
struct Args {
    /// Seconds of audio per scenario.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Run one scenario with this round-trip time instead of the standard set.
    #[arg(long)]
    rtt_ms: Option<u64>,
    /// Loss (0..1) of that scenario.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Seed of the impairment model.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run only the bottleneck scenario: for the middle third of the run the path carries
    /// 7 kB/s behind a 1400-byte drop-tail queue, less than the broadcast needs.
    #[arg(long)]
    bottleneck: bool,
    /// Opus payload bytes per frame (64 kb/s ≈ 160).
    #[arg(long, default_value_t = 160)]
    payload: usize,
    /// Compare loss from the proxy with loss from nftables (needs its own network namespace).
    #[arg(long)]
    compare_nft: bool,
    /// With --compare-nft: pairs of runs per scenario (proxy, nftables, proxy, ...).
    #[arg(long, default_value_t = 1)]
    runs: u32,
}

fn scenarios(a: &Args) -> Vec<(String, Profile)> {
    if let Some(rtt) = a.rtt_ms {
        return vec![(
            format!("{rtt} ms RTT, {:.1}% loss", a.loss * 100.0),
            Profile::rtt_loss(Duration::from_millis(rtt), a.loss),
        )];
    }
    let ms = Duration::from_millis;
    if a.bottleneck {
        let run = Duration::from_secs(a.seconds);
        return vec![(
            format!(
                "50 ms RTT, capacity 7 kB/s from {} s to {} s",
                a.seconds / 3,
                a.seconds * 2 / 3
            ),
            Profile {
                bottleneck: Some(Bottleneck {
                    bytes_per_sec: 7_000,
                    queue_bytes: 1_400,
                    during: (run / 3, run * 2 / 3),
                }),
                ..Profile::rtt_loss(ms(50), 0.0)
            },
        )];
    }
    vec![
        ("clean loopback".into(), Profile::default()),
        ("50 ms RTT, 2% loss".into(), Profile::rtt_loss(ms(50), 0.02)),
        (
            "100 ms RTT, 5% loss".into(),
            Profile::rtt_loss(ms(100), 0.05),
        ),
        (
            "100 ms RTT, 5 ms jitter, burst loss (~3%)".into(),
            Profile {
                delay: ms(50),
                jitter: ms(5),
                burst: Some((0.01, 0.3, 0.9)),
                ..Profile::default()
            },
        ),
        (
            "50 ms RTT, 2% loss, 1% reordered +20 ms, 1% duplicated".into(),
            Profile {
                reorder: 0.01,
                reorder_delay: ms(20),
                duplicate: 0.01,
                ..Profile::rtt_loss(ms(50), 0.02)
            },
        ),
    ]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.compare_nft {
        return compare_nft(&a).await;
    }
    println!("| scenario | frames | missing | datagrams dropped (up/down) | p50 | p90 | p99 | p99.9 | max |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (name, profile) in scenarios(&a) {
        let r = latency::run(
            profile,
            Duration::from_secs(a.seconds),
            a.payload,
            a.seed,
            None,
        )
        .await?;
        println!(
            "| {name} | {} | {} | {}/{} | {} |",
            r.sent,
            r.missing(),
            r.datagrams[0].1,
            r.datagrams[1].1,
            percentiles(&r),
        );
    }
    Ok(())
}

/// The loss scenarios of the requirement, each with loss from the proxy and from nftables.
async fn compare_nft(a: &Args) -> anyhow::Result<()> {
    // Before any run, not after the first one.
    tern_bench_link::nft::ensure_own_namespace()?;
    let ms = Duration::from_millis;
    let cases = match a.rtt_ms {
        Some(rtt) => vec![(ms(rtt), a.loss)],
        None => vec![(ms(50), 0.02), (ms(100), 0.05)],
    };
    println!("| scenario | loss from | run | frames | missing | dropped up | dropped down | p50 | p90 | p99 | p99.9 | max |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (rtt, loss) in cases {
        let name = format!("{} ms RTT, {:.1}% loss", rtt.as_millis(), loss * 100.0);
        for run in 1..=a.runs {
            // Alternate so that load elsewhere on the machine hits both alike.
            for (from, profile, nft) in [
                ("proxy", Profile::rtt_loss(rtt, loss), None),
                ("nftables", Profile::rtt_loss(rtt, 0.0), Some(loss)),
            ] {
                let seed = a.seed + u64::from(run) - 1;
                let r = latency::run(
                    profile,
                    Duration::from_secs(a.seconds),
                    a.payload,
                    seed,
                    nft,
                )
                .await?;
                let dropped = |(seen, dropped): (u64, u64)| {
                    let share = if seen == 0 {
                        0.0
                    } else {
                        dropped as f64 / seen as f64 * 100.0
                    };
                    format!("{dropped} of {seen} ({share:.1}%)")
                };
                println!(
                    "| {name} | {from} | {run} | {} | {} | {} | {} | {} |",
                    r.sent,
                    r.missing(),
                    dropped(r.datagrams[0]),
                    dropped(r.datagrams[1]),
                    percentiles(&r),
                );
            }
        }
    }
    Ok(())
}

/// p50, p90, p99, p99.9 and max of a run, as table cells.
fn percentiles(r: &latency::Report) -> String {
    [0.5, 0.9, 0.99, 0.999, 1.0]
        .map(|q| format!("{:.1} ms", r.quantile(q).as_secs_f64() * 1e3))
        .join(" | ")
}
