//! Fragmented MP4 (CMAF-style) boxes for one AAC audio track, written by hand.
//!
//! Why by hand: the `mp4` crate (0.14) cannot write fragmented MP4 — its writer only produces a
//! regular progressive MP4, drops `mvex` when writing `moov`, keeps most box types private and has
//! no `styp`. The boxes an audio-only CMAF track needs are few and fixed, so a small writer here
//! is cheaper than a dependency that would have to be worked around.
//!
//! Layout produced (all times in [`TIMESCALE`] units, one track with id [`TRACK_ID`]):
//! - init segment: `ftyp`, `moov{mvhd, trak{tkhd, mdia{mdhd, hdlr(soun), minf{smhd, dinf{dref},
//!   stbl{stsd{mp4a{esds}}, stts, stsc, stsz, stco}}}}, mvex{trex}}` — the sample tables are
//!   empty because every sample lives in a fragment.
//! - media segment: `styp`, `moof{mfhd, traf{tfhd(default-base-is-moof), tfdt(v1), trun}}`, `mdat`.

use bytes::Bytes;

/// Media timescale: one tick per 48 kHz sample, so AAC packet times map 1:1.
pub(crate) const TIMESCALE: u32 = 48_000;
/// The single track's id.
pub(crate) const TRACK_ID: u32 = 1;

/// `tfhd` flag: offsets are relative to the start of the `moof` (required by CMAF, and it lets
/// a segment be parsed without knowing where it sits in a file).
const TFHD_DEFAULT_BASE_IS_MOOF: u32 = 0x02_0000;
const TRUN_DATA_OFFSET_PRESENT: u32 = 0x00_0001;
const TRUN_SAMPLE_DURATION_PRESENT: u32 = 0x00_0100;
const TRUN_SAMPLE_SIZE_PRESENT: u32 = 0x00_0200;

/// What the init segment needs to describe the AAC track.
#[derive(Debug, Clone)]
pub(crate) struct TrackConfig<'a> {
    pub(crate) channels: u16,
    pub(crate) sample_rate: u32,
    /// AudioSpecificConfig from the encoder's extradata.
    pub(crate) audio_specific_config: &'a [u8],
    /// Target bitrate, bits/s (esds avgBitrate).
    pub(crate) avg_bitrate: u32,
    /// Peak bitrate, bits/s (esds maxBitrate).
    pub(crate) max_bitrate: u32,
}

/// One AAC access unit in a fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SampleInfo {
    pub(crate) size: u32,
    /// In [`TIMESCALE`] ticks.
    pub(crate) duration: u32,
}

/// Builds boxes into one buffer; box sizes are patched when a box is closed, so nesting is
/// expressed by closures and can't be left unbalanced.
struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    fn new() -> Self {
        Self {
            buf: Vec::with_capacity(1024),
        }
    }

    fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }
    fn zeros(&mut self, n: usize) {
        self.buf.resize(self.buf.len() + n, 0);
    }

    fn boxed(&mut self, kind: &[u8; 4], body: impl FnOnce(&mut Self)) {
        let start = self.buf.len();
        self.u32(0); // size, patched below
        self.bytes(kind);
        body(self);
        let size = u32::try_from(self.buf.len() - start)
            .expect("boxes here are far below 4 GiB: a segment holds seconds of audio");
        self.buf[start..start + 4].copy_from_slice(&size.to_be_bytes());
    }

    fn full_box(&mut self, kind: &[u8; 4], version: u8, flags: u32, body: impl FnOnce(&mut Self)) {
        self.boxed(kind, |w| {
            w.u32((u32::from(version) << 24) | (flags & 0x00ff_ffff));
            body(w);
        });
    }

    /// The unity transformation matrix of mvhd/tkhd.
    fn matrix(&mut self) {
        for v in [0x0001_0000u32, 0, 0, 0, 0x0001_0000, 0, 0, 0, 0x4000_0000] {
            self.u32(v);
        }
    }

    /// An MPEG-4 descriptor (ISO 14496-1) with its variable-length size.
    fn descriptor(&mut self, tag: u8, body: impl FnOnce(&mut Self)) {
        let mut inner = Self::new();
        body(&mut inner);
        self.u8(tag);
        let len = inner.buf.len();
        // Size in 7-bit groups, most significant first, continuation bit on all but the last.
        let mut groups = Vec::with_capacity(4);
        let mut rest = len;
        loop {
            groups.push((rest & 0x7f) as u8);
            rest >>= 7;
            if rest == 0 {
                break;
            }
        }
        for (i, g) in groups.iter().rev().enumerate() {
            let more = i + 1 < groups.len();
            self.u8(if more { g | 0x80 } else { *g });
        }
        self.bytes(&inner.buf);
    }
}

