//! The packager core: frames in, storage commands out (see the crate docs for the contract).

use std::collections::{HashSet, VecDeque};
use std::sync::mpsc::Receiver;

use crate::fmp4::{self, TrackConfig};
use crate::playlist::{self, Entry, LivePlaylist, Variant};
use crate::segment::{AacPacket, CaptureClock, Segment, Segmenter};
use crate::transcode::{self, AacEncoder, Fifo, OpusDecoder, SAMPLE_RATE};
use crate::{
    Command, Error, ObjectKind, OpusFrame, PackagerConfig, Sink, LATE_TOLERANCE, MAX_GAP_FILL,
    PEAK_HEADROOM_PERCENT,
};

/// Counters for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Frames passed to `push`.
    pub frames: u64,
    /// Frames whose payload the Opus decoder rejected (replaced by silence).
    pub malformed_frames: u64,
    /// Frames dropped because they arrived behind the expected time (late or duplicate).
    pub late_frames: u64,
    /// Samples of silence inserted for timestamp gaps and malformed frames.
    pub silence_samples: u64,
    /// Timeline restarts (each one starts a segment with EXT-X-DISCONTINUITY).
    pub restarts: u64,
    pub renditions: Vec<RenditionStats>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RenditionStats {
    pub name: String,
    pub segments: u64,
    /// Segments not published because they were partial (joined mid-segment).
    pub partial_segments_dropped: u64,
    /// Bytes of published media segments (boxes included).
    pub bytes: u64,
    /// Seconds of media in published segments.
    pub seconds: f64,
    /// Highest bitrate of one published full-length segment, bits/s, boxes included.
    pub peak_bitrate: u64,
    /// BANDWIDTH declared in the master playlist.
    pub declared_bandwidth: u64,
    /// AVERAGE-BANDWIDTH declared in the master playlist.
    pub declared_average_bandwidth: u64,
}

struct RenditionState {
    name: String,
    encoder: AacEncoder,
    segmenter: Segmenter,
    playlist: LivePlaylist,
    stats: RenditionStats,
    warned_peak: bool,
}

/// Packages one broadcast. See the crate docs for the run contract.
pub struct Packager {
    segment_samples: u64,
    decoder: OpusDecoder,
    channels: u16,
    fifo: Fifo,
    renditions: Vec<RenditionState>,
    clock: CaptureClock,
    /// Output media time = input timestamp + offset; changes only at restarts.
    offset: i64,
    /// Whether a frame has been accepted in the current epoch (the FIFO's end is then the
    /// expected time of the next frame).
    started: bool,
    commands: VecDeque<Command>,
    stats: Stats,
    finished: bool,
    /// Reused per-rendition packet buffers.
    scratch: Vec<Vec<AacPacket>>,
}

impl std::fmt::Debug for Packager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packager")
            .field("segment_samples", &self.segment_samples)
            .field("offset", &self.offset)
            .field("started", &self.started)
            .field("finished", &self.finished)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn samples_of(d: std::time::Duration) -> i64 {
    // Bounded constants (seconds), so the cast cannot truncate.
    (d.as_nanos() * u128::from(SAMPLE_RATE) / 1_000_000_000) as i64
}

