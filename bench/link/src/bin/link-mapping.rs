//! How to map media onto QUIC: one ordered stream, a stream per frame, a stream per group
//! reset when late, or datagrams, compared under the same delay and loss.
//!
//! `cargo run --release -p tern-bench-link --bin link-mapping -- --seconds 30`
//! runs every scenario and prints one markdown table row per scenario and mapping.
//! `--smoke` runs two short scenarios and fails if a clean link loses or delays a frame.

use std::time::Duration;

use clap::Parser;
use tern_bench_link::impair::{Bottleneck, Profile};
use tern_bench_link::mapping::{self, Mapping, Outcome, Settings};

#[derive(Parser)]
struct Args {
    /// Seconds of audio per scenario.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Seed of the impairment model and of the frame sizes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Capture → relay budget in ms: later frames are late; groups are reset to meet it.
    #[arg(long, default_value_t = 300)]
    budget_ms: u64,
    /// Frames per stream of the group mappings (one mapping per value; 1 is a stream per
    /// frame that is reset when late).
    #[arg(long, value_delimiter = ',', default_value = "1,5,10")]
    groups: Vec<u64>,
    /// Datagram send buffer in bytes (default: one budget's worth of frames).
    #[arg(long)]
    datagram_buffer: Option<usize>,
    /// Run only the scenarios whose key contains this (keys: clean, rtt50-loss2,
    /// rtt100-loss5, burst, bottleneck).
    #[arg(long)]
    only: Option<String>,
    /// A few seconds in all: the harness works and a clean link delivers everything (CI).
    #[arg(long)]
    smoke: bool,
}

struct Scenario {
    key: &'static str,
    name: String,
    profile: Profile,
}

fn scenarios(duration: Duration) -> Vec<Scenario> {
    let ms = Duration::from_millis;
    vec![
        Scenario {
            key: "clean",
            name: "clean loopback".into(),
            profile: Profile::default(),
        },
        Scenario {
            key: "rtt50-loss2",
            name: "50 ms RTT, 2% loss".into(),
            profile: Profile::rtt_loss(ms(50), 0.02),
        },
        Scenario {
            key: "rtt100-loss5",
            name: "100 ms RTT, 5% loss".into(),
            profile: Profile::rtt_loss(ms(100), 0.05),
        },
        Scenario {
            key: "burst",
            name: "100 ms RTT, 5 ms jitter, burst loss (~3%)".into(),
            profile: Profile {
                delay: ms(50),
                jitter: ms(5),
                burst: Some((0.01, 0.3, 0.9)),
                ..Profile::default()
            },
        },
        // The relay falls behind: for the middle third of the run the path carries about
        // two thirds of what the stream needs (≈ 11 kB/s with QUIC overhead), behind a
        // 200 ms drop-tail queue.
        Scenario {
            key: "bottleneck",
            name: format!(
                "50 ms RTT, capacity 7 kB/s (56 kb/s) from {:.0} s to {:.0} s",
                (duration / 3).as_secs_f64(),
                (duration * 2 / 3).as_secs_f64()
            ),
            profile: Profile {
                bottleneck: Some(Bottleneck {
                    bytes_per_sec: 7_000,
                    queue_bytes: 1_400,
                    during: (duration / 3, duration * 2 / 3),
                }),
                ..Profile::rtt_loss(ms(50), 0.0)
            },
        },
    ]
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("–".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
}

fn row(scenario: &str, o: &Outcome, seconds: f64) -> String {
    let kbps = |b: u64| b as f64 * 8.0 / seconds / 1000.0;
    format!(
        "| {scenario} | {} | {}/{} | {} | {} | {:.1}% | {} | {} | {} | {} | {} | {} | {} | {:.1}/{:.1} |",
        o.mapping,
        o.arrived(),
        o.sent(),
        o.lost(),
        o.late(),
        o.missed_share() * 100.0,
        o.longest_gap(),
        ms(o.quantile(0.5)),
        ms(o.quantile(0.9)),
        ms(o.quantile(0.99)),
        ms(o.quantile(0.999)),
        ms(o.quantile(1.0)),
        o.skipped,
        kbps(o.wire[1]),
        kbps(o.wire[0]),
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let seconds = if a.smoke { 2 } else { a.seconds };
    let duration = Duration::from_secs(seconds);
    let mut settings = Settings::new(duration, a.seed, Duration::from_millis(a.budget_ms));
    if let Some(bytes) = a.datagram_buffer {
        settings.datagram_buffer = bytes;
    }
    let mut mappings = vec![Mapping::Ordered, Mapping::StreamPerFrame];
    mappings.extend(a.groups.iter().map(|&frames| Mapping::Group { frames }));
    mappings.push(Mapping::Datagram);

    let only = if a.smoke {
        vec!["clean", "rtt100-loss5"]
    } else {
        Vec::new()
    };
    let chosen: Vec<Scenario> = scenarios(duration)
        .into_iter()
        .filter(|s| a.only.as_ref().is_none_or(|o| s.key.contains(o.as_str())))
        .filter(|s| only.is_empty() || only.contains(&s.key))
        .collect();
    anyhow::ensure!(!chosen.is_empty(), "no scenario matches {:?}", a.only);

    println!(
        "{seconds} s per scenario, seed {}, budget {} ms, datagram buffer {} B; load average {} at start",
        a.seed,
        a.budget_ms,
        settings.datagram_buffer,
        load_average()
    );
    println!();
    println!("| scenario | mapping | arrived | lost | late | missed | longest gap (frames) | p50 | p90 | p99 | p99.9 | max | skipped at origin | wire kb/s down/up |");
    println!(
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for s in &chosen {
        let outcomes = mapping::compare(&s.profile, &mappings, &settings).await?;
        for o in &outcomes {
            println!("{}", row(&s.name, o, duration.as_secs_f64()));
        }
        if a.smoke && s.key == "clean" {
            for o in &outcomes {
                anyhow::ensure!(
                    o.lost() == 0 && o.late() == 0,
                    "{}: a clean link lost {} and delayed {} frames",
                    o.mapping,
                    o.lost(),
                    o.late()
                );
            }
        }
    }
    println!();
    println!("load average {} at end", load_average());
    Ok(())
}