/// The init segment (`init.mp4`) for one rendition.
pub(crate) fn init_segment(track: &TrackConfig<'_>) -> Bytes {
    let mut w = Writer::new();
    w.boxed(b"ftyp", |w| {
        w.bytes(b"iso6"); // major brand: fragments need ISO BMFF v6 semantics (tfdt, styp)
        w.u32(0);
        for brand in [b"iso6", b"cmfc", b"mp41"] {
            w.bytes(brand);
        }
    });
    w.boxed(b"moov", |w| {
        w.full_box(b"mvhd", 0, 0, |w| {
            w.u32(0); // creation time: unknown, and a fixed value keeps init segments identical
            w.u32(0); // modification time
            w.u32(TIMESCALE);
            w.u32(0); // duration: unknown (live)
            w.u32(0x0001_0000); // rate 1.0
            w.u16(0x0100); // volume 1.0
            w.zeros(2 + 8);
            w.matrix();
            w.zeros(6 * 4); // pre_defined
            w.u32(TRACK_ID + 1); // next_track_ID
        });
        w.boxed(b"trak", |w| {
            // flags: track enabled | in movie
            w.full_box(b"tkhd", 0, 0x3, |w| {
                w.u32(0);
                w.u32(0);
                w.u32(TRACK_ID);
                w.u32(0); // reserved
                w.u32(0); // duration
                w.zeros(8);
                w.u16(0); // layer
                w.u16(0); // alternate group
                w.u16(0x0100); // volume: audio track
                w.u16(0);
                w.matrix();
                w.u32(0); // width
                w.u32(0); // height
            });
            w.boxed(b"mdia", |w| {
                w.full_box(b"mdhd", 0, 0, |w| {
                    w.u32(0);
                    w.u32(0);
                    w.u32(TIMESCALE);
                    w.u32(0);
                    w.u16(0x55c4); // language "und", packed ISO-639-2/T
                    w.u16(0);
                });
                w.full_box(b"hdlr", 0, 0, |w| {
                    w.u32(0);
                    w.bytes(b"soun");
                    w.zeros(12);
                    w.bytes(b"SoundHandler\0");
                });
                w.boxed(b"minf", |w| {
                    w.full_box(b"smhd", 0, 0, |w| {
                        w.u16(0); // balance
                        w.u16(0);
                    });
                    w.boxed(b"dinf", |w| {
                        w.full_box(b"dref", 0, 0, |w| {
                            w.u32(1);
                            // flag 1: media data is in this file
                            w.full_box(b"url ", 0, 1, |_| {});
                        });
                    });
                    w.boxed(b"stbl", |w| {
                        w.full_box(b"stsd", 0, 0, |w| {
                            w.u32(1);
                            mp4a(w, track);
                        });
                        w.full_box(b"stts", 0, 0, |w| w.u32(0));
                        w.full_box(b"stsc", 0, 0, |w| w.u32(0));
                        w.full_box(b"stsz", 0, 0, |w| {
                            w.u32(0); // sample_size: per sample
                            w.u32(0); // sample_count
                        });
                        w.full_box(b"stco", 0, 0, |w| w.u32(0));
                    });
                });
            });
        });
        w.boxed(b"mvex", |w| {
            w.full_box(b"trex", 0, 0, |w| {
                w.u32(TRACK_ID);
                w.u32(1); // default_sample_description_index
                w.u32(1024); // default_sample_duration: one AAC-LC frame
                w.u32(0); // default_sample_size
                w.u32(0); // default_sample_flags: every AAC frame is a sync sample
            });
        });
    });
    Bytes::from(w.buf)
}

