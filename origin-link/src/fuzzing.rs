//! The bodies of the fuzz targets in `origin-link/fuzz`, and the seed inputs they start from.
//!
//! They live in the crate (behind the `fuzzing` feature) so that `cargo fuzz` and the unit
//! tests run the same checks: the tests replay the committed seeds (`origin-link/fuzz/seeds`)
//! through these functions, and a failure found by the fuzzer becomes a regression test by
//! adding its input there. Each function panics when an invariant of the codec breaks; that
//! panic is the finding.
//!
//! - [`decode_stream`]: arbitrary bytes, split into arbitrary chunks, fed to [`wire::decode`]
//!   the way the stream reader does (decode until it wants more bytes, then append the next
//!   chunk; stop at the first error, which closes the connection).
//! - [`encode_round_trip`]: a message built from arbitrary bytes goes through
//!   [`wire::encode`] and back, and must come out as docs/origin-link.md says.

use bytes::{Bytes, BytesMut};

use crate::wire::{
    self, Codec, Frame, Message, SubscribeErrorCode, MAX_PAYLOAD_LEN, MAX_VIA, VARINT_MAX,
};
use crate::{BroadcastId, NodeId};

/// Largest reason the codec carries (docs/origin-link.md: `reason: bytes (UTF-8, ≤ 1024)`).
const MAX_REASON_LEN: usize = 1024;

/// How a stream of bytes ended for the decoder.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// `decode` returned an error (the reader closes the connection).
    Error,
    /// `decode` wanted more bytes; this many were buffered but not yet a whole message.
    Waiting(usize),
}

/// Input: one byte choosing how the stream is chunked, then the stream itself.
///
/// Checks, on every call of [`wire::decode`]:
/// - `Ok(None)` consumes nothing;
/// - `Ok(Some(m))` consumes a non-empty prefix of the buffer, never more than it holds, and
///   leaves the rest untouched; `m` re-encodes to bytes that decode to `m`, consuming them
///   exactly;
/// - nothing panics, whatever the bytes;
///
/// and over the whole stream: the messages, and whether it ends in an error or with bytes
/// waiting (how many), are the same however the stream was chunked as when it arrives in one
/// piece. So a message never depends on where the transport cut the stream, an incomplete
/// message is never an error, and a complete one is never left waiting.
pub fn decode_stream(data: &[u8]) {
    let Some((&chunking, stream)) = data.split_first() else {
        return;
    };
    let whole = read_all(stream, &mut std::iter::repeat(stream.len().max(1)));
    let mut sizes = chunk_sizes(chunking, stream);
    let chunked = read_all(stream, &mut sizes);
    assert_eq!(
        chunked, whole,
        "chunking (selector {chunking}) changed what was decoded"
    );
}

/// Feeds `stream` to the decoder in chunks of `sizes`, as the stream reader does.
fn read_all(stream: &[u8], sizes: &mut dyn Iterator<Item = usize>) -> (Vec<Message>, End) {
    let mut buf = BytesMut::new();
    // The buffer holds stream[consumed..fed]; checked against it instead of copying it.
    let (mut consumed, mut fed) = (0, 0);
    let mut messages = Vec::new();
    loop {
        match checked_decode(&mut buf, &stream[consumed..fed]) {
            Ok(Some((m, used))) => {
                messages.push(m);
                consumed += used;
                continue;
            }
            Ok(None) => {}
            Err(()) => return (messages, End::Error),
        }
        if fed == stream.len() {
            return (messages, End::Waiting(buf.len()));
        }
        // The iterators passed in never end; a size of 0 would stall, so at least 1.
        let n = sizes.next().unwrap_or(1).clamp(1, stream.len() - fed);
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
    }
}

/// One call of [`wire::decode`] on `buf`, which holds `held`, and the checks that hold for
/// any single call. Returns the message and how many bytes it took.
fn checked_decode(buf: &mut BytesMut, held: &[u8]) -> Result<Option<(Message, usize)>, ()> {
    match wire::decode(buf) {
        Ok(None) => {
            assert_eq!(&buf[..], held, "Ok(None) consumed or changed bytes");
            Ok(None)
        }
        Ok(Some(m)) => {
            assert!(buf.len() < held.len(), "a message was decoded from nothing");
            let used = held.len() - buf.len();
            assert_eq!(
                &buf[..],
                &held[used..],
                "decode touched bytes after its message"
            );
            let mut again = BytesMut::new();
            wire::encode(&m, &mut again);
            let encoded = again.len();
            match wire::decode(&mut again) {
                Ok(Some(back)) => assert_eq!(back, m, "re-encoding changed the message"),
                other => panic!("{m:?} re-encoded to {encoded} bytes that decode as {other:?}"),
            }
            assert!(again.is_empty(), "re-encoded message not consumed exactly");
            Ok(Some((m, used)))
        }
        Err(_) => Err(()),
    }
}

