//! The built-in live test source: a steady tone with a short tick at every whole second of
//! media time, encoded to Opus (48 kHz, 20 ms frames) with FFmpeg's libopus wrapper.
//!
//! The tick makes latency audible and measurable: it starts exactly at media time `k × 48000`,
//! so a listener that hears (or detects) it can compare against the frame's capture time.

use std::f32::consts::TAU;
use std::time::Duration;

use bytes::Bytes;
use ffmpeg_next as ffmpeg;
use tracing::warn;

use crate::origin::Publisher;
use crate::wire::Frame;
use crate::{unix_micros_now, Error, FRAME_SAMPLES, SAMPLE_RATE};

/// Tone frequency. 440 Hz makes a whole number of cycles per second, so the signal is
/// identical every second and any glitch is easy to hear.
const TONE_HZ: f32 = 440.0;
/// Second partial: gives the encoders something besides a pure sine to spend bits on.
const OVERTONE_HZ: f32 = 660.0;
const TONE_AMPLITUDE: f32 = 0.2;
const OVERTONE_AMPLITUDE: f32 = 0.08;
const TICK_HZ: f32 = 2_000.0;
const TICK_AMPLITUDE: f32 = 0.7;
/// The tick lasts 15 ms and decays fast: a click, not a beep.
const TICK_SAMPLES: u64 = 720;

/// Encodes the test signal, one 20 ms Opus frame at a time. No clock, no I/O: the caller says
/// when each frame was captured.
pub struct TestSource {
    encoder: ffmpeg::encoder::Audio,
    channels: u8,
    /// Next sample index to synthesize.
    sample: u64,
    /// Next frame sequence number to emit.
    seq: u64,
    pending: std::collections::VecDeque<Frame>,
}

impl TestSource {
    /// A source with `channels` (1 or 2) encoded at `bitrate` bits per second.
    pub fn new(channels: u8, bitrate: usize) -> Result<Self, Error> {
        let err = |what: &str, e: ffmpeg::Error| Error::TestSource(format!("{what}: {e}"));
        ffmpeg::init().map_err(|e| err("initializing FFmpeg", e))?;
        let codec = ffmpeg::encoder::find_by_name("libopus")
            .ok_or_else(|| Error::TestSource("FFmpeg was built without libopus".into()))?;
        let mut enc = ffmpeg::codec::context::Context::new_with_codec(codec)
            .encoder()
            .audio()
            .map_err(|e| err("creating the Opus encoder", e))?;
        enc.set_rate(SAMPLE_RATE as i32);
        enc.set_channel_layout(layout(channels));
        enc.set_channels(i32::from(channels));
        enc.set_format(ffmpeg::format::Sample::F32(
            ffmpeg::format::sample::Type::Packed,
        ));
        enc.set_bit_rate(bitrate);
        enc.set_time_base((1, SAMPLE_RATE as i32));
        let encoder = enc
            .open_as(codec)
            .map_err(|e| err("opening the Opus encoder", e))?;
        if encoder.frame_size() as u64 != FRAME_SAMPLES {
            return Err(Error::TestSource(format!(
                "libopus frame size is {} samples, expected {FRAME_SAMPLES}",
                encoder.frame_size()
            )));
        }
        Ok(Self {
            encoder,
            channels,
            sample: 0,
            seq: 0,
            pending: Default::default(),
        })
    }

    /// The signal at sample index `n` (mono).
    fn signal(n: u64) -> f32 {
        let t = n as f32 / SAMPLE_RATE as f32;
        let in_second = n % u64::from(SAMPLE_RATE);
        let mut v = TONE_AMPLITUDE * (TAU * TONE_HZ * t).sin()
            + OVERTONE_AMPLITUDE * (TAU * OVERTONE_HZ * t).sin();
        if in_second < TICK_SAMPLES {
            let k = in_second as f32;
            let envelope = (-k / 120.0).exp();
            v += TICK_AMPLITUDE * envelope * (TAU * TICK_HZ * k / SAMPLE_RATE as f32).sin();
        }
        v.clamp(-1.0, 1.0)
    }

    /// Synthesizes and encodes the next 20 ms, returning the frame (if the encoder produced
    /// one; libopus may hold the first frame back for its look-ahead).
    pub fn next_frame(&mut self, capture_time_us: u64) -> Result<Option<Frame>, Error> {
        let ch = usize::from(self.channels);
        let mut frame = ffmpeg::frame::Audio::new(
            ffmpeg::format::Sample::F32(ffmpeg::format::sample::Type::Packed),
            FRAME_SAMPLES as usize,
            layout(self.channels),
        );
        frame.set_rate(SAMPLE_RATE);
        frame.set_pts(Some(self.sample as i64));
        {
            let data = frame.data_mut(0);
            for i in 0..FRAME_SAMPLES as usize {
                let v = Self::signal(self.sample + i as u64).to_ne_bytes();
                for c in 0..ch {
                    let at = (i * ch + c) * 4;
                    data[at..at + 4].copy_from_slice(&v);
                }
            }
        }
        self.sample += FRAME_SAMPLES;
        self.encoder
            .send_frame(&frame)
            .map_err(|e| Error::TestSource(format!("encoding: {e}")))?;
        let mut packet = ffmpeg::Packet::empty();
        while self.encoder.receive_packet(&mut packet).is_ok() {
            let Some(data) = packet.data() else { continue };
            self.pending.push_back(Frame {
                seq: self.seq,
                timestamp: self.seq * FRAME_SAMPLES,
                capture_time_us,
                payload: Bytes::copy_from_slice(data),
            });
            self.seq += 1;
        }
        Ok(self.pending.pop_front())
    }
}

fn layout(channels: u8) -> ffmpeg::ChannelLayout {
    if channels == 1 {
        ffmpeg::ChannelLayout::MONO
    } else {
        ffmpeg::ChannelLayout::STEREO
    }
}

/// Runs a test source in real time into `publisher` until `shutdown` resolves.
///
/// Frames are paced against absolute deadlines, so the stream does not drift from real time
/// even when a tick of the runtime comes late.
pub async fn run(
    mut source: TestSource,
    publisher: Publisher,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    tokio::pin!(shutdown);
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = &mut shutdown => return Ok(()),
        }
        match source.next_frame(unix_micros_now()) {
            Ok(Some(frame)) => publisher.send(frame),
            Ok(None) => {}
            Err(e) => {
                warn!(broadcast = %publisher.id(), "test source failed: {e}");
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emits_regular_opus_frames_with_a_tick_each_second() {
        let mut src = TestSource::new(2, 64_000).unwrap();
        let mut frames = Vec::new();
        for i in 0..150 {
            if let Some(f) = src.next_frame(1_000_000 + i * 20_000).unwrap() {
                frames.push(f);
            }
        }
        assert!(frames.len() >= 148, "only {} frames", frames.len());
        for (i, f) in frames.iter().enumerate() {
            assert_eq!(f.seq, i as u64);
            assert_eq!(f.timestamp, i as u64 * FRAME_SAMPLES);
            // 64 kb/s at 20 ms is ~160 bytes; Opus packets are never empty or huge.
            assert!((20..1275).contains(&f.payload.len()), "{}", f.payload.len());
        }
        // The tick is louder than the tone.
        let peak = |range: std::ops::Range<u64>| {
            range
                .map(|n| TestSource::signal(n).abs())
                .fold(0.0, f32::max)
        };
        assert!(peak(0..TICK_SAMPLES) > 0.6);
        assert!(peak(10_000..20_000) < 0.3);
    }
}
