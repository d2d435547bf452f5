//! ICE-lite consent answers (RFC 8445 §2.5, RFC 7675) without a full ICE agent.
//!
//! Once a listener's DTLS handshake is over and its media is written by the core
//! ([`crate::egress`]), the only thing left of ICE is answering the binding requests the
//! listener keeps sending (every ~5 s, consent freshness) and noticing when they stop. An
//! ICE-lite agent never sends checks of its own, so that is a pure function of the request:
//! check USERNAME and MESSAGE-INTEGRITY against our credentials, answer with
//! XOR-MAPPED-ADDRESS, MESSAGE-INTEGRITY and FINGERPRINT (RFC 8489). This is what lets the
//! core free a listener's whole WebRTC stack after the handshake: a few dozen bytes of
//! credentials replace it.

use std::net::{IpAddr, SocketAddr};

use str0m::crypto::Sha1HmacProvider;

const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const ATTR_USERNAME: u16 = 0x0006;
const ATTR_MESSAGE_INTEGRITY: u16 = 0x0008;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const ATTR_FINGERPRINT: u16 = 0x8028;
const FINGERPRINT_XOR: u32 = 0x5354_554e;

/// Why a datagram got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not a STUN binding request.
    NotBinding,
    /// Malformed attributes or lengths.
    Malformed,
    /// USERNAME does not start with our ufrag.
    WrongUser,
    /// No MESSAGE-INTEGRITY, or it does not match our password.
    BadIntegrity,
}

/// Our side of a listener's ICE credentials.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// Our username fragment (the part before ':' in requests we receive).
    pub ufrag: String,
    /// Our password: the MESSAGE-INTEGRITY key of requests and of our answers.
    pub pass: String,
}

/// Answers a binding request from `source`, or says why not. The answer is appended to
/// `out`.
pub fn answer(
    req: &[u8],
    source: SocketAddr,
    creds: &Credentials,
    hmac: &dyn Sha1HmacProvider,
    out: &mut Vec<u8>,
) -> Result<(), Refused> {
    if req.len() < 20 || req[4..8] != MAGIC_COOKIE {
        return Err(Refused::NotBinding);
    }
    if u16::from_be_bytes([req[0], req[1]]) != BINDING_REQUEST {
        return Err(Refused::NotBinding);
    }
    let body_len = usize::from(u16::from_be_bytes([req[2], req[3]]));
    if body_len % 4 != 0 || req.len() != 20 + body_len {
        return Err(Refused::Malformed);
    }
    let mut user_ok = false;
    let mut integrity = None;
    let mut at = 20;
    while at < req.len() {
        let head = req.get(at..at + 4).ok_or(Refused::Malformed)?;
        let ty = u16::from_be_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let value = req.get(at + 4..at + 4 + len).ok_or(Refused::Malformed)?;
        match ty {
            ATTR_USERNAME => {
                let ours = value.split(|b| *b == b':').next().unwrap_or(&[]);
                user_ok = ours == creds.ufrag.as_bytes();
            }
            ATTR_MESSAGE_INTEGRITY => {
                if len != 20 {
                    return Err(Refused::Malformed);
                }
                integrity = Some((at, value));
                // Only FINGERPRINT may follow; nothing after it is covered, so stop here.
                break;
            }
            _ => {}
        }
        at += 4 + len.div_ceil(4) * 4;
    }
    if !user_ok {
        return Err(Refused::WrongUser);
    }
    let (mi_at, mi) = integrity.ok_or(Refused::BadIntegrity)?;
    // The HMAC covers the message up to MESSAGE-INTEGRITY, with the header's length as if
    // the message ended right after it.
    let covered_len = (mi_at + 24 - 20) as u16;
    let mut head = [0u8; 20];
    head.copy_from_slice(&req[..20]);
    head[2..4].copy_from_slice(&covered_len.to_be_bytes());
    let want = hmac.sha1_hmac(creds.pass.as_bytes(), &[&head, &req[20..mi_at]]);
    if !constant_time_eq(&want, mi) {
        return Err(Refused::BadIntegrity);
    }

    let start = out.len();
    out.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&req[4..20]);
    // XOR-MAPPED-ADDRESS: the port XORed with the cookie's top half, the address with the
    // cookie (IPv4) or the cookie and transaction id (IPv6).
    let port = source.port() ^ 0x2112;
    match source.ip() {
        IpAddr::V4(ip) => {
            out.extend_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
            out.extend_from_slice(&8u16.to_be_bytes());
            out.extend_from_slice(&[0, 1]);
            out.extend_from_slice(&port.to_be_bytes());
            let mut a = ip.octets();
            for (b, k) in a.iter_mut().zip(MAGIC_COOKIE) {
                *b ^= k;
            }
            out.extend_from_slice(&a);
        }
        IpAddr::V6(ip) => {
            out.extend_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
            out.extend_from_slice(&20u16.to_be_bytes());
            out.extend_from_slice(&[0, 2]);
            out.extend_from_slice(&port.to_be_bytes());
            let mut a = ip.octets();
            for (b, k) in a.iter_mut().zip(req[4..20].iter()) {
                *b ^= k;
            }
            out.extend_from_slice(&a);
        }
    }
    // MESSAGE-INTEGRITY over everything so far, length counting the attribute itself.
    let len = out.len() - start - 20 + 24;
    set_len(out, start, len);
    let mac = hmac.sha1_hmac(creds.pass.as_bytes(), &[&out[start..]]);
    out.extend_from_slice(&ATTR_MESSAGE_INTEGRITY.to_be_bytes());
    out.extend_from_slice(&20u16.to_be_bytes());
    out.extend_from_slice(&mac);
    // FINGERPRINT: CRC-32 of everything before it, length counting it too.
    let len = out.len() - start - 20 + 8;
    set_len(out, start, len);
    let crc = crc32fast::hash(&out[start..]) ^ FINGERPRINT_XOR;
    out.extend_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
    out.extend_from_slice(&4u16.to_be_bytes());
    out.extend_from_slice(&crc.to_be_bytes());
    Ok(())
}

