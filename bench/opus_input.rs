//! Reading the benchmark input (an Ogg Opus file) into the packager's frames; shared by the
//! packaging benchmarks.

use std::path::Path;

use ffmpeg_next as ffmpeg;
use tern_packager::OpusFrame;

/// The input's Opus packets, with 48 kHz timestamps. Capture times are a fixed epoch plus
/// media time; a benchmark feeding frames in real time overwrites them.
pub(crate) fn read_opus(path: &Path) -> Vec<OpusFrame> {
    ffmpeg::init().expect("FFmpeg initialises");
    let mut input = ffmpeg::format::input(path).expect("input opens");
    let stream = input
        .streams()
        .best(ffmpeg::media::Type::Audio)
        .expect("an audio stream");
    let index = stream.index();
    let tb = stream.time_base();
    let mut frames = Vec::new();
    for (s, packet) in input.packets() {
        if s.index() != index {
            continue;
        }
        let pts = packet.pts().unwrap_or(0).max(0) as u64;
        let ts = pts * 48_000 * tb.numerator() as u64 / tb.denominator() as u64;
        frames.push(OpusFrame {
            timestamp: ts,
            capture_time_us: 1_700_000_000_000_000 + ts * 1_000 / 48,
            payload: bytes::Bytes::copy_from_slice(packet.data().unwrap_or_default()),
        });
    }
    frames
}
