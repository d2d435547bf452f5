//! Transcoding throughput of the packager against the ffmpeg CLI doing the same job, side by
//! side in one run: one Opus broadcast in, AAC-LC 64 + 128 kbps fMP4 HLS (2 s segments, a
//! 3-segment window, master playlist) out.
//!
//! The figure is "broadcasts in real time per core": seconds of media per CPU second (user +
//! system), so 30 means one core keeps 30 live broadcasts going. The packager runs on this
//! thread and its CPU time is this thread's; ffmpeg runs as a child and its CPU time is the
//! child's (all its threads). Runs alternate (packager, ffmpeg, packager, ...) so machine noise
//! hits both; the median of `--runs` is reported.
//!
//! ```sh
//! bench/run                         # release build, 60 s input, 5 runs each
//! bench/run --seconds 10 --runs 1   # smoke run
//! ```
//!
//! Usage: `hls_bench INPUT.opus [--runs N] [--coder twoloop|fast] [--out DIR]` (INPUT: Ogg
//! Opus, 48 kHz; both coders unless `--coder`).

use std::path::{Path, PathBuf};
use std::process::Command as Process;

use opus_input::read_opus;
use tern_packager::{AacCoder, Command, OpusFrame, Packager, PackagerConfig};

mod opus_input;

/// CPU seconds (user + system) from a /proc stat line: fields 14, 15 (self) or 16, 17
/// (waited-for children), in clock ticks (100 per second on Linux).
fn proc_cpu(stat: &str, children: bool) -> f64 {
    // The command name (field 2) may hold spaces; fields after it are plain.
    let after = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3.
    let (a, b) = if children { (13, 14) } else { (11, 12) };
    let ticks: f64 = [a, b]
        .iter()
        .map(|&i| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0))
        .sum();
    ticks / 100.0
}

fn thread_cpu() -> f64 {
    proc_cpu(
        &std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default(),
        false,
    )
}

fn children_cpu() -> f64 {
    proc_cpu(
        &std::fs::read_to_string("/proc/self/stat").unwrap_or_default(),
        true,
    )
}

/// One packager run over all frames; returns CPU seconds and bytes of output.
fn run_packager(frames: &[OpusFrame], coder: AacCoder) -> (f64, u64) {
    let config = PackagerConfig {
        aac_coder: coder,
        ..PackagerConfig::default()
    };
    let start = thread_cpu();
    let mut p = Packager::new(config).expect("packager starts");
    let mut bytes = 0u64;
    let mut count = |p: &mut Packager| {
        while let Some(c) = p.poll_command() {
            if let Command::Put { body, .. } = c {
                bytes += body.len() as u64;
            }
        }
    };
    for f in frames {
        p.push(f.clone()).expect("push");
        count(&mut p);
    }
    p.finish().expect("finish");
    count(&mut p);
    (thread_cpu() - start, bytes)
}

/// The ffmpeg CLI doing the same job (the command of docs/benchmarks.md); returns CPU seconds.
fn run_ffmpeg(input: &Path, out: &Path, coder: AacCoder) -> f64 {
    let _ = std::fs::remove_dir_all(out);
    std::fs::create_dir_all(out).expect("output folder");
    let before = children_cpu();
    let status = Process::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-y", "-i"])
        .arg(input)
        .args([
            "-filter_complex",
            "[0:a]aformat=channel_layouts=stereo,asplit=2[a0][a1]",
            "-map",
            "[a0]",
            "-map",
            "[a1]",
            "-c:a",
            "aac",
            "-aac_coder",
            coder.ffmpeg_name(),
            "-b:a:0",
            "64k",
            "-b:a:1",
            "128k",
            "-f",
            "hls",
            "-hls_time",
            "2",
            "-hls_list_size",
            "3",
            "-hls_flags",
            "delete_segments+independent_segments",
            "-hls_segment_type",
            "fmp4",
            "-master_pl_name",
            "master.m3u8",
            "-var_stream_map",
            "a:0,name:64k a:1,name:128k",
        ])
        .arg(out.join("%v/index.m3u8"))
        .status()
        .expect("ffmpeg runs");
    assert!(status.success(), "ffmpeg failed");
    children_cpu() - before
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut input = None;
    let mut runs = 5usize;
    let mut coders = vec![AacCoder::TwoLoop, AacCoder::Fast];
    let mut out = std::env::temp_dir().join(format!("tern-bench-{}", std::process::id()));
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            "--out" => out = PathBuf::from(args.next().expect("--out DIR")),
            "--coder" => {
                coders = match args.next().as_deref() {
                    Some("twoloop") => vec![AacCoder::TwoLoop],
                    Some("fast") => vec![AacCoder::Fast],
                    _ => panic!("--coder twoloop|fast"),
                }
            }
            _ => input = Some(PathBuf::from(a)),
        }
    }
    let input = input.expect("usage: hls_bench INPUT.opus [--runs N] [--out DIR]");
    let frames = read_opus(&input);
    let media = frames.len() as f64 * 0.02;
    println!(
        "input: {} ({media:.0} s, {} Opus frames); {runs} run(s) each, alternating; \
         figure = media seconds per CPU second (broadcasts in real time per core)",
        input.display(),
        frames.len()
    );
    println!("| coder | tern packager | ffmpeg CLI | ratio |");
    println!("|---|---|---|---|");
    for coder in coders {
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for _ in 0..runs {
            let (cpu, bytes) = run_packager(&frames, coder);
            assert!(bytes > 0);
            ours.push(media / cpu.max(0.01));
            let cpu = run_ffmpeg(&input, &out, coder);
            theirs.push(media / cpu.max(0.01));
        }
        let (o, t) = (median(ours), median(theirs));
        println!(
            "| {} | {o:.1}× | {t:.1}× | {:.2} |",
            coder.ffmpeg_name(),
            o / t
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}
