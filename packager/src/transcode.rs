//! Opus → PCM → AAC-LC with FFmpeg (through ffmpeg-next 9, FFmpeg 5.1's channel API).
//!
//! The broadcast is decoded once ([`OpusDecoder`]); PCM goes through a [`Fifo`] because Opus
//! frames are 960 samples and AAC-LC frames 1024; each rendition has its own [`AacEncoder`].
//! Times are 48 kHz sample counts throughout, so packet times follow media time.

use std::sync::Once;

use bytes::Bytes;
use ffmpeg::codec;
use ffmpeg::format::sample::{Sample, Type as SampleType};
use ffmpeg::frame;
use ffmpeg::ChannelLayout;
use ffmpeg_next as ffmpeg;

use crate::segment::AacPacket;
use crate::Error;

pub(crate) const SAMPLE_RATE: u32 = 48_000;
/// Samples per AAC-LC frame.
pub(crate) const AAC_FRAME: usize = 1024;

const PLANAR_F32: Sample = Sample::F32(SampleType::Planar);

static INIT: Once = Once::new();

/// Initialises FFmpeg once per process and keeps its logging from spamming stderr on the
/// malformed packets we count ourselves.
fn init_ffmpeg() -> Result<(), Error> {
    let mut result = Ok(());
    INIT.call_once(|| {
        result = ffmpeg::init().map_err(|source| Error::Codec {
            what: "ffmpeg init",
            source,
        });
        ffmpeg::util::log::set_level(ffmpeg::util::log::Level::Fatal);
    });
    result
}

pub(crate) fn layout(channels: u16) -> ChannelLayout {
    if channels == 1 {
        ChannelLayout::MONO
    } else {
        ChannelLayout::STEREO
    }
}

/// Wraps a codec error with what we were doing.
fn codec_err(what: &'static str) -> impl FnOnce(ffmpeg::Error) -> Error {
    move |source| Error::Codec { what, source }
}

fn is_again(e: &ffmpeg::Error) -> bool {
    matches!(e, ffmpeg::Error::Other { errno } if *errno == ffmpeg::util::error::EAGAIN)
        || matches!(e, ffmpeg::Error::Eof)
}

/// Planar f32 PCM queue between the decoder and the encoders.
///
/// ffmpeg-next has no wrapper for FFmpeg's `AVAudioFifo`; a `Vec` per channel is all we need.
#[derive(Debug)]
pub(crate) struct Fifo {
    channels: Vec<Vec<f32>>,
    /// Media time of the first queued sample.
    start_pts: i64,
}