/// Chunk sizes drawn from `selector` and the stream: from one byte at a time to large reads,
/// and the same sizes for the same input.
fn chunk_sizes(selector: u8, stream: &[u8]) -> impl Iterator<Item = usize> {
    // Largest chunk: 1, 2, 4, ... 32768 bytes; the low bit picks fixed or varying sizes.
    let max = 1usize << ((selector >> 1) % 16);
    let fixed = selector & 1 == 0;
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ stream.len() as u64 ^ (u64::from(selector) << 32);
    std::iter::from_fn(move || {
        if fixed {
            return Some(max);
        }
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        Some(1 + (state % max as u64) as usize)
    })
}

/// Input: the first byte picks the message kind; the rest fill its fields (missing bytes read
/// as zero). Any message the types allow is built, including ones outside the protocol's
/// limits (empty or oversized payloads, 0 or 200 channels, long reasons, values above
/// [`VARINT_MAX`]).
///
/// Checks: the encoding decodes in one call to exactly the message docs/origin-link.md
/// promises (limited values clamped, long reasons cut on a character boundary), or to an
/// error for a message the protocol forbids; a prefix of the encoding (the first 24 cuts,
/// which cover the header and the fixed fields, and the last 8) is "wait for more" and
/// consumes nothing, except that a declared length over the limit may be refused at once.
pub fn encode_round_trip(data: &[u8]) {
    let mut input = Input(data);
    let msg = match input.u8() % 5 {
        0 => Message::Subscribe {
            subscription: input.u64(),
            broadcast: input.broadcast_id(),
            via: input.via(),
        },
        4 => Message::Group {
            subscription: input.u64(),
        },
        1 => Message::SubscribeOk {
            codec: Codec::Opus,
            channels: input.u8(),
        },
        2 => Message::SubscribeError {
            code: match input.u8() % 3 {
                0 => SubscribeErrorCode::NotFound,
                1 => SubscribeErrorCode::Refused,
                _ => SubscribeErrorCode::Loop,
            },
            reason: input.reason(),
        },
        _ => {
            let (seq, timestamp, capture_time_us) = (input.u64(), input.u64(), input.u64());
            let len = usize::from(input.u16());
            let fill = input.u8();
            Message::Frame(Frame {
                seq,
                timestamp,
                capture_time_us,
                payload: Bytes::from(vec![fill; len]),
            })
        }
    };
    let expected = promised(&msg);
    let mut buf = BytesMut::new();
    wire::encode(&msg, &mut buf);
    let encoded = buf.clone().freeze();

    // Prefixes: the first bytes (header boundaries) and the last (body almost complete).
    let n = encoded.len();
    for cut in (0..n.min(24)).chain(n.saturating_sub(8)..n) {
        let mut part = BytesMut::from(&encoded[..cut]);
        match wire::decode(&mut part) {
            Ok(None) => assert_eq!(part.len(), cut, "a prefix of {cut} bytes was consumed"),
            // A declared length over the limit is refused from the header alone, on purpose.
            Err(_) if expected.is_none() => {}
            other => panic!("prefix of {cut}/{n} bytes of {msg:?} decoded as {other:?}"),
        }
    }

    match (wire::decode(&mut buf), expected) {
        (Ok(Some(got)), Some(want)) => {
            assert_eq!(got, want, "round trip of {msg:?}");
            assert!(buf.is_empty(), "encoding of {msg:?} not consumed exactly");
        }
        (Err(_), None) => {}
        (got, want) => panic!("{msg:?} encoded to {n} bytes: decoded {got:?}, expected {want:?}"),
    }
}