/// Validates the configuration; returns the segment length in samples.
fn validate(config: &PackagerConfig) -> Result<u64, Error> {
    let invalid = |msg: String| Err(Error::InvalidConfig(msg));
    if config.renditions.is_empty() {
        return invalid("at least one rendition is needed".into());
    }
    let mut names = HashSet::new();
    for r in &config.renditions {
        let ok_chars = r
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if r.name.is_empty() || !ok_chars {
            return invalid(format!(
                "rendition name {:?}: use ASCII letters, digits, - and _",
                r.name
            ));
        }
        if !names.insert(r.name.as_str()) {
            return invalid(format!("rendition name {:?} used twice", r.name));
        }
        if !(16_000..=320_000).contains(&r.bitrate) {
            return invalid(format!(
                "rendition {}: bitrate {} outside 16000..=320000",
                r.name, r.bitrate
            ));
        }
    }
    if !(1..=2).contains(&config.channels) {
        return invalid(format!("channels must be 1 or 2, not {}", config.channels));
    }
    // Mono or stereo: the same bitrate means twice the bits per channel in mono, and FFmpeg's
    // AAC-LC encoder silently caps what it cannot carry.
    for r in &config.renditions {
        let per_channel = r.bitrate / u32::from(config.channels);
        if !(crate::MIN_BITRATE_PER_CHANNEL..=crate::MAX_BITRATE_PER_CHANNEL).contains(&per_channel)
        {
            return invalid(format!(
                "rendition {}: {} bits/s over {} channel(s) is {per_channel} per channel, \
                 outside {}..={}",
                r.name,
                r.bitrate,
                config.channels,
                crate::MIN_BITRATE_PER_CHANNEL,
                crate::MAX_BITRATE_PER_CHANNEL
            ));
        }
    }
    let nanos = config.segment_duration.as_nanos();
    let samples = nanos * u128::from(SAMPLE_RATE);
    if !samples.is_multiple_of(1_000_000_000) {
        return invalid("segment_duration must be a whole number of 48 kHz samples".into());
    }
    let samples = samples / 1_000_000_000;
    // At least 4 AAC frames so a segment is never empty; at most a minute (HLS players expect
    // seconds-long segments, and it bounds memory).
    if !(4 * 1024..=60 * u128::from(SAMPLE_RATE)).contains(&samples) {
        return invalid(format!(
            "segment_duration {:?} outside 86 ms..=60 s",
            config.segment_duration
        ));
    }
    if config.window == 0 {
        return invalid("window must be at least 1 segment".into());
    }
    Ok(samples as u64)
}

/// fMP4 bytes a full segment spends on boxes: styp, moof with one trun entry per frame, mdat
/// header. Used to declare bandwidth before any segment exists.
fn segment_overhead_bytes(segment_samples: u64) -> u64 {
    let frames = segment_samples.div_ceil(1024) + 1;
    let styp = 8 + 16;
    let moof = 8 + 16 + (8 + 16 + 20 + (20 + 8 * frames));
    styp + moof + 8
}

impl Packager {
    pub fn new(config: PackagerConfig) -> Result<Self, Error> {
        let segment_samples = validate(&config)?;
        let seconds = segment_samples as f64 / f64::from(SAMPLE_RATE);
        let overhead_bps =
            (segment_overhead_bytes(segment_samples) as f64 * 8.0 / seconds).ceil() as u64;
        let target_duration = playlist::target_duration(segment_samples);
        let mut commands = VecDeque::new();
        let mut renditions = Vec::with_capacity(config.renditions.len());
        let mut variants = Vec::with_capacity(config.renditions.len());
        for r in &config.renditions {
            let encoder = AacEncoder::new(config.channels, r.bitrate, config.aac_coder)?;
            let average = u64::from(r.bitrate) + overhead_bps;
            let peak = average + u64::from(r.bitrate) * PEAK_HEADROOM_PERCENT / 100;
            let init = fmp4::init_segment(&TrackConfig {
                channels: config.channels,
                sample_rate: SAMPLE_RATE,
                audio_specific_config: encoder.audio_specific_config(),
                avg_bitrate: r.bitrate,
                max_bitrate: u32::try_from(peak).unwrap_or(u32::MAX),
            });
            commands.push_back(Command::Put {
                path: format!("{}/init.mp4", r.name),
                body: init,
                kind: ObjectKind::InitSegment,
                captured_us: None,
            });
            variants.push(Variant {
                name: r.name.clone(),
                bandwidth: peak,
                average_bandwidth: average,
            });
            renditions.push(RenditionState {
                name: r.name.clone(),
                encoder,
                segmenter: Segmenter::new(segment_samples),
                // Grace of one more window: a player that loaded the previous playlist just
                // before it changed may still fetch any segment it named.
                playlist: if config.record {
                    LivePlaylist::recording(target_duration)
                } else {
                    LivePlaylist::new(config.window, config.window, target_duration)
                },
                stats: RenditionStats {
                    name: r.name.clone(),
                    declared_bandwidth: peak,
                    declared_average_bandwidth: average,
                    ..RenditionStats::default()
                },
                warned_peak: false,
            });
        }
        commands.push_back(Command::Put {
            path: "master.m3u8".to_owned(),
            body: playlist::render_master(&variants),
            kind: ObjectKind::MasterPlaylist,
            captured_us: None,
        });
        Ok(Self {
            segment_samples,
            decoder: OpusDecoder::new(config.channels)?,
            channels: config.channels,
            fifo: Fifo::new(config.channels),
            scratch: vec![Vec::new(); renditions.len()],
            renditions,
            clock: CaptureClock::default(),
            offset: 0,
            started: false,
            commands,
            stats: Stats::default(),
            finished: false,
        })
    }

