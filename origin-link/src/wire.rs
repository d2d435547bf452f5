//! The origin-link wire format: a pure codec, no I/O.
//!
//! Every message is `type (varint) | length (varint) | body (length bytes)`, with QUIC-style
//! variable-length integers (RFC 9000 §16). The length prefix lets a reader skip or reject a
//! message without understanding it, and bounds what a peer can make us buffer: a declared
//! length above [`MAX_MESSAGE_LEN`] is an error before a single body byte is read.
//!
//! Decoding follows a check-then-parse discipline over a buffer the caller fills from the
//! stream: [`decode`] returns `Ok(None)` while the buffer holds less than one whole message,
//! and consumes exactly one message when it returns `Ok(Some(_))`. Malformed input is an error
//! for that stream only; nothing here panics on any input (see the fuzz-style test below).
//!
//! docs/origin-link.md is the normative description of these messages.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::{BroadcastId, Error, NodeId};

/// Largest message body accepted. A 20 ms Opus frame is at most 1275 bytes; control messages
/// are tiny. Anything larger is a broken or hostile peer.
pub const MAX_MESSAGE_LEN: u64 = 16 * 1024;

/// Largest media payload accepted in a [`Frame`].
pub const MAX_PAYLOAD_LEN: usize = 8 * 1024;

/// Largest reason string in a [`Message::SubscribeError`].
const MAX_REASON_LEN: usize = 1024;

/// Largest `via` list accepted in a [`Message::Subscribe`]. Longer than [`crate::MAX_HOPS`]
/// so that a too-long path is refused with a reason rather than treated as garbage.
pub const MAX_VIA: usize = 32;

const T_SUBSCRIBE: u64 = 0x01;
const T_SUBSCRIBE_OK: u64 = 0x02;
const T_SUBSCRIBE_ERROR: u64 = 0x03;
const T_FRAME: u64 = 0x10;
const T_GROUP: u64 = 0x11;

/// The audio codec of a broadcast. Only Opus exists today; the code point leaves room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Codec {
    /// Opus, 48 kHz RTP clock, one packet per frame.
    Opus,
}

impl Codec {
    fn code(self) -> u64 {
        match self {
            Self::Opus => 1,
        }
    }

    fn from_code(code: u64) -> Result<Self, Error> {
        match code {
            1 => Ok(Self::Opus),
            other => Err(Error::Protocol(format!("unknown codec {other}"))),
        }
    }
}

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubscribeErrorCode {
    /// The origin has no broadcast by that id.
    NotFound,
    /// The origin refuses for another reason (overloaded, draining, ...).
    Refused,
    /// The subscription would pass through a node already on its path, or too many hops.
    Loop,
}

impl SubscribeErrorCode {
    fn code(self) -> u64 {
        match self {
            Self::NotFound => 1,
            Self::Refused => 2,
            Self::Loop => 3,
        }
    }

    fn from_code(code: u64) -> Self {
        // Unknown codes from a newer peer still mean "no"; they are not a protocol error.
        match code {
            1 => Self::NotFound,
            3 => Self::Loop,
            _ => Self::Refused,
        }
    }
}

/// One encoded audio frame of a broadcast and the times that travel with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Frame counter, +1 per frame sent by the origin for this broadcast.
    pub seq: u64,
    /// Media time in 48 kHz samples since the broadcast started.
    pub timestamp: u64,
    /// Wall-clock capture time at the origin, microseconds since the Unix epoch.
    pub capture_time_us: u64,
    /// The codec payload (one Opus packet), passed through untouched.
    pub payload: Bytes,
}