/// What decoding the encoding of `msg` must give, from docs/origin-link.md; `None` for an
/// error.
fn promised(msg: &Message) -> Option<Message> {
    match msg {
        Message::SubscribeOk { channels, .. } if !(1..=2).contains(channels) => None,
        // An encoder sends at most the first MAX_VIA nodes of a path.
        Message::Subscribe {
            subscription,
            broadcast,
            via,
        } => Some(Message::Subscribe {
            subscription: (*subscription).min(VARINT_MAX),
            broadcast: broadcast.clone(),
            via: via[..via.len().min(MAX_VIA)].to_vec(),
        }),
        Message::Group { subscription } => Some(Message::Group {
            subscription: (*subscription).min(VARINT_MAX),
        }),
        Message::SubscribeError { code, reason } => {
            let mut end = reason.len().min(MAX_REASON_LEN);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            Some(Message::SubscribeError {
                code: *code,
                reason: reason[..end].to_string(),
            })
        }
        Message::Frame(f) => {
            if f.payload.is_empty() || f.payload.len() > MAX_PAYLOAD_LEN {
                return None;
            }
            let frame = Frame {
                seq: f.seq.min(VARINT_MAX),
                timestamp: f.timestamp.min(VARINT_MAX),
                capture_time_us: f.capture_time_us.min(VARINT_MAX),
                payload: f.payload.clone(),
            };
            // Three varints of at most 8 bytes, a 2-byte length and at most MAX_PAYLOAD_LEN
            // bytes stay below MAX_MESSAGE_LEN: a frame within the payload limit always fits.
            Some(Message::Frame(frame))
        }
        other => Some(other.clone()),
    }
}

/// Reads fields from fuzz input; past the end, every byte is zero.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = self.u8();
        }
        u64::from_le_bytes(b)
    }

    fn broadcast_id(&mut self) -> BroadcastId {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";
        let len = 1 + usize::from(self.u8()) % 64;
        let id: String = (0..len)
            .map(|_| char::from(ALPHABET[usize::from(self.u8()) % ALPHABET.len()]))
            .collect();
        // Only characters of ALPHABET, 1 to 64 of them: always a valid id.
        id.parse().expect("id built from the allowed alphabet")
    }

    /// A path of 0 to 47 node ids (beyond the limit of 32 too).
    fn via(&mut self) -> Vec<NodeId> {
        let len = usize::from(self.u8()) % 48;
        (0..len).map(|_| NodeId::from_wire(self.u64())).collect()
    }

    /// The rest of the input as text (invalid UTF-8 becomes U+FFFD, three bytes each), repeated
    /// so that reasons around and beyond the 1024-byte limit occur.
    fn reason(&mut self) -> String {
        let repeat = 1 + usize::from(self.u8()) % 64;
        let text = String::from_utf8_lossy(self.0).repeat(repeat);
        self.0 = &[];
        text
    }
}