impl Fifo {
    pub(crate) fn new(channels: u16) -> Self {
        Self {
            channels: vec![Vec::with_capacity(4 * AAC_FRAME); usize::from(channels)],
            start_pts: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.channels[0].len()
    }

    /// Media time just after the last queued sample.
    pub(crate) fn end_pts(&self) -> i64 {
        self.start_pts + self.len() as i64
    }

    /// Empties the queue and restarts it at `pts`.
    pub(crate) fn reset(&mut self, pts: i64) {
        for c in &mut self.channels {
            c.clear();
        }
        self.start_pts = pts;
    }

    pub(crate) fn push_silence(&mut self, samples: usize) {
        for c in &mut self.channels {
            c.resize(c.len() + samples, 0.0);
        }
    }

    /// Appends a decoded frame, converting its layout to ours: planar or packed f32, and a
    /// channel count that may differ (mono is duplicated, extra channels dropped).
    fn push_frame(&mut self, decoded: &frame::Audio) -> Result<usize, Error> {
        let n = decoded.samples();
        let src_channels = usize::from(decoded.channels()).max(1);
        match decoded.format() {
            Sample::F32(SampleType::Planar) => {
                for (ch, dst) in self.channels.iter_mut().enumerate() {
                    let plane = decoded.plane::<f32>(ch.min(src_channels - 1));
                    dst.extend_from_slice(&plane[..n]);
                }
            }
            Sample::F32(SampleType::Packed) => {
                // plane::<f32>(0) of a packed frame is n * channels interleaved values.
                let data: &[f32] = decoded.plane::<f32>(0);
                for (ch, dst) in self.channels.iter_mut().enumerate() {
                    let c = ch.min(src_channels - 1);
                    dst.extend((0..n).map(|i| data[i * src_channels + c]));
                }
            }
            other => return Err(Error::UnsupportedSampleFormat(format!("{other:?}"))),
        }
        Ok(n)
    }

    #[cfg(test)]
    /// Takes one AAC frame's worth of samples into `frame` (planar f32, 1024 samples) and sets
    /// its pts. Returns false if fewer than 1024 samples are queued.
    fn pop_frame(&mut self, frame: &mut frame::Audio) -> bool {
        if self.len() < AAC_FRAME {
            return false;
        }
        for (ch, src) in self.channels.iter_mut().enumerate() {
            frame.plane_mut::<f32>(ch)[..AAC_FRAME].copy_from_slice(&src[..AAC_FRAME]);
            src.drain(..AAC_FRAME);
        }
        frame.set_pts(Some(self.start_pts));
        self.start_pts += AAC_FRAME as i64;
        true
    }

    /// Pads the queue with silence up to a whole AAC frame (before flushing the encoders).
    pub(crate) fn pad_to_frame(&mut self) {
        let rem = self.len() % AAC_FRAME;
        if rem != 0 {
            self.push_silence(AAC_FRAME - rem);
        }
    }
}

/// FFmpeg's `opus` decoder fed raw packets (no OpusHead, as from RTP).
pub(crate) struct OpusDecoder {
    decoder: codec::decoder::Audio,
    decoded: frame::Audio,
}

impl OpusDecoder {
    pub(crate) fn new(channels: u16) -> Result<Self, Error> {
        init_ffmpeg()?;
        let codec =
            codec::decoder::find(codec::Id::OPUS).ok_or(Error::CodecMissing("opus decoder"))?;
        let mut ctx = codec::Context::new_with_codec(codec);
        // SAFETY: `ctx` owns a freshly allocated, not yet opened AVCodecContext; these are plain
        // field writes that avcodec_open2 reads. ffmpeg-next has no setter for sample rate or
        // channel layout on a decoder context, and the opus decoder needs both to decode
        // packets without an OpusHead.
        unsafe {
            let raw = ctx.as_mut_ptr();
            (*raw).sample_rate = SAMPLE_RATE as i32;
            (*raw).channels = i32::from(channels);
            (*raw).channel_layout = layout(channels).bits();
        }
        let mut decoder = ctx.decoder();
        decoder.set_time_base((1, SAMPLE_RATE as i32));
        // FFmpeg's opus decoder always outputs planar f32; `Fifo::push_frame` also takes packed.
        let decoder = decoder
            .open_as(codec)
            .and_then(|d| d.audio())
            .map_err(codec_err("open opus decoder"))?;
        Ok(Self {
            decoder,
            decoded: frame::Audio::empty(),
        })
    }