/// The local (our) ICE username fragment of a STUN binding request, if `data` is one: how a
/// datagram from an address not seen yet finds its listener.
///
/// STUN (RFC 8489): 20-byte header with the magic cookie at bytes 4..8, then TLV attributes
/// padded to 4 bytes. USERNAME is "ours:theirs" in requests we receive.
pub fn local_ufrag(data: &[u8]) -> Option<&str> {
    if data.len() < 20 || data[0] >= 4 || data[4..8] != MAGIC_COOKIE {
        return None;
    }
    let mut rest = &data[20..];
    while rest.len() >= 4 {
        let ty = u16::from_be_bytes([rest[0], rest[1]]);
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        let value = rest.get(4..4 + len)?;
        if ty == ATTR_USERNAME {
            let username = std::str::from_utf8(value).ok()?;
            return username.split(':').next();
        }
        let padded = (4 + len + 3) & !3;
        rest = rest.get(padded..)?;
    }
    None
}

fn set_len(out: &mut [u8], start: usize, len: usize) {
    out[start + 2..start + 4].copy_from_slice(&(len as u16).to_be_bytes());
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hmac() -> &'static dyn Sha1HmacProvider {
        // Leaked once per test process: the provider's parts are 'static references.
        let p = Box::leak(Box::new(str0m::crypto::from_feature_flags()));
        p.sha1_hmac_provider
    }

    fn creds() -> Credentials {
        Credentials {
            ufrag: "ours".into(),
            pass: "our-password-of-22-chars".into(),
        }
    }

    /// A binding request as a browser sends it: USERNAME, PRIORITY, ICE-CONTROLLING,
    /// MESSAGE-INTEGRITY (keyed with `pass`) and FINGERPRINT.
    fn request(user: &str, pass: &str) -> Vec<u8> {
        let h = hmac();
        let mut m = vec![0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42];
        m.extend_from_slice(b"txid-123456!");
        let attr = |m: &mut Vec<u8>, ty: u16, v: &[u8]| {
            m.extend_from_slice(&ty.to_be_bytes());
            m.extend_from_slice(&(v.len() as u16).to_be_bytes());
            m.extend_from_slice(v);
            m.resize(m.len().div_ceil(4) * 4, 0);
        };
        attr(&mut m, ATTR_USERNAME, user.as_bytes());
        attr(&mut m, 0x0024, &[1, 2, 3, 4]);
        attr(&mut m, 0x802a, &[9; 8]);
        let len = m.len() - 20 + 24;
        m[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        let mac = h.sha1_hmac(pass.as_bytes(), &[&m]);
        attr(&mut m, ATTR_MESSAGE_INTEGRITY, &mac);
        let len = m.len() - 20 + 8;
        m[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        let crc = crc32fast::hash(&m) ^ FINGERPRINT_XOR;
        attr(&mut m, ATTR_FINGERPRINT, &crc.to_be_bytes());
        m
    }

    #[test]
    fn a_valid_request_gets_a_complete_answer() {
        let req = request("ours:theirs", "our-password-of-22-chars");
        for source in ["192.0.2.7:54321", "[2001:db8::9]:40000"] {
            let source: SocketAddr = source.parse().unwrap();
            let mut out = vec![7]; // appends only
            answer(&req, source, &creds(), hmac(), &mut out).unwrap();
            let r = &out[1..];
            assert_eq!(&r[..2], &[1, 1], "binding success");
            assert_eq!(usize::from(u16::from_be_bytes([r[2], r[3]])), r.len() - 20);
            assert_eq!(&r[4..20], &req[4..20], "cookie and transaction id echoed");
            // XOR-MAPPED-ADDRESS decodes back to the source.
            assert_eq!(&r[20..22], &[0, 0x20]);
            let port = u16::from_be_bytes([r[26], r[27]]) ^ 0x2112;
            assert_eq!(port, source.port());
            let ip: IpAddr = if r[25] == 1 {
                let a: [u8; 4] = std::array::from_fn(|i| r[28 + i] ^ MAGIC_COOKIE[i]);
                a.into()
            } else {
                let a: [u8; 16] = std::array::from_fn(|i| r[28 + i] ^ req[4 + i]);
                a.into()
            };
            assert_eq!(ip, source.ip());
            // MESSAGE-INTEGRITY verifies with our password; FINGERPRINT with CRC-32.
            let fp_at = r.len() - 8;
            let mi_at = fp_at - 24;
            assert_eq!(&r[mi_at..mi_at + 2], &[0, 8]);
            let mut head = r[..20].to_vec();
            head[2..4].copy_from_slice(&((mi_at + 24 - 20) as u16).to_be_bytes());
            let mac = hmac().sha1_hmac(b"our-password-of-22-chars", &[&head, &r[20..mi_at]]);
            assert_eq!(&r[mi_at + 4..mi_at + 24], &mac);
            assert_eq!(&r[fp_at..fp_at + 4], &[0x80, 0x28, 0, 4]);
            let crc = crc32fast::hash(&r[..fp_at]) ^ FINGERPRINT_XOR;
            assert_eq!(&r[fp_at + 4..], &crc.to_be_bytes());
        }
    }

    #[test]
    fn requests_for_others_or_with_bad_integrity_are_refused() {
        let src: SocketAddr = "192.0.2.7:1".parse().unwrap();
        let mut out = Vec::new();
        let wrong_user = request("other:theirs", "our-password-of-22-chars");
        assert_eq!(
            answer(&wrong_user, src, &creds(), hmac(), &mut out),
            Err(Refused::WrongUser)
        );
        let wrong_key = request("ours:theirs", "not-our-password");
        assert_eq!(
            answer(&wrong_key, src, &creds(), hmac(), &mut out),
            Err(Refused::BadIntegrity)
        );
        let good = request("ours:theirs", "our-password-of-22-chars");
        let mut flipped = good.clone();
        flipped[30] ^= 1;
        assert!(answer(&flipped, src, &creds(), hmac(), &mut out).is_err());
        assert!(out.is_empty(), "nothing written for a refusal");
        // Every truncation and random bytes: refused, never a panic.
        for n in 0..good.len() {
            assert!(answer(&good[..n], src, &creds(), hmac(), &mut out).is_err());
        }
        let mut x: u32 = 0x1234_5678;
        for len in 0..200 {
            let mut noise: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            if noise.len() >= 20 {
                noise[..2].copy_from_slice(&[0, 1]);
                noise[4..8].copy_from_slice(&MAGIC_COOKIE);
            }
            assert!(answer(&noise, src, &creds(), hmac(), &mut out).is_err());
        }
        assert!(out.is_empty());
    }

    #[test]
    fn stun_username_parsing() {
        let mut pkt = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
        pkt.extend_from_slice(&[0; 12]);
        // An unrelated attribute first (PRIORITY, 4 bytes), then USERNAME "abcd:wxyz1" (10, padded).
        pkt.extend_from_slice(&[0x00, 0x24, 0x00, 0x04, 1, 2, 3, 4]);
        pkt.extend_from_slice(&[0x00, 0x06, 0x00, 0x0a]);
        pkt.extend_from_slice(b"abcd:wxyz1\0\0");
        assert_eq!(local_ufrag(&pkt), Some("abcd"));
        assert_eq!(local_ufrag(&pkt[..30]), None);
        assert_eq!(local_ufrag(&[0x80; 40]), None);
    }
}