    /// Feeds one frame. Never blocks on I/O. Errors are codec failures (not bad input): the
    /// packager should then be dropped and, if wanted, a new one started.
    pub fn push(&mut self, frame: OpusFrame) -> Result<(), Error> {
        if self.finished {
            return Err(Error::Finished);
        }
        self.stats.frames += 1;
        let Some((timestamp, mut out)) = i64::try_from(frame.timestamp)
            .ok()
            .and_then(|t| Some((t, t.checked_add(self.offset)?)))
        else {
            // 2^63 samples is millions of years: only a corrupt timestamp gets here.
            self.stats.malformed_frames += 1;
            return Ok(());
        };
        if !self.started {
            self.fifo.reset(out);
            self.started = true;
        } else {
            let expected = self.fifo.end_pts();
            let jump = out - expected;
            if jump > samples_of(MAX_GAP_FILL) || jump < -samples_of(LATE_TOLERANCE) {
                tracing::info!(
                    expected,
                    got = out,
                    "timestamp jump: restarting the timeline"
                );
                self.restart(timestamp)?;
                out = timestamp + self.offset;
            } else if jump < 0 {
                self.stats.late_frames += 1;
                return Ok(());
            } else if jump > 0 {
                // Lost frames, DTX, or a malformed frame just before: keep time regular.
                self.fifo.push_silence(jump as usize);
                self.stats.silence_samples += jump as u64;
            }
        }
        self.clock.record(out, frame.capture_time_us);
        if let Err(e) = self.decoder.decode(&frame.payload, &mut self.fifo) {
            // Hostile or corrupt input must not stop the broadcast: the next frame's gap fill
            // substitutes silence for this one.
            self.stats.malformed_frames += 1;
            tracing::debug!(error = %e, timestamp = frame.timestamp, "malformed Opus frame");
        }
        self.encode_available()
    }