    /// Decodes one packet into `fifo`; returns the number of samples added. An error means the
    /// packet was rejected (malformed) and nothing was added.
    pub(crate) fn decode(&mut self, payload: &[u8], fifo: &mut Fifo) -> Result<usize, Error> {
        if payload.is_empty() {
            return Err(Error::Codec {
                what: "decode opus",
                source: ffmpeg::Error::InvalidData,
            });
        }
        let packet = codec::packet::Packet::copy(payload);
        self.decoder
            .send_packet(&packet)
            .map_err(codec_err("decode opus"))?;
        let mut added = 0;
        loop {
            match self.decoder.receive_frame(&mut self.decoded) {
                Ok(()) => added += fifo.push_frame(&self.decoded)?,
                Err(e) if is_again(&e) => break,
                Err(source) => {
                    return Err(Error::Codec {
                        what: "decode opus",
                        source,
                    })
                }
            }
        }
        Ok(added)
    }
}

/// FFmpeg's native `aac` encoder (AAC-LC) for one rendition.
pub(crate) struct AacEncoder {
    encoder: codec::encoder::Audio,
    frame: frame::Audio,
    audio_specific_config: Bytes,
    /// Priming samples: the first packet's pts is the first frame's pts minus this.
    delay: i64,
    bitrate: u32,
    channels: u16,
    coder: crate::AacCoder,
}

impl AacEncoder {
    pub(crate) fn new(channels: u16, bitrate: u32, coder: crate::AacCoder) -> Result<Self, Error> {
        init_ffmpeg()?;
        // By name: `find(Id::AAC)` could pick another AAC encoder if one were built in.
        let codec =
            codec::encoder::find_by_name("aac").ok_or(Error::CodecMissing("aac encoder"))?;
        let ctx = codec::Context::new_with_codec(codec);
        let mut enc = ctx
            .encoder()
            .audio()
            .map_err(codec_err("aac encoder context"))?;
        enc.set_rate(SAMPLE_RATE as i32);
        enc.set_channel_layout(layout(channels));
        enc.set_channels(i32::from(channels));
        enc.set_format(PLANAR_F32);
        enc.set_bit_rate(bitrate as usize);
        enc.set_time_base((1, SAMPLE_RATE as i32));
        // Global header: the AudioSpecificConfig goes to extradata (for esds) instead of ADTS.
        enc.set_flags(codec::Flags::GLOBAL_HEADER);
        let mut options = ffmpeg::Dictionary::new();
        options.set("aac_coder", coder.ffmpeg_name());
        let encoder = enc
            .open_as_with(codec, options)
            .map_err(codec_err("open aac encoder"))?;
        // SAFETY: the encoder is open, so its context pointer is valid; extradata/extradata_size
        // and initial_padding are plain fields set by avcodec_open2 and not mutated while we
        // hold `&encoder`. The slice is copied before the borrow ends.
        let (asc, delay) = unsafe {
            let raw = encoder.as_ptr();
            let size = usize::try_from((*raw).extradata_size).unwrap_or(0);
            let asc = if (*raw).extradata.is_null() || size == 0 {
                Vec::new()
            } else {
                std::slice::from_raw_parts((*raw).extradata, size).to_vec()
            };
            (asc, i64::from((*raw).initial_padding))
        };
        if asc.len() < 2 {
            return Err(Error::CodecMissing("aac AudioSpecificConfig (extradata)"));
        }
        let mut frame = frame::Audio::new(PLANAR_F32, AAC_FRAME, layout(channels));
        frame.set_channels(channels);
        frame.set_rate(SAMPLE_RATE);
        Ok(Self {
            encoder,
            frame,
            audio_specific_config: Bytes::from(asc),
            delay,
            bitrate,
            channels,
            coder,
        })
    }

    pub(crate) fn audio_specific_config(&self) -> &Bytes {
        &self.audio_specific_config
    }

    pub(crate) fn delay(&self) -> i64 {
        self.delay
    }

    /// A fresh encoder with the same settings (after a flush, FFmpeg encoders take no more
    /// input).
    pub(crate) fn renew(&self) -> Result<Self, Error> {
        Self::new(self.channels, self.bitrate, self.coder)
    }

    /// Encodes the samples `samples` (one slice per channel, 1024 each) at `pts`.
    fn encode(
        &mut self,
        samples: &[&[f32]],
        pts: i64,
        out: &mut Vec<AacPacket>,
    ) -> Result<(), Error> {
        for (ch, src) in samples.iter().enumerate() {
            self.frame.plane_mut::<f32>(ch)[..AAC_FRAME].copy_from_slice(src);
        }
        self.frame.set_pts(Some(pts));
        self.encoder
            .send_frame(&self.frame)
            .map_err(codec_err("encode aac"))?;
        self.receive(out)
    }

    /// Drains the encoder at end of stream (after this it must be renewed).
    pub(crate) fn flush(&mut self, out: &mut Vec<AacPacket>) -> Result<(), Error> {
        self.encoder.send_eof().map_err(codec_err("flush aac"))?;
        self.receive(out)
    }