fn mp4a(w: &mut Writer, track: &TrackConfig<'_>) {
    w.boxed(b"mp4a", |w| {
        w.zeros(6);
        w.u16(1); // data_reference_index
        w.zeros(8);
        w.u16(track.channels);
        w.u16(16); // samplesize
        w.u16(0);
        w.u16(0);
        // 16.16 fixed point; 48000 fits in 16 bits.
        w.u32(track.sample_rate << 16);
        w.full_box(b"esds", 0, 0, |w| {
            w.descriptor(0x03, |w| {
                // ES_Descriptor
                w.u16(0); // ES_ID (0: not used in MP4)
                w.u8(0); // no dependsOn, URL or OCR stream
                w.descriptor(0x04, |w| {
                    // DecoderConfigDescriptor
                    w.u8(0x40); // objectTypeIndication: MPEG-4 Audio
                    w.u8((0x05 << 2) | 1); // streamType audio, upStream 0, reserved 1
                    w.bytes(&[0, 0x18, 0]); // bufferSizeDB: 6144 bytes, the AAC max per frame/channel
                    w.u32(track.max_bitrate);
                    w.u32(track.avg_bitrate);
                    w.descriptor(0x05, |w| w.bytes(track.audio_specific_config));
                });
                w.descriptor(0x06, |w| w.u8(0x02)); // SLConfigDescriptor: predefined for MP4
            });
        });
    });
}

/// One media segment (`{index}.m4s`): `styp`, `moof`, `mdat`.
///
/// `sequence_number` must increase from one fragment to the next of a track; `base_decode_time`
/// is the decode time of the first sample (tfdt), in [`TIMESCALE`] ticks. `data` is the
/// concatenation of the samples, in order.
pub(crate) fn media_segment(
    sequence_number: u32,
    base_decode_time: u64,
    samples: &[SampleInfo],
    data: &[u8],
) -> Bytes {
    debug_assert_eq!(
        samples.iter().map(|s| s.size as usize).sum::<usize>(),
        data.len(),
        "sample sizes must cover the mdat payload exactly"
    );
    let sample_count = u32::try_from(samples.len())
        .expect("a segment of seconds holds far fewer than 2^32 frames");
    let mut w = Writer::new();
    w.boxed(b"styp", |w| {
        w.bytes(b"msdh");
        w.u32(0);
        for brand in [b"msdh", b"msix", b"cmfs"] {
            w.bytes(brand);
        }
    });
    let moof_start = w.buf.len();
    let mut data_offset_at = 0;
    w.boxed(b"moof", |w| {
        w.full_box(b"mfhd", 0, 0, |w| w.u32(sequence_number));
        w.boxed(b"traf", |w| {
            w.full_box(b"tfhd", 0, TFHD_DEFAULT_BASE_IS_MOOF, |w| w.u32(TRACK_ID));
            // Version 1: a 64-bit decode time never wraps, however long the broadcast.
            w.full_box(b"tfdt", 1, 0, |w| w.u64(base_decode_time));
            let flags =
                TRUN_DATA_OFFSET_PRESENT | TRUN_SAMPLE_DURATION_PRESENT | TRUN_SAMPLE_SIZE_PRESENT;
            w.full_box(b"trun", 0, flags, |w| {
                w.u32(sample_count);
                data_offset_at = w.buf.len();
                w.u32(0); // data_offset, patched once the moof size is known
                for s in samples {
                    w.u32(s.duration);
                    w.u32(s.size);
                }
            });
        });
    });
    // The payload starts right after the mdat header (8 bytes), counted from the moof start.
    let data_offset = w.buf.len() - moof_start + 8;
    let data_offset = u32::try_from(data_offset).expect("moof is a few KiB at most");
    w.buf[data_offset_at..data_offset_at + 4].copy_from_slice(&data_offset.to_be_bytes());
    w.boxed(b"mdat", |w| w.bytes(data));
    Bytes::from(w.buf)
}

