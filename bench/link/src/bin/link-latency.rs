//! Origin-link latency under injected delay and loss.
//!
//! `cargo run --release -p tern-bench-link --bin link-latency -- --seconds 60`
//! runs every standard scenario and prints one line each; `--rtt-ms`/`--loss` run one, and
//! `--bottleneck` runs link-mapping's relay-falls-behind scenario over the product link.

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
    println!("| scenario | frames | missing | datagrams dropped (up/down) | p50 | p90 | p99 | p99.9 | max |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (name, profile) in scenarios(&a) {
        let r = latency::run(profile, Duration::from_secs(a.seconds), a.payload, a.seed).await?;
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
        println!(
            "| {name} | {} | {} | {}/{} | {} | {} | {} | {} | {} |",
            r.sent,
            r.missing(),
            r.proxy[0].1,
            r.proxy[1].1,
            ms(r.quantile(0.5)),
            ms(r.quantile(0.9)),
            ms(r.quantile(0.99)),
            ms(r.quantile(0.999)),
            ms(r.quantile(1.0)),
        );
    }
    Ok(())
}