    /// End of broadcast: flushes the encoders and the last segment, writes EXT-X-ENDLIST.
    /// Calling it again does nothing.
    pub fn finish(&mut self) -> Result<(), Error> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        if self.started {
            self.flush_epoch(false)?;
        }
        for r in &mut self.renditions {
            r.playlist.end();
            self.commands.push_back(Command::Put {
                path: format!("{}/index.m3u8", r.name),
                body: r.playlist.render(),
                kind: ObjectKind::MediaPlaylist,
                captured_us: None,
            });
        }
        Ok(())
    }

    /// Pulls the next storage command, in the order they must be applied.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    pub fn stats(&self) -> Stats {
        Stats {
            renditions: self.renditions.iter().map(|r| r.stats.clone()).collect(),
            ..self.stats.clone()
        }
    }

    fn encode_available(&mut self) -> Result<(), Error> {
        let mut encoders: Vec<&mut AacEncoder> =
            self.renditions.iter_mut().map(|r| &mut r.encoder).collect();
        transcode::encode_available(&mut self.fifo, &mut encoders, &mut self.scratch)?;
        self.segment_scratch();
        Ok(())
    }

    /// Moves the encoded packets into the segmenters, publishing the segments they close.
    fn segment_scratch(&mut self) {
        for i in 0..self.renditions.len() {
            let packets = std::mem::take(&mut self.scratch[i]);
            let mut buffer = packets;
            for packet in buffer.drain(..) {
                if let Some(segment) = self.renditions[i].segmenter.push(packet) {
                    self.publish(i, segment);
                }
            }
            // Give the (now empty) allocation back for the next round.
            self.scratch[i] = buffer;
        }
    }

    /// Encodes what is left of the epoch, flushes encoders and segmenters. With `renew`, the
    /// encoders are replaced by fresh ones for the next epoch.
    fn flush_epoch(&mut self, renew: bool) -> Result<(), Error> {
        self.fifo.pad_to_frame();
        self.encode_available()?;
        for (r, out) in self.renditions.iter_mut().zip(self.scratch.iter_mut()) {
            r.encoder.flush(out)?;
            if renew {
                r.encoder = r.encoder.renew()?;
            }
        }
        self.segment_scratch();
        for i in 0..self.renditions.len() {
            if let Some(segment) = self.renditions[i].segmenter.flush() {
                self.publish(i, segment);
            }
        }
        Ok(())
    }

    /// Ends the current epoch and starts a new one at the next segment boundary, so that the
    /// first frame at input time `timestamp` follows the last segment without a gap in indices.
    fn restart(&mut self, timestamp: i64) -> Result<(), Error> {
        self.flush_epoch(true)?;
        self.stats.restarts += 1;
        self.decoder = OpusDecoder::new(self.channels)?;
        self.clock.clear();
        let last_index = self
            .renditions
            .iter()
            .filter_map(|r| r.segmenter.last_index())
            .max();
        // The encoder's first packet comes out `delay` samples before its first input, so
        // starting the input `delay` after the boundary puts the first packet on it.
        let delay = self.renditions.first().map_or(0, |r| r.encoder.delay());
        let start = match last_index {
            Some(last) => (last + 1) * self.segment_samples as i64 + delay,
            // Nothing encoded yet: keep the input timeline.
            None => timestamp + self.offset,
        };
        self.offset = start - timestamp;
        self.fifo.reset(start);
        let published = self.renditions.iter().any(|r| !r.playlist.is_empty());
        for r in &mut self.renditions {
            r.segmenter.restart(published);
        }
        Ok(())
    }

    fn publish(&mut self, i: usize, segment: Segment) {
        if segment.partial || segment.index < 0 || segment.samples.is_empty() {
            self.renditions[i].stats.partial_segments_dropped += 1;
            tracing::debug!(index = segment.index, "not publishing partial segment");
            return;
        }
        let index = segment.index as u64;
        let r = &mut self.renditions[i];
        // mfhd sequence numbers must grow within a track; indices do, and are the same across
        // redundant packagers. Wraps after 2^32 segments (272 years at 2 s).
        let sequence = (index as u32).wrapping_add(1);
        let body = fmp4::media_segment(
            sequence,
            segment.start_pts as u64,
            &segment.samples,
            &segment.data,
        );
        let seconds = segment.duration as f64 / f64::from(SAMPLE_RATE);
        r.stats.segments += 1;
        r.stats.bytes += body.len() as u64;
        r.stats.seconds += seconds;
        // Short segments (before a restart, at the end) inflate the per-second overhead and
        // are not what a player's bandwidth estimate sees in steady state.
        if segment.duration * 2 >= self.segment_samples {
            let bps = (body.len() as f64 * 8.0 / seconds) as u64;
            r.stats.peak_bitrate = r.stats.peak_bitrate.max(bps);
            if bps > r.stats.declared_bandwidth && !r.warned_peak {
                r.warned_peak = true;
                tracing::warn!(rendition = %r.name, bps, declared = r.stats.declared_bandwidth,
                    "segment bitrate above the declared BANDWIDTH");
            }
        }
        let end_pts = segment.start_pts.saturating_add_unsigned(segment.duration);
        self.commands.push_back(Command::Put {
            path: format!("{}/{}", r.name, playlist::segment_uri(index)),
            body,
            kind: ObjectKind::Segment,
            captured_us: self.clock.capture_time_at(end_pts),
        });
        let deletable = r.playlist.push(Entry {
            index,
            duration: seconds,
            program_date_time_us: self.clock.capture_time_at(segment.start_pts),
            discontinuity: segment.discontinuity,
        });
        self.commands.push_back(Command::Put {
            path: format!("{}/index.m3u8", r.name),
            body: r.playlist.render(),
            kind: ObjectKind::MediaPlaylist,
            captured_us: None,
        });
        for old in deletable {
            self.commands.push_back(Command::Delete {
                path: format!("{}/{}", r.name, playlist::segment_uri(old)),
            });
        }
    }
}