#[cfg(test)]
pub(crate) mod tests {
    // In tests every unwrap is an assertion: if it fails, the test fails, as it should.
    use super::*;

    /// A parsed box: kind, where its body starts, and its body.
    #[derive(Debug)]
    pub(crate) struct RawBox<'a> {
        pub(crate) kind: [u8; 4],
        pub(crate) offset: usize,
        pub(crate) body: &'a [u8],
    }

    /// Splits `data` into consecutive boxes, failing if sizes don't tile it exactly.
    pub(crate) fn boxes(data: &[u8], base: usize) -> Vec<RawBox<'_>> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < data.len() {
            assert!(pos + 8 <= data.len(), "truncated box header at {pos}");
            let size = u32::from_be_bytes(data[pos..pos + 4].try_into().unwrap()) as usize;
            assert!(
                size >= 8 && pos + size <= data.len(),
                "bad box size {size} at {pos}"
            );
            let kind: [u8; 4] = data[pos + 4..pos + 8].try_into().unwrap();
            out.push(RawBox {
                kind,
                offset: base + pos,
                body: &data[pos + 8..pos + size],
            });
            pos += size;
        }
        out
    }

    fn kinds(list: &[RawBox<'_>]) -> Vec<String> {
        list.iter()
            .map(|b| String::from_utf8_lossy(&b.kind).into_owned())
            .collect()
    }

    fn child<'a>(list: &'a [RawBox<'a>], kind: &[u8; 4]) -> &'a RawBox<'a> {
        list.iter()
            .find(|b| &b.kind == kind)
            .unwrap_or_else(|| panic!("missing {}", String::from_utf8_lossy(kind)))
    }

    fn be32(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
    }

    const ASC: [u8; 2] = [0x11, 0x90]; // AAC-LC, 48 kHz, stereo

    fn init() -> Bytes {
        init_segment(&TrackConfig {
            channels: 2,
            sample_rate: 48_000,
            audio_specific_config: &ASC,
            avg_bitrate: 64_000,
            max_bitrate: 80_000,
        })
    }

    #[test]
    fn init_segment_nesting() {
        let data = init();
        let top = boxes(&data, 0);
        assert_eq!(kinds(&top), ["ftyp", "moov"]);
        let moov = boxes(child(&top, b"moov").body, 0);
        assert_eq!(kinds(&moov), ["mvhd", "trak", "mvex"]);
        // mvhd v0: version/flags, 2 times, then the timescale.
        assert_eq!(be32(child(&moov, b"mvhd").body, 12), TIMESCALE);
        let trak = boxes(child(&moov, b"trak").body, 0);
        assert_eq!(kinds(&trak), ["tkhd", "mdia"]);
        assert_eq!(be32(child(&trak, b"tkhd").body, 12), TRACK_ID);
        let mdia = boxes(child(&trak, b"mdia").body, 0);
        assert_eq!(kinds(&mdia), ["mdhd", "hdlr", "minf"]);
        assert_eq!(be32(child(&mdia, b"mdhd").body, 12), TIMESCALE);
        assert_eq!(&child(&mdia, b"hdlr").body[8..12], b"soun");
        let minf = boxes(child(&mdia, b"minf").body, 0);
        assert_eq!(kinds(&minf), ["smhd", "dinf", "stbl"]);
        let stbl = boxes(child(&minf, b"stbl").body, 0);
        assert_eq!(kinds(&stbl), ["stsd", "stts", "stsc", "stsz", "stco"]);
        // stsd: version/flags + entry count, then the sample entry.
        let stsd = child(&stbl, b"stsd");
        assert_eq!(be32(stsd.body, 4), 1);
        let entries = boxes(&stsd.body[8..], 0);
        assert_eq!(kinds(&entries), ["mp4a"]);
        let mp4a = entries[0].body;
        assert_eq!(u16::from_be_bytes([mp4a[16], mp4a[17]]), 2, "channel count");
        assert_eq!(be32(mp4a, 24) >> 16, 48_000, "sample rate");
        let inner = boxes(&mp4a[28..], 0);
        assert_eq!(kinds(&inner), ["esds"]);
        // The AudioSpecificConfig sits in the DecSpecificInfo descriptor (tag 5, length 2).
        let esds = inner[0].body;
        let pos = esds
            .windows(2)
            .position(|w| w == [0x05, ASC.len() as u8])
            .expect("tag 5");
        assert_eq!(&esds[pos + 2..pos + 2 + ASC.len()], ASC);
        let mvex = boxes(child(&moov, b"mvex").body, 0);
        assert_eq!(kinds(&mvex), ["trex"]);
        assert_eq!(be32(mvex[0].body, 4), TRACK_ID);
    }

    #[test]
    fn descriptor_length_uses_continuation_bits() {
        let mut w = Writer::new();
        w.descriptor(0x05, |w| w.zeros(200));
        // 200 = 0b1_1001000 → 0x81 0x48
        assert_eq!(&w.buf[..3], &[0x05, 0x81, 0x48]);
        assert_eq!(w.buf.len(), 3 + 200);
    }

    #[test]
    fn media_segment_layout_and_offsets() {
        let samples: Vec<SampleInfo> = (0..5u32)
            .map(|i| SampleInfo {
                size: 100 + i,
                duration: 1024,
            })
            .collect();
        let data: Vec<u8> = samples
            .iter()
            .enumerate()
            .flat_map(|(i, s)| std::iter::repeat_n(i as u8, s.size as usize))
            .collect();
        let tfdt = 5_000_000_000u64; // beyond 32 bits: needs tfdt v1
        let seg = media_segment(42, tfdt, &samples, &data);
        let top = boxes(&seg, 0);
        assert_eq!(kinds(&top), ["styp", "moof", "mdat"]);
        let moof = child(&top, b"moof");
        let moof_start = moof.offset;
        let moof_children = boxes(moof.body, 0);
        assert_eq!(kinds(&moof_children), ["mfhd", "traf"]);
        assert_eq!(be32(moof_children[0].body, 4), 42);
        let traf = boxes(child(&moof_children, b"traf").body, 0);
        assert_eq!(kinds(&traf), ["tfhd", "tfdt", "trun"]);
        let tfhd = child(&traf, b"tfhd").body;
        assert_eq!(be32(tfhd, 0) & 0x00ff_ffff, TFHD_DEFAULT_BASE_IS_MOOF);
        let tfdt_box = child(&traf, b"tfdt").body;
        assert_eq!(tfdt_box[0], 1, "tfdt version");
        assert_eq!(
            u64::from_be_bytes(tfdt_box[4..12].try_into().unwrap()),
            tfdt
        );
        let trun = child(&traf, b"trun").body;
        assert_eq!(be32(trun, 4), 5, "sample count");
        let data_offset = be32(trun, 8) as usize;
        for (i, s) in samples.iter().enumerate() {
            assert_eq!(be32(trun, 12 + i * 8), s.duration);
            assert_eq!(be32(trun, 16 + i * 8), s.size);
        }
        // data_offset (from the moof start, since default-base-is-moof) lands on the mdat payload.
        let mdat = child(&top, b"mdat");
        assert_eq!(moof_start + data_offset, mdat.offset + 8);
        assert_eq!(mdat.body, &data[..]);
        assert_eq!(&seg[moof_start + data_offset..][..100], &data[..100]);
    }
}
