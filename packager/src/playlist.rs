//! Live media playlists (sliding window) and the master playlist, as plain data (sans-IO).
//!
//! Rendering goes through `m3u8-rs`, so the tags are spelled by a library that also parses them.

use std::collections::VecDeque;

use bytes::Bytes;
use m3u8_rs::{Map, MasterPlaylist, MediaPlaylist, MediaSegment, VariantStream};

/// HLS protocol version: 7 covers EXT-X-MAP in a playlist without I-frames-only (6+) and
/// everything else used here.
const VERSION: usize = 7;

/// A segment as the playlist sees it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    pub(crate) index: u64,
    /// Real duration, seconds.
    pub(crate) duration: f64,
    /// Capture time of the first sample, µs since the Unix epoch.
    pub(crate) program_date_time_us: Option<u64>,
    pub(crate) discontinuity: bool,
}

/// The sliding window of one rendition.
#[derive(Debug)]
pub(crate) struct LivePlaylist {
    window: usize,
    /// How many segments stay stored after leaving the window, for players that loaded an
    /// older playlist and are still fetching them.
    grace: usize,
    target_duration: u64,
    live: VecDeque<Entry>,
    expired: VecDeque<u64>,
    discontinuity_sequence: u64,
    ended: bool,
    /// Recording: every segment stays in the playlist and nothing is ever deletable; the
    /// playlist is an EVENT playlist while live and a VOD playlist once ended.
    record: bool,
}

impl LivePlaylist {
    pub(crate) fn new(window: usize, grace: usize, target_duration: u64) -> Self {
        assert!(window > 0, "validated by PackagerConfig");
        Self {
            window,
            grace,
            target_duration,
            live: VecDeque::with_capacity(window.min(64) + 1),
            expired: VecDeque::with_capacity(grace.min(64) + 1),
            discontinuity_sequence: 0,
            ended: false,
            record: false,
        }
    }

    /// A playlist that keeps every segment of the broadcast (EXT-X-PLAYLIST-TYPE:EVENT while
    /// live, VOD once ended).
    pub(crate) fn recording(target_duration: u64) -> Self {
        Self {
            record: true,
            ..Self::new(usize::MAX, 0, target_duration)
        }
    }

    /// Appends a segment; returns the indices of segments that are now past the grace period and
    /// may be deleted (only after the playlist rendered next has been stored).
    pub(crate) fn push(&mut self, entry: Entry) -> Vec<u64> {
        if let Some(last) = self.live.back() {
            // Media sequence numbers are segment indices, so they must be contiguous or a
            // player would misnumber the window.
            debug_assert_eq!(
                last.index + 1,
                entry.index,
                "segment indices must be contiguous"
            );
        }
        self.live.push_back(entry);
        let mut deletable = Vec::new();
        if self.record {
            return deletable;
        }
        while self.live.len() > self.window {
            let Some(old) = self.live.pop_front() else {
                break;
            };
            if old.discontinuity {
                // RFC 8216 §4.3.3.3: counts the discontinuity tags that left the playlist.
                self.discontinuity_sequence += 1;
            }
            self.expired.push_back(old.index);
        }
        while self.expired.len() > self.grace {
            deletable.extend(self.expired.pop_front());
        }
        deletable
    }