/// Blocking loop for a dedicated OS thread: packages every frame received until the sending
/// side hangs up, then finishes the broadcast. Commands are applied to `sink` as soon as they
/// are produced. A sink error stops the loop (the caller decides whether to start over).
pub fn run(
    config: PackagerConfig,
    frames: Receiver<OpusFrame>,
    sink: &mut dyn Sink,
) -> Result<Stats, Error> {
    let mut packager = Packager::new(config)?;
    let mut drain = |p: &mut Packager| -> Result<(), Error> {
        while let Some(command) = p.poll_command() {
            sink.apply(&command)?;
        }
        Ok(())
    };
    drain(&mut packager)?;
    for frame in frames {
        packager.push(frame)?;
        drain(&mut packager)?;
    }
    packager.finish()?;
    drain(&mut packager)?;
    Ok(packager.stats())
}

#[cfg(test)]
mod tests {
    // In tests every unwrap is an assertion: if it fails, the test fails, as it should.
    use super::*;
    use crate::MemorySink;
    use bytes::Bytes;

    /// A valid Opus packet without an encoder: TOC 0xf8 (CELT-only, fullband, 20 ms, mono,
    /// one frame) with a tiny body; the decoder turns it into 960 samples of near-silence.
    fn opus_silence() -> Bytes {
        Bytes::from_static(&[0xf8, 0xff, 0xfe])
    }

    fn frame(ts: u64) -> OpusFrame {
        OpusFrame {
            timestamp: ts,
            capture_time_us: 1_700_000_000_000_000 + ts * 1_000_000 / 48_000,
            payload: opus_silence(),
        }
    }

    fn drain(p: &mut Packager) -> Vec<Command> {
        std::iter::from_fn(|| p.poll_command()).collect()
    }

    fn one_rendition() -> PackagerConfig {
        PackagerConfig {
            renditions: vec![crate::Rendition::new("64k", 64_000)],
            ..PackagerConfig::default()
        }
    }

    fn segment_indices(commands: &[Command]) -> Vec<u64> {
        commands
            .iter()
            .filter_map(|c| match c {
                Command::Put {
                    path,
                    kind: ObjectKind::Segment,
                    ..
                } => path.rsplit('/').next()?.strip_suffix(".m4s")?.parse().ok(),
                _ => None,
            })
            .collect()
    }