/// A message of the origin-link protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// Subscriber → origin, first message of a new bidirectional stream (the subscription's
    /// control stream).
    Subscribe {
        /// The subscriber's id for this subscription, unique on its connection; every
        /// [`Message::Group`] of it names this id.
        subscription: u64,
        /// Which broadcast to receive.
        broadcast: BroadcastId,
        /// The link nodes this request has passed through, first subscriber first; the
        /// sender is the last. An upstream that finds itself here refuses (a loop).
        via: Vec<NodeId>,
    },
    /// Origin → subscriber: the subscription is live; frames follow on group streams.
    SubscribeOk {
        /// Codec of every frame that follows.
        codec: Codec,
        /// Channel count of the source (1 or 2).
        channels: u8,
    },
    /// Origin → subscriber: the subscription is refused; the origin finishes the stream.
    SubscribeError {
        /// Machine-readable reason.
        code: SubscribeErrorCode,
        /// Human-readable reason, for logs.
        reason: String,
    },
    /// Origin → subscriber: one media frame, on a group stream.
    Frame(Frame),
    /// Origin → subscriber, first message of a unidirectional stream: up to
    /// [`GROUP_FRAMES`] frames of this subscription follow.
    Group {
        /// The subscriber's id from [`Message::Subscribe`].
        subscription: u64,
    },
}

impl Message {
    /// The message's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Subscribe { .. } => "Subscribe",
            Self::SubscribeOk { .. } => "SubscribeOk",
            Self::SubscribeError { .. } => "SubscribeError",
            Self::Frame(_) => "Frame",
            Self::Group { .. } => "Group",
        }
    }
}

/// Frames per group stream (100 ms of 20 ms frames).
pub const GROUP_FRAMES: u64 = 5;

/// Appends the encoding of `msg` to `buf`.
pub fn encode(msg: &Message, buf: &mut BytesMut) {
    let mut body = BytesMut::new();
    let ty = match msg {
        Message::Subscribe {
            subscription,
            broadcast,
            via,
        } => {
            put_varint(&mut body, *subscription);
            put_bytes(&mut body, broadcast.as_str().as_bytes());
            // Encoders never exceed the limit a decoder enforces.
            let via = &via[..via.len().min(MAX_VIA)];
            put_varint(&mut body, via.len() as u64);
            for node in via {
                put_varint(&mut body, node.get());
            }
            T_SUBSCRIBE
        }
        Message::SubscribeOk { codec, channels } => {
            put_varint(&mut body, codec.code());
            put_varint(&mut body, u64::from(*channels));
            T_SUBSCRIBE_OK
        }
        Message::SubscribeError { code, reason } => {
            put_varint(&mut body, code.code());
            // Truncate on a char boundary so the receiver never sees invalid UTF-8.
            put_bytes(
                &mut body,
                &reason.as_bytes()[..char_boundary_at_most(reason, MAX_REASON_LEN)],
            );
            T_SUBSCRIBE_ERROR
        }
        Message::Frame(f) => {
            put_varint(&mut body, f.seq);
            put_varint(&mut body, f.timestamp);
            put_varint(&mut body, f.capture_time_us);
            put_bytes(&mut body, &f.payload);
            T_FRAME
        }
        Message::Group { subscription } => {
            put_varint(&mut body, *subscription);
            T_GROUP
        }
    };
    put_varint(buf, ty);
    put_varint(buf, body.len() as u64);
    buf.put_slice(&body);
}

/// Decodes one message from the front of `buf`.
///
/// Returns `Ok(None)` (consuming nothing) when `buf` does not yet hold a whole message.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Message>, Error> {
    let mut peek = &buf[..];
    let Some(ty) = get_varint(&mut peek) else {
        return Ok(None);
    };
    let Some(len) = get_varint(&mut peek) else {
        return Ok(None);
    };
    if len > MAX_MESSAGE_LEN {
        return Err(Error::Protocol(format!(
            "message of {len} bytes exceeds the limit of {MAX_MESSAGE_LEN}"
        )));
    }
    // `len` fits in usize: it is at most MAX_MESSAGE_LEN.
    let len = len as usize;
    if peek.len() < len {
        return Ok(None);
    }
    let header = buf.len() - peek.len();
    buf.advance(header);
    let mut body = buf.split_to(len).freeze();
    let msg = parse_body(ty, &mut body)?;
    if body.has_remaining() {
        return Err(Error::Protocol(format!(
            "{} trailing bytes after message type {ty:#x}",
            body.remaining()
        )));
    }
    Ok(Some(msg))
}