/// The seed inputs of each target, by name: valid messages and exchanges, so the fuzzer
/// starts from the parts of the input space a real peer uses. `origin-link/fuzz/seeds` holds
/// these, written by the `seeds_on_disk_are_current` test (`TERN_WRITE_FUZZ_SEEDS=1`).
pub fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let frame = |seq: u64, len: usize| {
        Message::Frame(Frame {
            seq,
            timestamp: seq * 960,
            capture_time_us: 1_790_000_000_000_000 + seq * 20_000,
            payload: Bytes::from(vec![0xfc; len]),
        })
    };
    let subscribe = Message::Subscribe {
        subscription: 1,
        broadcast: "demo".parse().expect("a valid id"),
        via: vec![NodeId::from_wire(0x1234_5678_9abc)],
    };
    let ok = Message::SubscribeOk {
        codec: Codec::Opus,
        channels: 2,
    };
    let refused = Message::SubscribeError {
        code: SubscribeErrorCode::NotFound,
        reason: "no broadcast named nope".into(),
    };
    let enc = |msgs: &[Message]| {
        let mut buf = BytesMut::new();
        for m in msgs {
            wire::encode(m, &mut buf);
        }
        buf.to_vec()
    };
    let with_chunking = |selector: u8, bytes: Vec<u8>| [vec![selector], bytes].concat();
    // A group stream as the origin writes it (the control stream carries `ok`).
    let exchange = enc(&[
        Message::Group { subscription: 1 },
        frame(0, 160),
        frame(1, 160),
        frame(2, 160),
        frame(3, 160),
    ]);
    let cut = exchange[..exchange.len() - 100].to_vec();
    vec![
        ("decode", "subscribe", with_chunking(0, enc(&[subscribe]))),
        ("decode", "subscribe-ok", with_chunking(1, enc(&[ok]))),
        (
            "decode",
            "subscribe-error",
            with_chunking(3, enc(&[refused])),
        ),
        ("decode", "frame", with_chunking(8, enc(&[frame(5, 1)]))),
        (
            "decode",
            "frame-largest-values",
            with_chunking(
                21,
                enc(&[Message::Frame(Frame {
                    seq: VARINT_MAX,
                    timestamp: VARINT_MAX,
                    capture_time_us: VARINT_MAX,
                    payload: Bytes::from(vec![0xfc; 1275]),
                })]),
            ),
        ),
        ("decode", "exchange", with_chunking(13, exchange)),
        ("decode", "exchange-cut", with_chunking(5, cut)),
        ("round_trip", "subscribe", vec![0, 3, 3, 4, 14, 3]),
        ("round_trip", "subscribe-ok", vec![1, 2]),
        (
            "round_trip",
            "subscribe-error",
            [&[2, 0, 0][..], b"no broadcast named nope"].concat(),
        ),
        (
            "round_trip",
            "frame",
            [
                &[3][..],
                &7u64.to_le_bytes(),
                &6720u64.to_le_bytes(),
                &1_790_000_000_140_000u64.to_le_bytes(),
                &160u16.to_le_bytes(),
                &[0xfc],
            ]
            .concat(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn seed_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds")
    }

    /// The committed seeds are what [`seeds`] makes today, so a change to the encoding
    /// cannot leave the fuzzer starting from stale bytes. `TERN_WRITE_FUZZ_SEEDS=1` rewrites
    /// them.
    #[test]
    fn seeds_on_disk_are_current() {
        let write = std::env::var_os("TERN_WRITE_FUZZ_SEEDS").is_some_and(|v| v == "1");
        for (target, name, bytes) in seeds() {
            let path = seed_dir().join(target).join(name);
            if write {
                std::fs::create_dir_all(path.parent().expect("a file in a folder"))
                    .expect("create the seed folder");
                std::fs::write(&path, &bytes).expect("write a seed");
            }
            let on_disk = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("{}: {e} (TERN_WRITE_FUZZ_SEEDS=1)", path.display()));
            assert_eq!(on_disk, bytes, "{} is stale", path.display());
        }
    }

    /// Every file under the seed folders (generated seeds and regression inputs alike) passes
    /// the harness: what `cargo fuzz` checks, without libFuzzer.
    #[test]
    fn committed_inputs_pass_the_harness() {
        let mut replayed = 0;
        for (target, run) in [
            ("decode", decode_stream as fn(&[u8])),
            ("round_trip", encode_round_trip),
        ] {
            let dir = seed_dir().join(target);
            for entry in std::fs::read_dir(&dir).expect("seed folder exists") {
                let path = entry.expect("readable folder").path();
                let bytes = std::fs::read(&path).expect("readable seed");
                run(&bytes);
                replayed += 1;
            }
        }
        assert!(replayed >= seeds().len(), "only {replayed} inputs replayed");
    }

    /// The chunkings cover both fixed and varying read sizes, within the chosen maximum.
    #[test]
    fn chunkings_vary() {
        let stream = [0u8; 100];
        let fixed: Vec<usize> = chunk_sizes(2, &stream).take(5).collect();
        assert_eq!(fixed, [2; 5]);
        let varying: Vec<usize> = chunk_sizes(13, &stream).take(50).collect();
        assert!(varying.iter().all(|&n| (1..=64).contains(&n)));
        assert!(varying.iter().any(|&n| n != varying[0]), "{varying:?}");
    }

    #[test]
    fn round_trip_promises_follow_the_limits() {
        let reason = "é".repeat(600); // 1200 bytes: the cut falls inside a character
        let want = promised(&Message::SubscribeError {
            code: SubscribeErrorCode::Refused,
            reason,
        });
        assert!(
            matches!(want, Some(Message::SubscribeError { ref reason, .. }) if reason.len() == 1024)
        );
        let frame = |len| {
            promised(&Message::Frame(Frame {
                seq: u64::MAX,
                timestamp: 0,
                capture_time_us: 0,
                payload: Bytes::from(vec![1; len]),
            }))
        };
        assert!(frame(0).is_none());
        assert!(frame(MAX_PAYLOAD_LEN + 1).is_none());
        assert!(matches!(frame(1), Some(Message::Frame(f)) if f.seq == VARINT_MAX));
    }
}