    pub(crate) fn end(&mut self) {
        self.ended = true;
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    pub(crate) fn media_sequence(&self) -> Option<u64> {
        self.live.front().map(|e| e.index)
    }

    /// The playlist as m3u8-rs data.
    pub(crate) fn to_m3u8(&self) -> MediaPlaylist {
        let segments = self
            .live
            .iter()
            .enumerate()
            .map(|(i, e)| MediaSegment {
                uri: segment_uri(e.index),
                // EXTINF is f32 in m3u8-rs; sub-microsecond precision is irrelevant here.
                duration: e.duration as f32,
                discontinuity: e.discontinuity,
                // One EXT-X-MAP before the first segment applies to all that follow.
                map: (i == 0).then(|| Map {
                    uri: "init.mp4".to_owned(),
                    ..Map::default()
                }),
                program_date_time: e.program_date_time_us.and_then(date_time),
                ..MediaSegment::default()
            })
            .collect();
        MediaPlaylist {
            version: Some(VERSION),
            target_duration: self.target_duration,
            media_sequence: self.media_sequence().unwrap_or(0),
            discontinuity_sequence: self.discontinuity_sequence,
            segments,
            end_list: self.ended,
            independent_segments: true,
            playlist_type: match (self.record, self.ended) {
                (false, _) => None,
                (true, false) => Some(m3u8_rs::MediaPlaylistType::Event),
                (true, true) => Some(m3u8_rs::MediaPlaylistType::Vod),
            },
            ..MediaPlaylist::default()
        }
    }

    pub(crate) fn render(&self) -> Bytes {
        render_with(|w| self.to_m3u8().write_to(w))
    }
}

/// Target duration for a segment length: the longest segment is one AAC frame (1024 samples)
/// longer than nominal, and RFC 8216 requires EXTINF rounded to the nearest integer to be at
/// most EXT-X-TARGETDURATION. It must stay constant for the life of the playlist, so it is
/// derived from the configuration, never from observed segments.
pub(crate) fn target_duration(segment_samples: u64) -> u64 {
    let longest = segment_samples + 1024;
    // round half up, in integer arithmetic
    ((longest + 24_000) / 48_000).max(1)
}

pub(crate) fn segment_uri(index: u64) -> String {
    format!("{index}.m4s")
}

/// One variant of the master playlist.
#[derive(Debug, Clone)]
pub(crate) struct Variant {
    pub(crate) name: String,
    pub(crate) bandwidth: u64,
    pub(crate) average_bandwidth: u64,
}

/// The RFC 6381 codec string of AAC-LC (MPEG-4 audio object type 2).
pub(crate) const AAC_LC_CODECS: &str = "mp4a.40.2";

pub(crate) fn master_m3u8(variants: &[Variant]) -> MasterPlaylist {
    MasterPlaylist {
        version: Some(VERSION),
        independent_segments: true,
        variants: variants
            .iter()
            .map(|v| VariantStream {
                uri: format!("{}/index.m3u8", v.name),
                bandwidth: v.bandwidth,
                average_bandwidth: Some(v.average_bandwidth),
                codecs: Some(AAC_LC_CODECS.to_owned()),
                ..VariantStream::default()
            })
            .collect(),
        ..MasterPlaylist::default()
    }
}

pub(crate) fn render_master(variants: &[Variant]) -> Bytes {
    render_with(|w| master_m3u8(variants).write_to(w))
}

fn render_with(write: impl FnOnce(&mut Vec<u8>) -> std::io::Result<()>) -> Bytes {
    let mut out = Vec::with_capacity(1024);
    // Writing into a Vec cannot fail: io::Write for Vec<u8> never returns an error.
    write(&mut out).expect("writing to a Vec is infallible");
    Bytes::from(out)
}

/// EXT-X-PROGRAM-DATE-TIME as rendered: m3u8-rs writes milliseconds, so truncate here and the
/// playlist data equals what a parser reads back.
fn date_time(us: u64) -> Option<chrono::DateTime<chrono::FixedOffset>> {
    let us = i64::try_from(us / 1000 * 1000).ok()?;
    chrono::DateTime::from_timestamp_micros(us).map(|t| t.fixed_offset())
}

#[cfg(test)]
mod tests {
    // In tests every unwrap is an assertion: if it fails, the test fails, as it should.
    use super::*;
    use m3u8_rs::Playlist;

    fn entry(index: u64) -> Entry {
        Entry {
            index,
            duration: if index.is_multiple_of(4) {
                1.984
            } else {
                2.005333
            },
            program_date_time_us: Some(1_700_000_000_000_000 + index * 2_000_000),
            discontinuity: false,
        }
    }

    fn parse(bytes: &[u8]) -> MediaPlaylist {
        match m3u8_rs::parse_playlist_res(bytes) {
            Ok(Playlist::MediaPlaylist(p)) => p,
            other => panic!("not a media playlist: {other:?}"),
        }
    }

    #[test]
    fn window_slides_and_media_sequence_is_first_index() {
        let mut pl = LivePlaylist::new(3, 3, 2);
        let mut deleted = Vec::new();
        for i in 10..20 {
            deleted.extend(pl.push(entry(i)));
            let parsed = parse(&pl.render());
            let expected_first = i.saturating_sub(2).max(10);
            assert_eq!(parsed.media_sequence, expected_first);
            assert_eq!(parsed.segments.len(), (i - 10 + 1).min(3) as usize);
            assert_eq!(parsed.segments.last().unwrap().uri, format!("{i}.m4s"));
            // Only segments that left the window a full grace ago are deletable.
            for d in &deleted {
                assert!(*d + 3 + 3 <= i, "deleted {d} too early at {i}");
            }
        }
        // 10 pushed, 3 live, 3 in grace → 4 deleted, oldest first.
        assert_eq!(deleted, vec![10, 11, 12, 13]);
    }

