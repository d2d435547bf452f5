//! Grouping AAC packets into segments by media time (sans-IO).
//!
//! Segment `i` holds the packets whose presentation time `pts` satisfies
//! `floor(pts / segment_samples) == i`; a segment closes when a packet falls into a later index.
//! Because the index is a pure function of media time, two packagers fed the same broadcast name
//! their segments identically. AAC frames are 1024 samples, so with 2 s segments (96000 samples)
//! a segment holds 93 or 94 frames.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use crate::fmp4::SampleInfo;

/// One encoded AAC access unit with its media time (48 kHz samples).
#[derive(Debug, Clone)]
pub(crate) struct AacPacket {
    /// Presentation time; may be negative for the encoder's priming frame at broadcast start.
    pub(crate) pts: i64,
    pub(crate) duration: u32,
    pub(crate) data: Bytes,
}

/// A closed segment, ready to be boxed.
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    pub(crate) index: i64,
    /// Media time of the first sample (the fragment's tfdt).
    pub(crate) start_pts: i64,
    /// Sum of the packet durations, in 48 kHz samples.
    pub(crate) duration: u64,
    pub(crate) samples: Vec<SampleInfo>,
    pub(crate) data: Bytes,
    /// The segment does not start at its index's boundary: the packager joined (or the encoder
    /// started) mid-segment. Such a segment must not be published (see `Packager`).
    pub(crate) partial: bool,
    /// First segment after a timeline restart: the playlist marks it EXT-X-DISCONTINUITY.
    pub(crate) discontinuity: bool,
}

#[derive(Debug)]
struct Open {
    index: i64,
    start_pts: i64,
    next_pts: i64,
    samples: Vec<SampleInfo>,
    data: BytesMut,
    partial: bool,
    discontinuity: bool,
}

/// Segmenter state for one rendition.
#[derive(Debug)]
pub(crate) struct Segmenter {
    segment_samples: i64,
    open: Option<Open>,
    /// The next segment opened starts a new epoch (after start or a restart).
    epoch_start: bool,
    pending_discontinuity: bool,
    last_index: Option<i64>,
}

impl Segmenter {
    pub(crate) fn new(segment_samples: u64) -> Self {
        assert!(segment_samples > 0, "validated by PackagerConfig");
        Self {
            segment_samples: i64::try_from(segment_samples).expect("validated: a few seconds"),
            open: None,
            epoch_start: true,
            pending_discontinuity: false,
            last_index: None,
        }
    }

    pub(crate) fn index_of(&self, pts: i64) -> i64 {
        pts.div_euclid(self.segment_samples)
    }

    /// Index of the last segment that received a packet, if any.
    pub(crate) fn last_index(&self) -> Option<i64> {
        self.last_index
    }

    /// Adds a packet; returns the segment it closed, if it belongs to a later segment.
    pub(crate) fn push(&mut self, packet: AacPacket) -> Option<Segment> {
        let mut index = self.index_of(packet.pts);
        let mut closed = None;
        match &self.open {
            Some(open) if index > open.index => closed = self.flush(),
            Some(open) => {
                // Within an epoch packet times only grow; a packet that maps to an earlier
                // index would be a bug upstream. Keep it in the open segment rather than
                // reopen a segment that may already be published.
                debug_assert!(index == open.index, "packet time went backwards");
                index = open.index;
            }
            None => {}
        }
        let open = self.open.get_or_insert_with(|| {
            let boundary = index * self.segment_samples;
            let partial = self.epoch_start && packet.pts != boundary;
            let discontinuity = std::mem::take(&mut self.pending_discontinuity);
            self.epoch_start = false;
            Open {
                index,
                start_pts: packet.pts,
                next_pts: packet.pts,
                samples: Vec::with_capacity(96),
                data: BytesMut::with_capacity(32 * 1024),
                partial,
                discontinuity,
            }
        });
        // Segment durations come from the packets themselves, so a packet that doesn't follow
        // its predecessor exactly (never expected from one encoder) would only show up as a
        // drift of tfdt vs. EXTINF; log it rather than silently accept it.
        if packet.pts != open.next_pts {
            tracing::warn!(
                expected = open.next_pts,
                got = packet.pts,
                "non-contiguous AAC packet"
            );
        }
        open.next_pts = packet.pts + i64::from(packet.duration);
        let size = u32::try_from(packet.data.len())
            .expect("an AAC frame is at most 6144 bytes per channel");
        open.samples.push(SampleInfo {
            size,
            duration: packet.duration,
        });
        open.data.extend_from_slice(&packet.data);
        self.last_index = Some(index);
        closed
    }

    /// Closes the open segment, if any (end of broadcast, or before a restart).
    pub(crate) fn flush(&mut self) -> Option<Segment> {
        let open = self.open.take()?;
        Some(Segment {
            index: open.index,
            start_pts: open.start_pts,
            duration: open.samples.iter().map(|s| u64::from(s.duration)).sum(),
            samples: open.samples,
            data: open.data.freeze(),
            partial: open.partial,
            discontinuity: open.discontinuity,
        })
    }

    /// Starts a new epoch: the next segment opened is flagged as a discontinuity when
    /// `discontinuity` is set, and as partial if it doesn't start on its boundary.
    pub(crate) fn restart(&mut self, discontinuity: bool) {
        debug_assert!(self.open.is_none(), "flush before restart");
        self.epoch_start = true;
        self.pending_discontinuity = discontinuity;
    }
}