fn parse_body(ty: u64, body: &mut Bytes) -> Result<Message, Error> {
    match ty {
        T_SUBSCRIBE => {
            let subscription = take_varint(body, "subscription")?;
            let raw = take_bytes(body, "broadcast id")?;
            let id = std::str::from_utf8(&raw)
                .map_err(|_| Error::Protocol("broadcast id is not UTF-8".into()))?;
            let broadcast = id.parse()?;
            let hops = take_varint(body, "via count")?;
            if hops > MAX_VIA as u64 {
                return Err(Error::Protocol(format!(
                    "via list of {hops} nodes exceeds the limit of {MAX_VIA}"
                )));
            }
            let via = (0..hops)
                .map(|_| take_varint(body, "via node").map(NodeId::from_wire))
                .collect::<Result<_, _>>()?;
            Ok(Message::Subscribe {
                subscription,
                broadcast,
                via,
            })
        }
        T_SUBSCRIBE_OK => {
            let codec = Codec::from_code(take_varint(body, "codec")?)?;
            let channels = take_varint(body, "channels")?;
            if !(1..=2).contains(&channels) {
                return Err(Error::Protocol(format!(
                    "{channels} channels is not supported"
                )));
            }
            Ok(Message::SubscribeOk {
                codec,
                channels: channels as u8,
            })
        }
        T_SUBSCRIBE_ERROR => {
            let code = SubscribeErrorCode::from_code(take_varint(body, "error code")?);
            let raw = take_bytes(body, "reason")?;
            if raw.len() > MAX_REASON_LEN {
                return Err(Error::Protocol("error reason too long".into()));
            }
            // Invalid UTF-8 from a peer only costs it a readable log line, not the
            // connection. Each invalid byte becomes U+FFFD (three bytes), so cut the text to
            // the limit again, as `encode` does: a decoded message must encode unchanged.
            let mut reason = String::from_utf8_lossy(&raw).into_owned();
            truncate_on_char_boundary(&mut reason, MAX_REASON_LEN);
            Ok(Message::SubscribeError { code, reason })
        }
        T_FRAME => {
            let seq = take_varint(body, "seq")?;
            let timestamp = take_varint(body, "timestamp")?;
            let capture_time_us = take_varint(body, "capture time")?;
            let payload = take_bytes(body, "payload")?;
            if payload.is_empty() || payload.len() > MAX_PAYLOAD_LEN {
                return Err(Error::Protocol(format!(
                    "frame payload of {} bytes is outside 1..={MAX_PAYLOAD_LEN}",
                    payload.len()
                )));
            }
            Ok(Message::Frame(Frame {
                seq,
                timestamp,
                capture_time_us,
                payload,
            }))
        }
        T_GROUP => Ok(Message::Group {
            subscription: take_varint(body, "subscription")?,
        }),
        other => Err(Error::Protocol(format!("unknown message type {other:#x}"))),
    }
}

/// The largest char boundary of `s` at or below `max` bytes.
fn char_boundary_at_most(s: &str, max: usize) -> usize {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    end
}

fn truncate_on_char_boundary(s: &mut String, max: usize) {
    let end = char_boundary_at_most(s, max);
    s.truncate(end);
}

fn take_varint(body: &mut Bytes, what: &str) -> Result<u64, Error> {
    let mut slice = &body[..];
    let v = get_varint(&mut slice).ok_or_else(|| Error::Protocol(format!("truncated {what}")))?;
    let used = body.len() - slice.len();
    body.advance(used);
    Ok(v)
}

fn take_bytes(body: &mut Bytes, what: &str) -> Result<Bytes, Error> {
    let len = take_varint(body, what)?;
    if len > body.len() as u64 {
        return Err(Error::Protocol(format!("truncated {what}")));
    }
    Ok(body.split_to(len as usize))
}

fn put_bytes(buf: &mut BytesMut, bytes: &[u8]) {
    put_varint(buf, bytes.len() as u64);
    buf.put_slice(bytes);
}

/// Largest value a QUIC varint can carry.
pub const VARINT_MAX: u64 = (1 << 62) - 1;

/// Writes a QUIC variable-length integer. Values above [`VARINT_MAX`] are clamped, which
/// cannot happen for the quantities this protocol carries (times and counters in 62 bits).
fn put_varint(buf: &mut BytesMut, v: u64) {
    let v = v.min(VARINT_MAX);
    if v < (1 << 6) {
        buf.put_u8(v as u8);
    } else if v < (1 << 14) {
        buf.put_u16(0x4000 | v as u16);
    } else if v < (1 << 30) {
        buf.put_u32(0x8000_0000 | v as u32);
    } else {
        buf.put_u64(0xc000_0000_0000_0000 | v);
    }
}