    fn last_playlist(commands: &[Command]) -> m3u8_rs::MediaPlaylist {
        let body = commands
            .iter()
            .rev()
            .find_map(|c| match c {
                Command::Put {
                    body,
                    kind: ObjectKind::MediaPlaylist,
                    ..
                } => Some(body.clone()),
                _ => None,
            })
            .expect("a playlist was written");
        match m3u8_rs::parse_playlist_res(&body) {
            Ok(m3u8_rs::Playlist::MediaPlaylist(p)) => p,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn packager_can_move_to_its_own_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<Packager>();
    }

    #[test]
    fn mono_output() {
        let config = PackagerConfig {
            channels: 1,
            ..one_rendition()
        };
        let mut p = Packager::new(config).unwrap();
        let mut sink = MemorySink::default();
        for k in 0..300u64 {
            p.push(frame(k * 960)).unwrap();
        }
        p.finish().unwrap();
        while let Some(c) = p.poll_command() {
            sink.apply(&c).unwrap();
        }
        let init = &sink.objects["64k/init.mp4"];
        // mp4a sample entry: 8-byte header, 6 reserved, data ref index, 8 reserved, then channels.
        let at = init.windows(4).position(|w| w == b"mp4a").unwrap() + 4 + 6 + 2 + 8;
        assert_eq!(u16::from_be_bytes([init[at], init[at + 1]]), 1);
        assert!(sink.objects.contains_key("64k/0.m4s"));
    }

    #[test]
    fn config_validation() {
        assert!(Packager::new(PackagerConfig {
            window: 0,
            ..PackagerConfig::default()
        })
        .is_err());
        assert!(Packager::new(PackagerConfig {
            channels: 3,
            ..PackagerConfig::default()
        })
        .is_err());
        let dup = vec![
            crate::Rendition::new("a", 64_000),
            crate::Rendition::new("a", 96_000),
        ];
        assert!(Packager::new(PackagerConfig {
            renditions: dup,
            ..PackagerConfig::default()
        })
        .is_err());
        let bad = vec![crate::Rendition::new("../x", 64_000)];
        assert!(Packager::new(PackagerConfig {
            renditions: bad,
            ..PackagerConfig::default()
        })
        .is_err());
        // 320 kbps is fine in stereo (160 per channel) but too much for one AAC-LC channel.
        let loud = vec![crate::Rendition::new("hi", 320_000)];
        assert!(Packager::new(PackagerConfig {
            renditions: loud.clone(),
            channels: 2,
            ..PackagerConfig::default()
        })
        .is_ok());
        assert!(Packager::new(PackagerConfig {
            renditions: loud,
            channels: 1,
            ..PackagerConfig::default()
        })
        .is_err());
        let odd = std::time::Duration::from_nanos(2_000_000_001);
        assert!(Packager::new(PackagerConfig {
            segment_duration: odd,
            ..PackagerConfig::default()
        })
        .is_err());
    }

    #[test]
    fn init_and_master_come_first_and_segments_precede_playlists() {
        let mut p = Packager::new(PackagerConfig::default()).unwrap();
        let mut commands = drain(&mut p);
        assert_eq!(
            commands.iter().map(Command::path).collect::<Vec<_>>(),
            ["64k/init.mp4", "128k/init.mp4", "master.m3u8"]
        );
        for k in 0..500u64 {
            p.push(frame(k * 960)).unwrap();
            commands.extend(drain(&mut p));
        }
        p.finish().unwrap();
        commands.extend(drain(&mut p));
        let mut stored = HashSet::new();
        for c in &commands {
            match c {
                Command::Put {
                    path,
                    body,
                    kind: ObjectKind::MediaPlaylist,
                    ..
                } => {
                    let dir = path.rsplit_once('/').unwrap().0;
                    let Ok(m3u8_rs::Playlist::MediaPlaylist(pl)) =
                        m3u8_rs::parse_playlist_res(body)
                    else {
                        panic!("bad playlist");
                    };
                    for s in &pl.segments {
                        assert!(
                            stored.contains(&format!("{dir}/{}", s.uri)),
                            "{} named before stored",
                            s.uri
                        );
                    }
                    stored.insert(path.clone());
                }
                Command::Put { path, .. } => {
                    stored.insert(path.clone());
                }
                Command::Delete { path } => {
                    assert!(stored.remove(path), "deleting {path} that was never stored");
                }
            }
        }
        // Started at media time 0: segment 0 is complete and published.
        let idx = segment_indices(&commands);
        assert_eq!(
            idx.iter().filter(|i| **i == 0).count(),
            2,
            "both renditions publish 0.m4s"
        );
        // 500 × 20 ms = 10 s → segments 0..=4 (the last one short, flushed by finish).
        assert_eq!(*idx.iter().max().unwrap(), 4);
        let pl = last_playlist(&commands);
        assert!(pl.end_list);
        assert_eq!(pl.media_sequence, 2);
    }

    #[test]
    fn joining_mid_broadcast_drops_the_partial_first_segment() {
        let mut p = Packager::new(one_rendition()).unwrap();
        let start = 5 * 96_000 + 40_000; // 10.83 s in
        let mut commands = drain(&mut p);
        for k in 0..400u64 {
            p.push(frame(start + k * 960)).unwrap();
            commands.extend(drain(&mut p));
        }
        let idx = segment_indices(&commands);
        assert_eq!(idx.first(), Some(&6), "segment 5 was partial");
        assert_eq!(p.stats().renditions[0].partial_segments_dropped, 1);
        // Each published segment's tfdt is on the media-time grid: within a frame of i × 2 s.
        let pl = last_playlist(&commands);
        assert_eq!(pl.media_sequence, *idx.last().unwrap() - 2);
        // PDT follows capture times: consecutive segments ~2 s apart.
        let pdts: Vec<_> = pl
            .segments
            .iter()
            .map(|s| s.program_date_time.unwrap())
            .collect();
        for w in pdts.windows(2) {
            let ms = (w[1] - w[0]).num_milliseconds();
            assert!((1_970..=2_030).contains(&ms), "{ms}");
        }
    }

    #[test]
    fn segments_carry_the_capture_time_of_their_end() {
        let mut p = Packager::new(one_rendition()).unwrap();
        let mut commands = drain(&mut p);
        for k in 0..600u64 {
            p.push(frame(k * 960)).unwrap();
            commands.extend(drain(&mut p));
        }
        let mut seen = 0;
        for c in &commands {
            let Command::Put {
                path,
                kind,
                captured_us,
                ..
            } = c
            else {
                continue;
            };
            if *kind != ObjectKind::Segment {
                assert_eq!(*captured_us, None, "{path}");
                continue;
            }
            let index: u64 = path[4..].strip_suffix(".m4s").unwrap().parse().unwrap();
            // The segment ends on the first AAC frame at or after the next boundary: up to one
            // frame (21.3 ms) past it. `frame` stamps capture time = 1.7e15 µs + media time.
            let boundary = 1_700_000_000_000_000 + (index + 1) * 2_000_000;
            let got = captured_us.expect("a segment has a capture time");
            assert!(
                (boundary..=boundary + 21_334).contains(&got),
                "{path}: {got} vs boundary {boundary}"
            );
            seen += 1;
        }
        assert!(seen >= 4, "{seen} segments");
    }

    #[test]
    fn small_gaps_are_filled_with_silence() {
        let mut p = Packager::new(one_rendition()).unwrap();
        let mut commands = drain(&mut p);
        let mut ts = 0;
        for k in 0..600u64 {
            // Lose 5 frames every 100, and a 3 s DTX pause once.
            if k % 100 == 50 {
                ts += 5 * 960;
            }
            if k == 300 {
                ts += 3 * 48_000;
            }
            p.push(frame(ts)).unwrap();
            commands.extend(drain(&mut p));
            ts += 960;
        }
        let stats = p.stats();
        assert_eq!(stats.silence_samples, 6 * 5 * 960 + 3 * 48_000);
        assert_eq!(stats.restarts, 0);
        let idx = segment_indices(&commands);
        for w in idx.windows(2) {
            assert_eq!(w[0] + 1, w[1], "indices stay contiguous");
        }
        // Media time covered = last timestamp; segments are named by it.
        assert_eq!(*idx.last().unwrap(), (ts - 960) / 96_000 - 1);
        let pl = last_playlist(&commands);
        assert!(pl.segments.iter().all(|s| !s.discontinuity));
        for s in &pl.segments {
            assert!((s.duration - 2.0).abs() < 0.03, "{}", s.duration);
        }
    }

    #[test]
    fn late_frames_are_dropped_and_jumps_restart_with_discontinuity() {
        let mut p = Packager::new(one_rendition()).unwrap();
        let mut commands = drain(&mut p);
        for k in 0..300u64 {
            p.push(frame(k * 960)).unwrap();
        }
        // A duplicate of a recent frame: dropped.
        p.push(frame(299 * 960)).unwrap();
        assert_eq!(p.stats().late_frames, 1);
        commands.extend(drain(&mut p));
        let before = segment_indices(&commands);
        // Origin restart: timestamps start again from 0.
        for k in 0..400u64 {
            p.push(frame(k * 960)).unwrap();
            commands.extend(drain(&mut p));
        }
        // Then a 60 s jump forward: beyond the fill bound.
        for k in 0..400u64 {
            p.push(frame(400 * 960 + 60 * 48_000 + k * 960)).unwrap();
            commands.extend(drain(&mut p));
        }
        let stats = p.stats();
        assert_eq!(stats.restarts, 2);
        assert_eq!(stats.silence_samples, 0);
        let idx = segment_indices(&commands);
        assert!(idx.len() > before.len() + 4);
        for w in idx.windows(2) {
            assert_eq!(
                w[0] + 1,
                w[1],
                "indices stay contiguous across restarts: {idx:?}"
            );
        }
        // Every playlist ever written is valid, and exactly the restart segments carry the tag.
        let mut tagged = HashSet::new();
        for c in &commands {
            if let Command::Put {
                body,
                kind: ObjectKind::MediaPlaylist,
                ..
            } = c
            {
                let Ok(m3u8_rs::Playlist::MediaPlaylist(pl)) = m3u8_rs::parse_playlist_res(body)
                else {
                    panic!("bad playlist");
                };
                for (k, s) in pl.segments.iter().enumerate() {
                    if s.discontinuity {
                        tagged.insert(pl.media_sequence + k as u64);
                    }
                }
            }
        }
        assert_eq!(tagged.len(), 2, "{tagged:?}");
        // The segment after each restart starts on a boundary, so it is published: the only
        // partial segment is index -1, which holds just the encoder's priming frame at start.
        assert_eq!(stats.renditions[0].partial_segments_dropped, 1);
    }

    #[test]
    fn recording_keeps_every_segment_and_ends_with_a_vod_playlist() {
        let mut p = Packager::new(PackagerConfig {
            record: true,
            ..one_rendition()
        })
        .unwrap();
        let mut commands = drain(&mut p);
        for k in 0..1000u64 {
            p.push(frame(k * 960)).unwrap();
            commands.extend(drain(&mut p));
        }
        p.finish().unwrap();
        commands.extend(drain(&mut p));
        assert!(
            !commands.iter().any(|c| matches!(c, Command::Delete { .. })),
            "a recording deletes nothing"
        );
        let pl = last_playlist(&commands);
        assert!(pl.end_list);
        assert_eq!(pl.playlist_type, Some(m3u8_rs::MediaPlaylistType::Vod));
        assert_eq!(pl.media_sequence, 0);
        // 1000 × 20 ms = 20 s: segments 0..=9, all named by the final playlist.
        assert_eq!(pl.segments.len(), 10);
        assert_eq!(segment_indices(&commands), (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn malformed_frames_become_silence() {
        let mut p = Packager::new(one_rendition()).unwrap();
        for k in 0..200u64 {
            let mut f = frame(k * 960);
            if k % 10 == 3 {
                f.payload = Bytes::from_static(&[0xff, 0xff, 0xff]);
            }
            p.push(f).unwrap();
        }
        let stats = p.stats();
        assert_eq!(stats.malformed_frames, 20);
        // Each bad frame is replaced when the next one arrives.
        assert_eq!(stats.silence_samples, 20 * 960);
        assert_eq!(stats.restarts, 0);
    }

    #[test]
    fn run_loop_applies_everything_and_ends_the_list() {
        let (tx, rx) = std::sync::mpsc::sync_channel(32);
        let producer = std::thread::spawn(move || {
            for k in 0..300u64 {
                tx.send(frame(k * 960))
                    .expect("receiver lives until the loop ends");
            }
        });
        let mut sink = MemorySink::default();
        let stats = run(one_rendition(), rx, &mut sink).unwrap();
        producer.join().expect("producer does not panic");
        assert_eq!(stats.frames, 300);
        let pl = sink.objects.get("64k/index.m3u8").unwrap();
        assert!(std::str::from_utf8(pl).unwrap().contains("#EXT-X-ENDLIST"));
        assert!(sink.objects.contains_key("master.m3u8"));
        assert!(sink.objects.contains_key("64k/init.mp4"));
    }
}