    #[test]
    fn round_trip_through_parser() {
        let mut pl = LivePlaylist::new(3, 3, target_duration(96_000));
        for i in 0..5 {
            pl.push(entry(i));
        }
        let rendered = pl.render();
        let text = std::str::from_utf8(&rendered).unwrap();
        assert!(text.contains("#EXT-X-VERSION:7"));
        assert!(text.contains("#EXT-X-INDEPENDENT-SEGMENTS"));
        assert!(text.contains("#EXT-X-MAP:URI=\"init.mp4\""));
        assert_eq!(text.matches("#EXT-X-PROGRAM-DATE-TIME:").count(), 3);
        assert!(!text.contains("#EXT-X-ENDLIST"));
        let parsed = parse(&rendered);
        assert_eq!(parsed, pl.to_m3u8(), "parse(render(p)) == p");
        assert_eq!(parsed.target_duration, 2);
        for s in &parsed.segments {
            assert!((s.duration.round() as u64) <= parsed.target_duration);
        }
        pl.end();
        let ended = parse(&pl.render());
        assert!(ended.end_list);
    }

    #[test]
    fn discontinuity_sequence_counts_tags_that_left() {
        let mut pl = LivePlaylist::new(3, 3, 2);
        for i in 0..3 {
            pl.push(entry(i));
        }
        pl.push(Entry {
            discontinuity: true,
            ..entry(3)
        });
        let p = parse(&pl.render());
        assert_eq!(p.discontinuity_sequence, 0);
        assert!(p.segments[2].discontinuity);
        for i in 4..7 {
            pl.push(entry(i));
        }
        // Segment 3 (with the tag) has left the window.
        let p = parse(&pl.render());
        assert_eq!(p.media_sequence, 4);
        assert_eq!(p.discontinuity_sequence, 1);
        assert!(p.segments.iter().all(|s| !s.discontinuity));
    }

    #[test]
    fn recording_keeps_everything_and_ends_as_vod() {
        let mut pl = LivePlaylist::recording(2);
        for i in 0..50 {
            assert!(pl.push(entry(i)).is_empty(), "nothing is ever deletable");
        }
        let text = String::from_utf8(pl.render().to_vec()).unwrap();
        assert!(text.contains("#EXT-X-PLAYLIST-TYPE:EVENT"), "{text}");
        let p = parse(&pl.render());
        assert_eq!(p.media_sequence, 0);
        assert_eq!(p.segments.len(), 50);
        pl.end();
        let text = String::from_utf8(pl.render().to_vec()).unwrap();
        assert!(text.contains("#EXT-X-PLAYLIST-TYPE:VOD"), "{text}");
        assert!(text.contains("#EXT-X-ENDLIST"));
        assert_eq!(parse(&pl.render()), pl.to_m3u8());
    }

    #[test]
    fn target_duration_covers_longest_segment() {
        assert_eq!(target_duration(96_000), 2);
        assert_eq!(target_duration(6 * 48_000), 6);
        // 1.5 s + one frame = 1.52 s → rounds to 2.
        assert_eq!(target_duration(72_000), 2);
        assert_eq!(target_duration(1024), 1);
    }

    #[test]
    fn master_round_trip() {
        let variants = vec![
            Variant {
                name: "64k".into(),
                bandwidth: 80_000,
                average_bandwidth: 68_000,
            },
            Variant {
                name: "128k".into(),
                bandwidth: 160_000,
                average_bandwidth: 132_000,
            },
        ];
        let rendered = render_master(&variants);
        let parsed = match m3u8_rs::parse_playlist_res(&rendered) {
            Ok(Playlist::MasterPlaylist(p)) => p,
            other => panic!("not a master playlist: {other:?}"),
        };
        assert_eq!(parsed, master_m3u8(&variants));
        assert_eq!(parsed.variants[1].uri, "128k/index.m3u8");
        assert_eq!(parsed.variants[0].codecs.as_deref(), Some(AAC_LC_CODECS));
    }
}