    fn receive(&mut self, out: &mut Vec<AacPacket>) -> Result<(), Error> {
        let mut packet = codec::packet::Packet::empty();
        loop {
            match self.encoder.receive_packet(&mut packet) {
                Ok(()) => {
                    let Some(pts) = packet.pts() else {
                        // The encoder derives every packet's pts from its input frames,
                        // all of which carry one; a packet without is a broken invariant.
                        return Err(Error::Codec {
                            what: "aac packet without pts",
                            source: ffmpeg::Error::Bug,
                        });
                    };
                    let duration = u32::try_from(packet.duration())
                        .ok()
                        .filter(|d| *d > 0)
                        .unwrap_or(AAC_FRAME as u32);
                    let data = Bytes::copy_from_slice(packet.data().unwrap_or_default());
                    out.push(AacPacket {
                        pts,
                        duration,
                        data,
                    });
                }
                Err(e) if is_again(&e) => return Ok(()),
                Err(source) => {
                    return Err(Error::Codec {
                        what: "encode aac",
                        source,
                    })
                }
            }
        }
    }
}

/// Takes every whole AAC frame out of `fifo` and encodes it with every encoder; the packets of
/// encoder `i` are appended to `out[i]`.
pub(crate) fn encode_available(
    fifo: &mut Fifo,
    encoders: &mut [&mut AacEncoder],
    out: &mut [Vec<AacPacket>],
) -> Result<(), Error> {
    debug_assert_eq!(encoders.len(), out.len());
    while fifo.len() >= AAC_FRAME {
        let pts = fifo.start_pts;
        {
            let planes: Vec<&[f32]> = fifo.channels.iter().map(|c| &c[..AAC_FRAME]).collect();
            for (enc, out) in encoders.iter_mut().zip(out.iter_mut()) {
                enc.encode(&planes, pts, out)?;
            }
        }
        for c in &mut fifo.channels {
            c.drain(..AAC_FRAME);
        }
        fifo.start_pts += AAC_FRAME as i64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    // In tests every unwrap is an assertion: if it fails, the test fails, as it should.
    use super::*;

    #[test]
    fn fifo_regroups_960_into_1024() {
        let mut fifo = Fifo::new(2);
        fifo.reset(48_000);
        let mut frame = frame::Audio::new(PLANAR_F32, AAC_FRAME, layout(2));
        frame.set_channels(2);
        let mut pops = 0;
        for _ in 0..16 {
            fifo.push_silence(960);
            while fifo.pop_frame(&mut frame) {
                assert_eq!(frame.pts(), Some(48_000 + pops * 1024));
                pops += 1;
            }
        }
        // 16 × 960 = 15 × 1024: nothing left over, and time advanced by exactly that.
        assert_eq!(pops, 15);
        assert_eq!(fifo.len(), 0);
        assert_eq!(fifo.end_pts(), 48_000 + 15_360);
        fifo.push_silence(100);
        fifo.pad_to_frame();
        assert_eq!(fifo.len(), AAC_FRAME);
    }

    #[test]
    fn malformed_opus_is_rejected_not_fatal() {
        let mut dec = OpusDecoder::new(2).unwrap();
        let mut fifo = Fifo::new(2);
        assert!(dec.decode(&[], &mut fifo).is_err());
        // TOC byte claiming a code-3 packet with an impossible frame count.
        assert!(dec.decode(&[0xff, 0xff], &mut fifo).is_err());
        assert_eq!(fifo.len(), 0);
        // The decoder still works afterwards: a 20 ms CELT silence frame (TOC 0xf8 = CELT FB
        // 20 ms mono, code 0) followed by an empty body decodes as 960 samples of PLC/silence.
        let n = dec.decode(&[0xf8, 0xff, 0xfe], &mut fifo).unwrap();
        assert_eq!(n, 960);
        assert_eq!(fifo.len(), 960);
    }

    #[test]
    fn aac_encoder_exposes_asc_and_follows_input_pts() {
        let mut enc = AacEncoder::new(2, 64_000, crate::AacCoder::TwoLoop).unwrap();
        // AudioSpecificConfig: object type 2 (LC) in the top 5 bits, 48 kHz index 3.
        let asc = enc.audio_specific_config();
        assert_eq!(asc[0] >> 3, 2);
        assert_eq!(((asc[0] & 0x7) << 1) | (asc[1] >> 7), 3);
        assert_eq!((asc[1] >> 3) & 0xf, 2, "channel configuration");
        let mut fifo = Fifo::new(2);
        fifo.reset(480_000);
        fifo.push_silence(10 * AAC_FRAME);
        let mut out = vec![Vec::new()];
        encode_available(&mut fifo, &mut [&mut enc], &mut out).unwrap();
        enc.flush(&mut out[0]).unwrap();
        let pts: Vec<i64> = out[0].iter().map(|p| p.pts).collect();
        assert_eq!(pts[0], 480_000 - enc.delay());
        for w in pts.windows(2) {
            assert_eq!(w[1] - w[0], AAC_FRAME as i64);
        }
    }
}