/// Maps output media time to the origin's wall-clock capture time, from the frames seen.
///
/// Each real frame gives an anchor (media time, capture time); a time between anchors is
/// extrapolated from the latest anchor at or before it at the nominal 48 kHz rate. Silence
/// inserted for gaps therefore gets the capture time the lost frames would have had.
#[derive(Debug, Default)]
pub(crate) struct CaptureClock {
    anchors: VecDeque<(i64, u64)>,
}

/// Anchors older than this behind the newest are dropped (the encoder lags input by about two
/// AAC frames, so lookups never reach this far back).
const ANCHOR_HORIZON: i64 = 10 * 48_000;

impl CaptureClock {
    pub(crate) fn record(&mut self, pts: i64, capture_time_us: u64) {
        self.anchors.push_back((pts, capture_time_us));
        while let Some(&(front, _)) = self.anchors.front() {
            if pts - front > ANCHOR_HORIZON && self.anchors.len() > 1 {
                self.anchors.pop_front();
            } else {
                break;
            }
        }
    }

    pub(crate) fn clear(&mut self) {
        self.anchors.clear();
    }

    /// Capture time (µs since the Unix epoch) of the sample at `pts`.
    pub(crate) fn capture_time_at(&self, pts: i64) -> Option<u64> {
        let &(apts, acap) = self
            .anchors
            .iter()
            .rev()
            .find(|(p, _)| *p <= pts)
            .or_else(|| self.anchors.front())?;
        let delta_us = (pts - apts) as i128 * 1_000_000 / 48_000;
        u64::try_from(acap as i128 + delta_us).ok()
    }
}

#[cfg(test)]
mod tests {
    // In tests every unwrap is an assertion: if it fails, the test fails, as it should.
    use super::*;

    fn packet(pts: i64) -> AacPacket {
        AacPacket {
            pts,
            duration: 1024,
            data: Bytes::from(vec![0u8; 10]),
        }
    }

    /// Feeds `count` contiguous packets starting at `first_pts`, returns the closed segments
    /// (including the final flush).
    fn run(seg: &mut Segmenter, first_pts: i64, count: i64) -> Vec<Segment> {
        let mut out: Vec<Segment> = (0..count)
            .filter_map(|k| seg.push(packet(first_pts + k * 1024)))
            .collect();
        out.extend(seg.flush());
        out
    }

    #[test]
    fn boundaries_follow_media_time() {
        let mut seg = Segmenter::new(96_000);
        // Start at 0 with the encoder's priming packet at -1024, like a broadcast's very start.
        let out = run(&mut seg, -1024, 400);
        assert_eq!(out[0].index, -1);
        assert!(out[0].partial);
        for s in &out[1..] {
            let boundary = s.index * 96_000;
            // First packet is the first one at or after the boundary.
            assert!(
                s.start_pts >= boundary && s.start_pts < boundary + 1024,
                "{s:?}"
            );
            assert!(!s.partial);
        }
        // Complete segments are 93 or 94 frames.
        for s in &out[1..out.len() - 1] {
            assert!(
                s.samples.len() == 93 || s.samples.len() == 94,
                "{}",
                s.samples.len()
            );
            assert_eq!(s.duration, s.samples.len() as u64 * 1024);
        }
        // Contiguity: each segment starts where the previous ended.
        for pair in out.windows(2) {
            assert_eq!(
                pair[0].start_pts + pair[0].duration as i64,
                pair[1].start_pts
            );
            assert_eq!(pair[0].index + 1, pair[1].index);
        }
        // 4 segments of 2 s are exactly 375 frames, so 4 consecutive segments average 93.75.
        let four: usize = out[1..5].iter().map(|s| s.samples.len()).sum();
        assert_eq!(four, 375);
    }

    #[test]
    fn joining_mid_segment_marks_first_partial_and_names_match() {
        // Two packagers: one from the start, one joining 3.3 s in on a different frame phase.
        let mut a = Segmenter::new(96_000);
        let mut b = Segmenter::new(96_000);
        let out_a = run(&mut a, 0, 500);
        let out_b = run(&mut b, 158_400 + 300, 300);
        assert!(!out_a[0].partial, "starts on the boundary");
        assert!(out_b[0].partial);
        assert_eq!(out_b[0].index, 1);
        // Same names over the same media time, whatever the join point.
        for s in &out_b[1..out_b.len() - 1] {
            let twin = out_a
                .iter()
                .find(|x| x.index == s.index)
                .expect("same index");
            assert!((twin.start_pts - s.start_pts).abs() < 1024);
        }
    }

    #[test]
    fn restart_flags_discontinuity_once() {
        let mut seg = Segmenter::new(96_000);
        let _ = run(&mut seg, 0, 100);
        let last = seg.last_index().unwrap();
        seg.restart(true);
        let next = (last + 1) * 96_000;
        let out = run(&mut seg, next, 200);
        assert_eq!(out[0].index, last + 1);
        assert!(out[0].discontinuity && !out[0].partial);
        assert!(out[1..].iter().all(|s| !s.discontinuity));
    }

    #[test]
    fn capture_clock_interpolates_and_extrapolates() {
        let mut clock = CaptureClock::default();
        clock.record(0, 1_000_000);
        clock.record(960, 1_020_000);
        // Between anchors: from the earlier one.
        assert_eq!(clock.capture_time_at(480), Some(1_010_000));
        // After a gap: extrapolated from the latest anchor.
        assert_eq!(clock.capture_time_at(960 + 48_000), Some(2_020_000));
        // Before the first anchor (the priming frame): extrapolated backwards.
        assert_eq!(clock.capture_time_at(-1024), Some(1_000_000 - 21_333));
        // Old anchors are pruned but the newest always stays.
        clock.record(ANCHOR_HORIZON * 3, 9_000_000);
        assert_eq!(clock.anchors.len(), 1);
    }
}