/// Reads a QUIC variable-length integer, or `None` if `buf` is too short.
fn get_varint(buf: &mut &[u8]) -> Option<u64> {
    let first = *buf.first()?;
    let len = 1usize << (first >> 6);
    if buf.len() < len {
        return None;
    }
    let mut v = u64::from(first & 0x3f);
    for b in &buf[1..len] {
        v = (v << 8) | u64::from(*b);
    }
    *buf = &buf[len..];
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64, payload: &[u8]) -> Message {
        Message::Frame(Frame {
            seq,
            timestamp: seq.saturating_mul(960).min(VARINT_MAX),
            capture_time_us: seq.saturating_mul(20_000).min(VARINT_MAX),
            payload: Bytes::copy_from_slice(payload),
        })
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Subscribe {
                subscription: 0,
                broadcast: "demo".parse().unwrap(),
                via: vec![],
            },
            Message::Subscribe {
                subscription: VARINT_MAX,
                broadcast: "hub".parse().unwrap(),
                via: vec![NodeId::from_wire(7), NodeId::from_wire(VARINT_MAX)],
            },
            Message::SubscribeOk {
                codec: Codec::Opus,
                channels: 2,
            },
            Message::SubscribeError {
                code: SubscribeErrorCode::NotFound,
                reason: "no broadcast named nope".into(),
            },
            Message::Group { subscription: 0 },
            frame(0, &[1]),
            frame(1, &[2; 160]),
            Message::Group {
                subscription: 1 << 40,
            },
            frame(VARINT_MAX, &[0xfc; 1275]),
        ]
    }

    #[test]
    fn round_trip() {
        let mut buf = BytesMut::new();
        for m in samples() {
            encode(&m, &mut buf);
        }
        for m in samples() {
            assert_eq!(decode(&mut buf).unwrap(), Some(m));
        }
        assert!(buf.is_empty());
        assert_eq!(decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn partial_input_waits_and_consumes_nothing() {
        let mut whole = BytesMut::new();
        encode(&frame(7, &[9; 100]), &mut whole);
        for cut in 0..whole.len() {
            let mut part = BytesMut::from(&whole[..cut]);
            assert_eq!(decode(&mut part).unwrap(), None, "cut at {cut}");
            assert_eq!(part.len(), cut);
        }
    }

    #[test]
    fn varint_boundaries() {
        for v in [0, 63, 64, 16383, 16384, (1 << 30) - 1, 1 << 30, VARINT_MAX] {
            let mut buf = BytesMut::new();
            put_varint(&mut buf, v);
            let mut s = &buf[..];
            assert_eq!(get_varint(&mut s), Some(v));
            assert!(s.is_empty());
        }
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut buf = BytesMut::new();
        put_varint(&mut buf, T_FRAME);
        put_varint(&mut buf, MAX_MESSAGE_LEN + 1);
        assert!(matches!(decode(&mut buf), Err(Error::Protocol(_))));
    }

    #[test]
    fn malformed_messages_are_errors() {
        let cases: Vec<(u64, Vec<u8>)> = vec![
            (0x7f, vec![]),                              // unknown type
            (T_SUBSCRIBE, vec![]),                       // no subscription id
            (T_SUBSCRIBE, vec![0x40]),                   // truncated subscription id
            (T_SUBSCRIBE, vec![0, 1, b'a']),             // no via count
            (T_SUBSCRIBE, vec![0, 1, b'a', 2, 5]),       // via shorter than its count
            (T_SUBSCRIBE, vec![0, 1, b'a', 33]),         // via over the limit
            (T_SUBSCRIBE, vec![0, 3, b'a', b'/', b'b']), // id with a slash
            (T_SUBSCRIBE, vec![0, 2, 0xff, 0xfe]),       // not UTF-8
            (T_SUBSCRIBE, vec![0, 0, 0]),                // empty id
            (T_GROUP, vec![]),                           // no subscription id
            (T_GROUP, vec![0x80, 0, 1]),                 // truncated subscription id
            (T_GROUP, vec![5, 0]),                       // trailing byte
            (T_SUBSCRIBE_OK, vec![9, 2]),                // unknown codec
            (T_SUBSCRIBE_OK, vec![1, 7]),                // 7 channels
            (T_FRAME, vec![1, 2, 3, 0]),                 // empty payload
            (T_FRAME, vec![1, 2, 3, 5, 1]),              // truncated payload
            (T_SUBSCRIBE_OK, vec![1, 2, 0]),             // trailing byte
        ];
        for (ty, body) in cases {
            let mut buf = BytesMut::new();
            put_varint(&mut buf, ty);
            put_varint(&mut buf, body.len() as u64);
            buf.put_slice(&body);
            assert!(
                decode(&mut buf).is_err(),
                "type {ty:#x} body {body:?} was accepted"
            );
        }
    }

    /// Found by the round-trip check of `fuzzing::decode_stream`: 400 bytes of invalid UTF-8
    /// became 400 U+FFFD (1200 bytes), a reason that `encode` then cut to 1023 bytes, so the
    /// decoded message did not survive encoding. The reason now stays within the limit.
    #[test]
    fn invalid_utf8_reason_stays_within_the_limit_and_round_trips() {
        let mut body = BytesMut::new();
        put_varint(&mut body, 2);
        put_bytes(&mut body, &[0xff; 400]);
        let mut buf = BytesMut::new();
        put_varint(&mut buf, T_SUBSCRIBE_ERROR);
        put_varint(&mut buf, body.len() as u64);
        buf.put_slice(&body);
        let msg = decode(&mut buf).unwrap().expect("a whole message");
        let Message::SubscribeError { ref reason, .. } = msg else {
            panic!("{msg:?}");
        };
        assert_eq!(reason.len(), 1023, "341 whole U+FFFD, the last one cut");
        assert!(reason.chars().all(|c| c == char::REPLACEMENT_CHARACTER));
        let mut again = BytesMut::new();
        encode(&msg, &mut again);
        assert_eq!(decode(&mut again).unwrap(), Some(msg));
    }

    /// Deterministic pseudo-random garbage and mutations of valid messages: the decoder must
    /// return (Ok or Err) without panicking and never claim more bytes than it was given.
    #[test]
    fn garbage_never_panics() {
        let mut valid = BytesMut::new();
        for m in samples() {
            encode(&m, &mut valid);
        }
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut input = valid.to_vec();
            let flips = next() % 8;
            for _ in 0..flips {
                let i = (next() as usize) % input.len();
                input[i] = next() as u8;
            }
            input.truncate((next() as usize) % (input.len() + 1));
            let mut buf = BytesMut::from(&input[..]);
            let mut left = buf.len();
            while let Ok(Some(m)) = decode(&mut buf) {
                assert!(buf.len() < left, "a decoded message consumed nothing");
                left = buf.len();
                // Whatever was accepted means the same thing when sent on (a reason text
                // may have been repaired to valid UTF-8, so it is left out).
                if matches!(m, Message::SubscribeError { .. }) {
                    continue;
                }
                let mut again = BytesMut::new();
                encode(&m, &mut again);
                assert_eq!(decode(&mut again).unwrap(), Some(m));
            }
        }
    }

    /// A group stream as the origin writes it: a `Group` then frames, cut anywhere, decodes
    /// to a prefix of what was written.
    #[test]
    fn a_cut_group_stream_decodes_to_a_prefix() {
        let mut whole = BytesMut::new();
        let sent: Vec<Message> = std::iter::once(Message::Group { subscription: 300 })
            .chain((10..10 + GROUP_FRAMES).map(|s| frame(s, &[s as u8; 120])))
            .collect();
        for m in &sent {
            encode(m, &mut whole);
        }
        for cut in 0..=whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            let mut got = Vec::new();
            while let Some(m) = decode(&mut buf).unwrap() {
                got.push(m);
            }
            assert_eq!(got[..], sent[..got.len()], "cut at {cut}");
            assert_eq!(got.len() == sent.len(), cut == whole.len(), "cut at {cut}");
        }
    }
}
