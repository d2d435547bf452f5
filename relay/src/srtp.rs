//! SRTP and SRTCP written by the fan-out itself, from the keys str0m's DTLS handshake exported.
//!
//! The fan-out sends every Opus packet to thousands of listeners. Going through each
//! listener's [`str0m::Rtc`] costs a packet's worth of machinery per listener; this module
//! costs one cipher call per listener per packet, appended straight into the caller's
//! reusable buffer. It is sans-IO and allocation-free on the send path.
//!
//! - Profiles (RFC 5764 / RFC 7714 DTLS-SRTP protection profiles): `AES128_CM_SHA1_80`
//!   (RFC 3711: AES counter mode, HMAC-SHA1 tag cut to 80 bits), `AEAD_AES_128_GCM` and
//!   `AEAD_AES_256_GCM` (RFC 7714: the 16-byte GCM tag authenticates, no HMAC).
//! - Keying material (RFC 5764 §4.2): `client_write_master_key | server_write_master_key |
//!   client_write_master_salt | server_write_master_salt`. The DTLS client sends with the
//!   client half and receives with the server half, the server the other way round.
//! - Session keys: the AES-CM PRF of RFC 3711 §4.3 with key derivation rate 0, which RFC 7714
//!   prescribes for the GCM profiles too (AES-256 in counter mode for the 256-bit key, as in
//!   RFC 6188). The GCM master salt is 96 bits; it is zero-padded at the end to the PRF's
//!   112 bits, as libsrtp (the browsers' SRTP) and str0m do.
//! - No MKI, SRTCP always encrypted (E bit set) when sending. Received SRTCP may be
//!   authenticated-only (E bit clear); it is accepted and returned as is.
//!
//! Crypto primitives are str0m's provider ([`CryptoProvider`]: AES-CTR, one AES block for
//! the key derivation, HMAC-SHA1), and RustCrypto's `aes-gcm` for the GCM profiles (see
//! [`Aead`]).

use std::fmt;

use aes_gcm::{AeadInPlace, KeyInit};

use str0m::crypto::dtls::SrtpProfile;
use str0m::crypto::{
    Aes128CmSha1_80Cipher, CryptoError, CryptoProvider, Sha1HmacProvider, SrtpProvider,
};
use tracing::warn;

use crate::Error;

/// The HMAC-SHA1-80 tag of `AES128_CM_SHA1_80`.
const HMAC_TAG_LEN: usize = 10;
/// The GCM tag of both AEAD profiles.
const GCM_TAG_LEN: usize = 16;
/// An RTP header without CSRCs or extension.
const RTP_HEADER_LEN: usize = 12;
/// The part of an RTCP packet SRTCP leaves in the clear: first word and sender SSRC.
const RTCP_HEADER_LEN: usize = 8;
/// The SRTCP trailer: E bit and 31-bit SRTCP index.
const SRTCP_TRAILER_LEN: usize = 4;
const E_BIT: u32 = 0x8000_0000;
/// Spare room behind counter-mode output: some providers want up to a block more than
/// the input. Written into `out` and cut off again: no scratch buffer is needed.
const CTR_SLACK: usize = 16;
/// Received SRTCP indices remembered for replay protection (RFC 3711 §3.3.2).
const REPLAY_WINDOW: u32 = 128;
/// The 48-bit SRTP packet index.
const INDEX_MASK: u64 = 0xffff_ffff_ffff;

/// The three profiles, with what this module needs to know about each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Suite {
    CmSha1,
    Gcm128,
    Gcm256,
}

impl Suite {
    fn from_profile(profile: SrtpProfile) -> Result<Self, Error> {
        match profile {
            SrtpProfile::AES128_CM_SHA1_80 => Ok(Self::CmSha1),
            SrtpProfile::AEAD_AES_128_GCM => Ok(Self::Gcm128),
            SrtpProfile::AEAD_AES_256_GCM => Ok(Self::Gcm256),
            other => Err(Error::WebRtc(format!("unsupported SRTP profile {other:?}"))),
        }
    }

    /// Master and session key length.
    fn key_len(self) -> usize {
        match self {
            Self::CmSha1 | Self::Gcm128 => 16,
            Self::Gcm256 => 32,
        }
    }

    /// Master and session salt length.
    fn salt_len(self) -> usize {
        match self {
            Self::CmSha1 => 14,
            Self::Gcm128 | Self::Gcm256 => 12,
        }
    }

    /// The profile's name in IANA's DTLS-SRTP registry (RFC 5764, RFC 7714).
    fn name(self) -> &'static str {
        match self {
            Self::CmSha1 => "SRTP_AES128_CM_HMAC_SHA1_80",
            Self::Gcm128 => "SRTP_AEAD_AES_128_GCM",
            Self::Gcm256 => "SRTP_AEAD_AES_256_GCM",
        }
    }

    fn tag_len(self) -> usize {
        match self {
            Self::CmSha1 => HMAC_TAG_LEN,
            Self::Gcm128 | Self::Gcm256 => GCM_TAG_LEN,
        }
    }
}

/// One listener's SRTP state, as the DTLS client or server: keys for what the relay sends
/// and for what the listener sends back.
///
/// `Send + Sync`. Holds no buffers: protecting writes only into the caller's `out`.
pub struct SrtpSession {
    suite: Suite,
    hmac: &'static dyn Sha1HmacProvider,
    tx_rtp: Transform,
    tx_rtcp: Transform,
    /// Made on first use: the relay never receives RTP, and each cipher is a few hundred
    /// bytes per listener.
    rx_rtp: Option<Transform>,
    rx_rtp_keys: SessionKeys,
    srtp: &'static dyn SrtpProvider,
    rx_rtcp: Transform,
    /// The SRTCP index the next sent packet carries.
    srtcp_index: u32,
    rtcp_replay: ReplayWindow,
}

impl fmt::Debug for SrtpSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys stay out of logs.
        f.debug_struct("SrtpSession")
            .field("suite", &self.suite)
            .field("srtcp_index", &self.srtcp_index)
            .finish_non_exhaustive()
    }
}

impl SrtpSession {
    /// One listener's SRTP state as the DTLS *server or client* (`dtls_client` picks which
    /// half of the keying material is ours).
    ///
    /// `material`: the raw DTLS-SRTP exporter bytes for `profile`. Errors
    /// ([`Error::WebRtc`]) on a length mismatch or unsupported profile.
    pub fn new(
        crypto: &CryptoProvider,
        profile: SrtpProfile,
        material: &[u8],
        dtls_client: bool,
    ) -> Result<Self, Error> {
        let suite = Suite::from_profile(profile)?;
        let (k, s) = (suite.key_len(), suite.salt_len());
        if material.len() != 2 * (k + s) {
            return Err(Error::WebRtc(format!(
                "{profile:?} needs {} bytes of keying material, got {}",
                2 * (k + s),
                material.len()
            )));
        }
        let client = (&material[..k], &material[2 * k..2 * k + s]);
        let server = (&material[k..2 * k], &material[2 * k + s..]);
        let (ours, theirs) = if dtls_client {
            (client, server)
        } else {
            (server, client)
        };
        let srtp = crypto.srtp_provider;
        let derive = |(key, salt): (&[u8], &[u8]), rtcp: bool, encrypt: bool| {
            let keys = SessionKeys::derive(srtp, suite, key, salt, rtcp);
            Transform::new(srtp, suite, &keys, encrypt)
        };
        Ok(Self {
            suite,
            hmac: crypto.sha1_hmac_provider,
            tx_rtp: derive(ours, false, true),
            tx_rtcp: derive(ours, true, true),
            rx_rtp: None,
            rx_rtp_keys: SessionKeys::derive(srtp, suite, theirs.0, theirs.1, false),
            srtp,
            rx_rtcp: derive(theirs, true, false),
            srtcp_index: 0,
            rtcp_replay: ReplayWindow::default(),
        })
    }

    /// The negotiated protection profile, by its registered name (`SRTP_AEAD_AES_128_GCM`, ...).
    pub fn profile_name(&self) -> &'static str {
        self.suite.name()
    }

    /// Bytes added to each RTP packet (tag length): 10 for AES-CM-SHA1-80, 16 for GCM.
    pub fn rtp_overhead(&self) -> usize {
        self.suite.tag_len()
    }

    /// Appends the SRTP packet for RTP `header` (complete RTP header incl. extensions, as
    /// bytes) + `payload` to `out` (which may already hold other bytes: append only).
    /// `index` is the 48-bit SRTP packet index (ROC << 16 | seq); the header's sequence
    /// number equals `index as u16`. Encrypting the same index twice (a retransmission)
    /// gives the same bytes.
    ///
    /// Allocates nothing beyond growing `out`. Panics if `header` is shorter than 12 bytes.
    /// Should the crypto provider fail (aws-lc never does for these lengths), nothing is
    /// appended and a warning is logged.
    pub fn protect_rtp(&mut self, header: &[u8], payload: &[u8], index: u64, out: &mut Vec<u8>) {
        assert!(
            header.len() >= RTP_HEADER_LEN,
            "an RTP header has 12 bytes at least"
        );
        debug_assert_eq!(
            u16::from_be_bytes([header[2], header[3]]),
            index as u16,
            "the header's sequence number is the index's low 16 bits"
        );
        let index = index & INDEX_MASK;
        let roc = (index >> 16) as u32;
        let ssrc = be32(&header[8..12]);
        let start = out.len();
        out.extend_from_slice(header);
        let body = out.len();
        let sealed = match &mut self.tx_rtp {
            Transform::CmSha1 { cipher, salt, auth } => {
                let iv = cm_iv(salt, ssrc, index);
                let r = ctr_append(cipher.as_mut(), &iv, payload, out, false);
                r.map(|()| {
                    let tag = self
                        .hmac
                        .sha1_hmac(auth, &[&out[start..], &roc.to_be_bytes()]);
                    out.extend_from_slice(&tag[..HMAC_TAG_LEN]);
                })
            }
            Transform::Gcm { aead, salt } => {
                let iv = gcm_rtp_iv(salt, ssrc, roc, index as u16);
                out.resize(body + payload.len() + GCM_TAG_LEN, 0);
                aead.seal(&iv, header, payload, &mut out[body..])
            }
        };
        if let Err(e) = sealed {
            out.truncate(start);
            warn!(error = %e, "SRTP protect failed, packet dropped");
        }
    }

    /// Appends the SRTCP form of the compound RTCP `packet` to `out`, using and advancing
    /// this session's own 31-bit SRTCP index (E bit set). The first packet carries index 0.
    ///
    /// Allocates nothing beyond growing `out`. Panics if `packet` is shorter than 8 bytes.
    /// Should the crypto provider fail, nothing is appended and a warning is logged.
    pub fn protect_rtcp(&mut self, packet: &[u8], out: &mut Vec<u8>) {
        assert!(
            packet.len() >= RTCP_HEADER_LEN,
            "an RTCP packet has 8 bytes at least"
        );
        let index = self.srtcp_index;
        // RFC 3711 §3.4: incremented modulo 2^31 (re-keying is due long before).
        self.srtcp_index = (index + 1) & !E_BIT;
        let trailer = (E_BIT | index).to_be_bytes();
        let ssrc = be32(&packet[4..8]);
        let (header, plain) = packet.split_at(RTCP_HEADER_LEN);
        let start = out.len();
        out.extend_from_slice(header);
        let body = out.len();
        let sealed = match &mut self.tx_rtcp {
            Transform::CmSha1 { cipher, salt, auth } => {
                let iv = cm_iv(salt, ssrc, u64::from(index));
                let r = ctr_append(cipher.as_mut(), &iv, plain, out, false);
                r.map(|()| {
                    out.extend_from_slice(&trailer);
                    let tag = self.hmac.sha1_hmac(auth, &[&out[start..]]);
                    out.extend_from_slice(&tag[..HMAC_TAG_LEN]);
                })
            }
            Transform::Gcm { aead, salt } => {
                let iv = gcm_rtcp_iv(salt, ssrc, index);
                let aad = rtcp_aad(header, trailer);
                out.resize(body + plain.len() + GCM_TAG_LEN, 0);
                aead.seal(&iv, &aad, plain, &mut out[body..])
                    .map(|()| out.extend_from_slice(&trailer))
            }
        };
        if let Err(e) = sealed {
            out.truncate(start);
            warn!(error = %e, "SRTCP protect failed, packet dropped");
        }
    }

    /// Authenticates and decrypts SRTCP from the peer (the other half of the keys). `None`
    /// for anything that does not authenticate, is too short, or replays an index already
    /// seen (a window of the last 128 indices, RFC 3711 §3.3.2). Returns the plain compound
    /// RTCP. Never panics, whatever the input.
    pub fn unprotect_rtcp(&mut self, packet: &[u8]) -> Option<Vec<u8>> {
        let tag_len = self.suite.tag_len();
        let len = packet.len();
        if len < RTCP_HEADER_LEN + SRTCP_TRAILER_LEN + tag_len {
            return None;
        }
        // AES-CM: ... | E+index | tag (RFC 3711 §3.4). GCM: ... | tag | E+index (RFC 7714 §9).
        let trailer_at = match self.rx_rtcp {
            Transform::CmSha1 { .. } => len - tag_len - SRTCP_TRAILER_LEN,
            Transform::Gcm { .. } => len - SRTCP_TRAILER_LEN,
        };
        let trailer: [u8; 4] = packet[trailer_at..trailer_at + 4].try_into().ok()?;
        let e_index = u32::from_be_bytes(trailer);
        let encrypted = e_index & E_BIT != 0;
        let index = e_index & !E_BIT;
        if !self.rtcp_replay.is_fresh(index) {
            return None;
        }
        let ssrc = be32(&packet[4..8]);
        let plain = match &mut self.rx_rtcp {
            Transform::CmSha1 { cipher, salt, auth } => {
                let tag_at = len - HMAC_TAG_LEN;
                let tag = self.hmac.sha1_hmac(auth, &[&packet[..tag_at]]);
                if !tags_match(&tag[..HMAC_TAG_LEN], &packet[tag_at..]) {
                    return None;
                }
                let body = &packet[RTCP_HEADER_LEN..trailer_at];
                let mut plain = Vec::with_capacity(trailer_at + CTR_SLACK);
                plain.extend_from_slice(&packet[..RTCP_HEADER_LEN]);
                if encrypted {
                    let iv = cm_iv(salt, ssrc, u64::from(index));
                    ctr_append(cipher.as_mut(), &iv, body, &mut plain, true).ok()?;
                } else {
                    plain.extend_from_slice(body);
                }
                plain
            }
            Transform::Gcm { aead, salt } => {
                let iv = gcm_rtcp_iv(salt, ssrc, index);
                if encrypted {
                    let (header, sealed) = packet[..trailer_at].split_at(RTCP_HEADER_LEN);
                    let aad = rtcp_aad(header, trailer);
                    let mut plain = vec![0; trailer_at - GCM_TAG_LEN];
                    plain[..RTCP_HEADER_LEN].copy_from_slice(header);
                    let n = aead
                        .open(&iv, &[&aad], sealed, &mut plain[RTCP_HEADER_LEN..])
                        .ok()?;
                    plain.truncate(RTCP_HEADER_LEN + n);
                    plain
                } else {
                    // E bit clear (RFC 7714 §9): nothing is encrypted, the whole packet and
                    // the trailer are the AAD, the plaintext is empty.
                    let tag_at = trailer_at - GCM_TAG_LEN;
                    let aads: [&[u8]; 2] = [&packet[..tag_at], &trailer];
                    aead.open(&iv, &aads, &packet[tag_at..trailer_at], &mut [])
                        .ok()?;
                    packet[..tag_at].to_vec()
                }
            }
        };
        self.rtcp_replay.accept(index);
        Some(plain)
    }

    /// Authenticates and decrypts SRTP sent with the *other* half of the keys (what the
    /// peer of this session would send), given the sender's rollover counter `roc`.
    /// Returns the plain RTP packet, header included.
    ///
    /// For tests (the fan-out's included) and diagnostics: it keeps no replay window and
    /// does not estimate the ROC. `None` for anything that does not authenticate or parse;
    /// never panics.
    pub fn unprotect_rtp(&mut self, packet: &[u8], roc: u32) -> Option<Vec<u8>> {
        let header_len = rtp_header_len(packet)?;
        let len = packet.len();
        if len < header_len + self.suite.tag_len() {
            return None;
        }
        let seq = u16::from_be_bytes([packet[2], packet[3]]);
        let ssrc = be32(&packet[8..12]);
        let (header, rest) = packet.split_at(header_len);
        let (srtp, suite, keys) = (self.srtp, self.suite, &self.rx_rtp_keys);
        let rx_rtp = self
            .rx_rtp
            .get_or_insert_with(|| Transform::new(srtp, suite, keys, false));
        match rx_rtp {
            Transform::CmSha1 { cipher, salt, auth } => {
                let tag_at = len - HMAC_TAG_LEN;
                let tag = self
                    .hmac
                    .sha1_hmac(auth, &[&packet[..tag_at], &roc.to_be_bytes()]);
                if !tags_match(&tag[..HMAC_TAG_LEN], &packet[tag_at..]) {
                    return None;
                }
                let mut plain = Vec::with_capacity(tag_at + CTR_SLACK);
                plain.extend_from_slice(header);
                let iv = cm_iv(salt, ssrc, (u64::from(roc) << 16) | u64::from(seq));
                ctr_append(
                    cipher.as_mut(),
                    &iv,
                    &packet[header_len..tag_at],
                    &mut plain,
                    true,
                )
                .ok()?;
                Some(plain)
            }
            Transform::Gcm { aead, salt } => {
                let iv = gcm_rtp_iv(salt, ssrc, roc, seq);
                let mut plain = vec![0; len - GCM_TAG_LEN];
                plain[..header_len].copy_from_slice(header);
                let n = aead
                    .open(&iv, &[header], rest, &mut plain[header_len..])
                    .ok()?;
                plain.truncate(header_len + n);
                Some(plain)
            }
        }
    }
}

/// One direction's session keys for RTP or RTCP (RFC 3711 §4.3).
struct SessionKeys {
    key: [u8; 32],
    salt: [u8; 14],
    auth: [u8; 20],
}

impl SessionKeys {
    fn derive(
        srtp: &dyn SrtpProvider,
        suite: Suite,
        master_key: &[u8],
        master_salt: &[u8],
        rtcp: bool,
    ) -> Self {
        // Labels (RFC 3711 §4.3.2): 0/1/2 encryption/authentication/salt for SRTP, 3/4/5 SRTCP.
        let base = if rtcp { 3 } else { 0 };
        let mut keys = Self {
            key: [0; 32],
            salt: [0; 14],
            auth: [0; 20],
        };
        let prf = |label, out: &mut [u8]| kdf(srtp, master_key, master_salt, label, out);
        prf(base, &mut keys.key[..suite.key_len()]);
        prf(base + 2, &mut keys.salt[..suite.salt_len()]);
        if suite == Suite::CmSha1 {
            prf(base + 1, &mut keys.auth);
        }
        keys
    }
}

/// The AES-CM PRF of RFC 3711 §4.3.1/§4.3.3 with key derivation rate 0 (so `r` = 0):
/// the keystream of AES in counter mode under the master key, starting at
/// `(master_salt XOR label << 48) << 16`, cut to `out.len()`. AES-256 for a 32-byte master
/// key (RFC 6188 §4.3). A 12-byte (GCM) salt is zero-padded at the end to 14 bytes.
fn kdf(srtp: &dyn SrtpProvider, master_key: &[u8], master_salt: &[u8], label: u8, out: &mut [u8]) {
    let mut x = [0u8; 16];
    x[..master_salt.len()].copy_from_slice(master_salt);
    x[7] ^= label;
    // Some providers write a padding block behind the one asked for.
    let mut block = [0u8; 32];
    for (counter, chunk) in (0u16..).zip(out.chunks_mut(16)) {
        x[14..].copy_from_slice(&counter.to_be_bytes());
        if master_key.len() == 32 {
            srtp.srtp_aes_256_ecb_round(master_key, &x, &mut block);
        } else {
            srtp.srtp_aes_128_ecb_round(master_key, &x, &mut block);
        }
        chunk.copy_from_slice(&block[..chunk.len()]);
    }
}

/// One direction's cipher for RTP or RTCP.
enum Transform {
    CmSha1 {
        cipher: Box<dyn Aes128CmSha1_80Cipher>,
        salt: [u8; 14],
        auth: [u8; 20],
    },
    Gcm {
        /// Boxed: an AES key schedule for each of AES-NI and software is ~1 KiB.
        aead: Box<Aead>,
        salt: [u8; 12],
    },
}

impl Transform {
    fn new(srtp: &dyn SrtpProvider, suite: Suite, keys: &SessionKeys, encrypt: bool) -> Self {
        let mut key16 = [0u8; 16];
        key16.copy_from_slice(&keys.key[..16]);
        let mut salt12 = [0u8; 12];
        salt12.copy_from_slice(&keys.salt[..12]);
        match suite {
            Suite::CmSha1 => Self::CmSha1 {
                cipher: srtp.aes_128_cm_sha1_80().create_cipher(key16, encrypt),
                salt: keys.salt,
                auth: keys.auth,
            },
            Suite::Gcm128 => Self::Gcm {
                aead: Box::new(Aead::A128(aes_gcm::Aes128Gcm::new(&key16.into()))),
                salt: salt12,
            },
            Suite::Gcm256 => Self::Gcm {
                aead: Box::new(Aead::A256(aes_gcm::Aes256Gcm::new(&keys.key.into()))),
                salt: salt12,
            },
        }
    }
}

/// AES-GCM, 128- or 256-bit keys.
///
/// RustCrypto's `aes-gcm` (AES-NI and carry-less multiply when the CPU has them) rather
/// than the provider's aws-lc ciphers, which allocate a context per cipher in the C heap
/// and cost more per call for packets of a few hundred bytes. Measured with 1,200
/// listeners on one shard: 2.7–3.1 µs per packet and 15.3 KiB resident per listener,
/// against 3.3–4.0 µs and 17.5–18.4 KiB through aws-lc (docs/benchmarks.md).
// Boxed as a whole where it is kept (`Transform::Gcm`): the variants' size gap costs nothing.
#[allow(clippy::large_enum_variant)]
enum Aead {
    A128(aes_gcm::Aes128Gcm),
    A256(aes_gcm::Aes256Gcm),
}

impl Aead {
    /// `output` = ciphertext || 16-byte tag, exactly `input.len() + 16` bytes.
    fn seal(
        &mut self,
        iv: &[u8; 12],
        aad: &[u8],
        input: &[u8],
        output: &mut [u8],
    ) -> Result<(), CryptoError> {
        let len = input.len();
        if output.len() < len + GCM_TAG_LEN {
            return Err(CryptoError::Other(
                "GCM output shorter than input and tag".into(),
            ));
        }
        let (body, tag_out) = output.split_at_mut(len);
        body.copy_from_slice(input);
        let nonce = aes_gcm::Nonce::from_slice(iv);
        let tag = match self {
            Self::A128(c) => c.encrypt_in_place_detached(nonce, aad, body),
            Self::A256(c) => c.encrypt_in_place_detached(nonce, aad, body),
        }
        .map_err(|_| CryptoError::Other("AES-GCM seal failed".into()))?;
        tag_out[..GCM_TAG_LEN].copy_from_slice(&tag);
        Ok(())
    }

    /// `input` = ciphertext || tag (at least 16 bytes); returns the plaintext length.
    fn open(
        &mut self,
        iv: &[u8; 12],
        aads: &[&[u8]],
        input: &[u8],
        output: &mut [u8],
    ) -> Result<usize, CryptoError> {
        if input.len() < GCM_TAG_LEN || output.len() < input.len() - GCM_TAG_LEN {
            return Err(CryptoError::Other("GCM input shorter than its tag".into()));
        }
        let len = input.len() - GCM_TAG_LEN;
        let (ciphertext, tag) = input.split_at(len);
        let body = &mut output[..len];
        body.copy_from_slice(ciphertext);
        // SRTP's AAD is the header; SRTCP's is the header and a 4-byte trailer, joined (only
        // on receipt of a listener's RTCP, every few seconds).
        let joined;
        let aad: &[u8] = match aads {
            [one] => one,
            _ => {
                joined = aads.concat();
                &joined
            }
        };
        let nonce = aes_gcm::Nonce::from_slice(iv);
        let tag = aes_gcm::Tag::from_slice(tag);
        match self {
            Self::A128(c) => c.decrypt_in_place_detached(nonce, aad, body, tag),
            Self::A256(c) => c.decrypt_in_place_detached(nonce, aad, body, tag),
        }
        .map(|()| len)
        .map_err(|_| CryptoError::Other("AES-GCM open failed".into()))
    }
}

/// Appends `input` XOR the AES-CTR keystream from `iv` to `out` (encrypting or, with
/// `decrypt`, decrypting: the same operation, but a provider may key the two differently).
fn ctr_append(
    cipher: &mut dyn Aes128CmSha1_80Cipher,
    iv: &[u8; 16],
    input: &[u8],
    out: &mut Vec<u8>,
    decrypt: bool,
) -> Result<(), CryptoError> {
    if input.is_empty() {
        return Ok(());
    }
    let at = out.len();
    out.resize(at + input.len() + CTR_SLACK, 0);
    let r = if decrypt {
        cipher.decrypt(iv, input, &mut out[at..])
    } else {
        cipher.encrypt(iv, input, &mut out[at..])
    };
    out.truncate(at + input.len());
    r
}

/// AES-CM IV (RFC 3711 §4.1.1): `(salt << 16) XOR (SSRC << 64) XOR (index << 16)`, with
/// the 48-bit SRTP index or the 31-bit SRTCP index.
fn cm_iv(salt: &[u8; 14], ssrc: u32, index: u64) -> [u8; 16] {
    let mut iv = [0u8; 16];
    iv[4..8].copy_from_slice(&ssrc.to_be_bytes());
    iv[8..14].copy_from_slice(&index.to_be_bytes()[2..]);
    for (b, s) in iv.iter_mut().zip(salt) {
        *b ^= s;
    }
    iv
}

/// GCM IV for SRTP (RFC 7714 §8.1): `00 00 | SSRC | ROC | SEQ`, XOR the salt.
fn gcm_rtp_iv(salt: &[u8; 12], ssrc: u32, roc: u32, seq: u16) -> [u8; 12] {
    let mut iv = [0u8; 12];
    iv[2..6].copy_from_slice(&ssrc.to_be_bytes());
    iv[6..10].copy_from_slice(&roc.to_be_bytes());
    iv[10..12].copy_from_slice(&seq.to_be_bytes());
    for (b, s) in iv.iter_mut().zip(salt) {
        *b ^= s;
    }
    iv
}

/// GCM IV for SRTCP (RFC 7714 §9.1): `00 00 | SSRC | 00 00 | 0 + 31-bit index`, XOR the salt.
fn gcm_rtcp_iv(salt: &[u8; 12], ssrc: u32, index: u32) -> [u8; 12] {
    let mut iv = [0u8; 12];
    iv[2..6].copy_from_slice(&ssrc.to_be_bytes());
    iv[8..12].copy_from_slice(&(index & !E_BIT).to_be_bytes());
    for (b, s) in iv.iter_mut().zip(salt) {
        *b ^= s;
    }
    iv
}

/// GCM AAD of encrypted SRTCP (RFC 7714 §9): the clear 8 bytes, then E bit and index.
fn rtcp_aad(header: &[u8], trailer: [u8; 4]) -> [u8; 12] {
    let mut aad = [0u8; 12];
    aad[..RTCP_HEADER_LEN].copy_from_slice(&header[..RTCP_HEADER_LEN]);
    aad[RTCP_HEADER_LEN..].copy_from_slice(&trailer);
    aad
}

/// Length of the RTP header at the start of `packet`: fixed part, CSRCs, extension.
fn rtp_header_len(packet: &[u8]) -> Option<usize> {
    let first = *packet.first()?;
    let mut len = RTP_HEADER_LEN + 4 * usize::from(first & 0x0f);
    if first & 0x10 != 0 {
        let ext = packet.get(len..len + 4)?;
        len += 4 + 4 * usize::from(u16::from_be_bytes([ext[2], ext[3]]));
    }
    (len <= packet.len()).then_some(len)
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Compares tags without a data-dependent early exit.
fn tags_match(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Which received SRTCP indices were already accepted: the newest, and a bit for each of
/// the [`REPLAY_WINDOW`] before it. Older indices are refused.
#[derive(Debug, Default)]
struct ReplayWindow {
    newest: Option<u32>,
    /// Bit `i` set: index `newest - i` was accepted.
    seen: u128,
}

impl ReplayWindow {
    fn is_fresh(&self, index: u32) -> bool {
        match self.newest {
            None => true,
            Some(newest) if index > newest => true,
            Some(newest) => {
                let age = newest - index;
                age < REPLAY_WINDOW && self.seen & (1 << age) == 0
            }
        }
    }

    /// Records `index`, which [`Self::is_fresh`] allowed and which authenticated.
    fn accept(&mut self, index: u32) {
        match self.newest {
            Some(newest) if index <= newest => self.seen |= 1 << (newest - index),
            Some(newest) => {
                let shift = index - newest;
                self.seen = if shift >= REPLAY_WINDOW {
                    0
                } else {
                    self.seen << shift
                };
                self.seen |= 1;
                self.newest = Some(index);
            }
            None => {
                self.seen = 1;
                self.newest = Some(index);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROFILES: [SrtpProfile; 3] = [
        SrtpProfile::AES128_CM_SHA1_80,
        SrtpProfile::AEAD_AES_128_GCM,
        SrtpProfile::AEAD_AES_256_GCM,
    ];

    fn provider() -> CryptoProvider {
        str0m::crypto::from_feature_flags()
    }

    fn hex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
        assert_eq!(digits.len() % 2, 0, "odd number of hex digits");
        digits
            .chunks(2)
            .map(|d| u8::from_str_radix(std::str::from_utf8(d).unwrap(), 16).unwrap())
            .collect()
    }

    fn to_hex(b: &[u8]) -> String {
        b.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Keying material in the RFC 5764 layout with `key`/`salt` as one side's master key
    /// and salt, and unrelated bytes as the other side's.
    fn material(client: bool, key: &[u8], salt: &[u8]) -> Vec<u8> {
        let other_key = vec![0x5a; key.len()];
        let other_salt = vec![0xa5; salt.len()];
        let (ck, sk, cs, ss) = if client {
            (key, &other_key[..], salt, &other_salt[..])
        } else {
            (&other_key[..], key, &other_salt[..], salt)
        };
        [ck, sk, cs, ss].concat()
    }

    /// A DTLS client's and a DTLS server's session from the same keying material.
    fn pair(profile: SrtpProfile) -> (SrtpSession, SrtpSession) {
        let crypto = provider();
        let suite = Suite::from_profile(profile).unwrap();
        let len = 2 * (suite.key_len() + suite.salt_len());
        let material: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(37) ^ 0x6b)
            .collect();
        (
            SrtpSession::new(&crypto, profile, &material, true).unwrap(),
            SrtpSession::new(&crypto, profile, &material, false).unwrap(),
        )
    }

    /// A session keyed directly with session key and salt in both directions and for both
    /// RTP and RTCP, as the RFC 7714 vectors are given (no key derivation).
    fn with_session_keys(suite: Suite, key: &[u8], salt: &[u8]) -> SrtpSession {
        let crypto = provider();
        let mut keys = SessionKeys {
            key: [0; 32],
            salt: [0; 14],
            auth: [0; 20],
        };
        keys.key[..key.len()].copy_from_slice(key);
        keys.salt[..salt.len()].copy_from_slice(salt);
        let t = |encrypt| Transform::new(crypto.srtp_provider, suite, &keys, encrypt);
        SrtpSession {
            suite,
            hmac: crypto.sha1_hmac_provider,
            tx_rtp: t(true),
            tx_rtcp: t(true),
            rx_rtp: Some(t(false)),
            rx_rtp_keys: SessionKeys {
                key: keys.key,
                salt: keys.salt,
                auth: keys.auth,
            },
            srtp: crypto.srtp_provider,
            rx_rtcp: t(false),
            srtcp_index: 0,
            rtcp_replay: ReplayWindow::default(),
        }
    }

    /// An RTP header with one CSRC and a one-byte header extension: 24 bytes.
    fn rtp_header(seq: u16, ssrc: u32) -> Vec<u8> {
        let mut h = vec![0x91, 0x6f];
        h.extend_from_slice(&seq.to_be_bytes());
        h.extend_from_slice(&0x0102_0304u32.to_be_bytes());
        h.extend_from_slice(&ssrc.to_be_bytes());
        h.extend_from_slice(&0xc5c5_c5c5u32.to_be_bytes());
        h.extend_from_slice(&[0xbe, 0xde, 0x00, 0x01, 0x10, 0x42, 0x00, 0x00]);
        h
    }

    /// A receiver report with `blocks` report blocks.
    fn rtcp_packet(ssrc: u32, blocks: u8) -> Vec<u8> {
        let words = 1 + 6 * u16::from(blocks);
        let mut p = vec![0x80 | blocks, 201];
        p.extend_from_slice(&words.to_be_bytes());
        p.extend_from_slice(&ssrc.to_be_bytes());
        p.extend((0..24 * usize::from(blocks)).map(|i| i as u8));
        p
    }

    /// Splits a plain RTP packet into header and payload.
    fn split_rtp(packet: &[u8]) -> (&[u8], &[u8]) {
        packet.split_at(rtp_header_len(packet).unwrap())
    }

    // RFC 3711 appendix B.3: master key and salt to session encryption key, salt and
    // authentication key (the first 20 bytes the RFC lists).
    #[test]
    fn key_derivation_matches_rfc_3711_b3() {
        let crypto = provider();
        let key = hex("e1f97a0d3e018be0d64fa32c06de4139");
        let salt = hex("0ec675ad498afeebb6960b3aabe6");
        let keys = SessionKeys::derive(crypto.srtp_provider, Suite::CmSha1, &key, &salt, false);
        assert_eq!(to_hex(&keys.key[..16]), "c61e7a93744f39ee10734afe3ff7a087");
        assert_eq!(to_hex(&keys.salt), "30cbbc08863d8c85d49db34a9ae1");
        assert_eq!(
            to_hex(&keys.auth),
            "cebe321f6ff7716b6fd4ab49af256a156d38baa4"
        );
    }

    // RFC 6188 §7.2: the AES-256 PRF, which AEAD_AES_256_GCM derives its keys with.
    #[test]
    fn key_derivation_matches_rfc_6188_aes_256() {
        let crypto = provider();
        let key = hex("f0f04914b513f2763a1b1fa130f10e2998f6f6e43e4309d1e622a0e332b9f1b6");
        let salt = hex("3b04803de51ee7c96423ab5b78d2");
        let srtp = crypto.srtp_provider;
        let mut out = [0u8; 32];
        kdf(srtp, &key, &salt, 0, &mut out);
        assert_eq!(
            to_hex(&out),
            "5ba1064e30ec51613cad926c5a28ef731ec7fb397f70a960653caf06554cd8c4"
        );
        let mut out = [0u8; 14];
        kdf(srtp, &key, &salt, 2, &mut out);
        assert_eq!(to_hex(&out), "fa31791685ca444a9e07c6c64e93");
        let mut out = [0u8; 20];
        kdf(srtp, &key, &salt, 1, &mut out);
        assert_eq!(to_hex(&out), "fd9c32d39ed5fbb5a9dc96b30818454d1313dc05");
    }

    // RFC 3711 appendix B.2 (libsrtp's AES-ICM test case 0): the keystream for SSRC 0 and
    // index 0 is AES-CTR from the salt shifted up 16 bits.
    #[test]
    fn aes_cm_keystream_matches_rfc_3711_b2() {
        let crypto = provider();
        let key: [u8; 16] = hex("2b7e151628aed2a6abf7158809cf4f3c").try_into().unwrap();
        let salt: [u8; 14] = hex("f0f1f2f3f4f5f6f7f8f9fafbfcfd").try_into().unwrap();
        let iv = cm_iv(&salt, 0, 0);
        assert_eq!(to_hex(&iv), "f0f1f2f3f4f5f6f7f8f9fafbfcfd0000");
        let mut cipher = crypto
            .srtp_provider
            .aes_128_cm_sha1_80()
            .create_cipher(key, true);
        let mut keystream = Vec::new();
        ctr_append(cipher.as_mut(), &iv, &[0; 32], &mut keystream, false).unwrap();
        assert_eq!(
            to_hex(&keystream),
            "e03ead0935c95e80e166b16dd92b4eb4d23513162b02d0f72a43a2fe4a5f97ab"
        );
    }

    #[test]
    fn iv_layouts() {
        let salt14: [u8; 14] = std::array::from_fn(|i| 0xf0 | i as u8);
        // SSRC in bytes 4..8, the 48-bit index in bytes 8..14, salt over bytes 0..14.
        let iv = cm_iv(&[0; 14], 0x1122_3344, 0xaabb_ccdd_eeff);
        assert_eq!(to_hex(&iv), "0000000011223344aabbccddeeff0000");
        let iv = cm_iv(&salt14, 0, 0);
        assert_eq!(&iv[..14], &salt14);
        // RFC 7714 §16.1: SSRC 5501a0b2, ROC 0, SEQ f17b under "Quid pro quo".
        let salt12: [u8; 12] = hex("517569642070726f2071756f").try_into().unwrap();
        assert_eq!(
            to_hex(&gcm_rtp_iv(&salt12, 0x5501_a0b2, 0, 0xf17b)),
            "51753c6580c2726f20718414"
        );
        let iv = gcm_rtp_iv(&[0; 12], 0x1122_3344, 0x5566_7788, 0x99aa);
        assert_eq!(to_hex(&iv), "0000112233445566778899aa");
        let iv = gcm_rtcp_iv(&[0; 12], 0x1122_3344, 0x7fff_fffe);
        assert_eq!(to_hex(&iv), "00001122334400007ffffffe");
    }

    /// Checks one profile against one of libsrtp's reference packets (test/srtp_driver.c,
    /// `srtp_validate` and `srtp_validate_gcm`): master `key` and `salt` as our own half,
    /// SSRC 0xcafebabe, sequence number 0x1234, SRTCP index 1.
    fn check_libsrtp(profile: SrtpProfile, key: &str, salt: &str, srtp: &str, srtcp: &str) {
        let crypto = provider();
        let (key, salt) = (hex(key), hex(salt));
        let rtp = hex("800f1234decafbadcafebabe abababababababababababababababab");
        let rtcp = hex("81c8000bcafebabe abababababababababababababababab");
        let (srtp, srtcp) = (hex(srtp), hex(srtcp));
        for dtls_client in [true, false] {
            let ours = material(dtls_client, &key, &salt);
            let mut s = SrtpSession::new(&crypto, profile, &ours, dtls_client).unwrap();
            let (header, payload) = rtp.split_at(12);
            let mut out = vec![0xee; 5];
            s.protect_rtp(header, payload, 0x1234, &mut out);
            assert_eq!(out[..5], [0xee; 5], "{profile:?}: bytes before are kept");
            assert_eq!(to_hex(&out[5..]), to_hex(&srtp), "{profile:?} SRTP");

            // libsrtp numbers its first SRTCP packet 1, this module 0: send one first.
            s.protect_rtcp(&rtcp, &mut Vec::new());
            let mut out = Vec::new();
            s.protect_rtcp(&rtcp, &mut out);
            assert_eq!(to_hex(&out), to_hex(&srtcp), "{profile:?} SRTCP");

            // The peer's session receives with that half.
            let mut peer = SrtpSession::new(&crypto, profile, &ours, !dtls_client).unwrap();
            assert_eq!(peer.unprotect_rtp(&srtp, 0), Some(rtp.clone()));
            assert_eq!(peer.unprotect_rtcp(&srtcp), Some(rtcp.clone()));
        }
    }

    #[test]
    fn aes_cm_sha1_80_matches_libsrtp() {
        check_libsrtp(
            SrtpProfile::AES128_CM_SHA1_80,
            "e1f97a0d3e018be0d64fa32c06de4139",
            "0ec675ad498afeebb6960b3aabe6",
            "800f1234decafbadcafebabe4e55dc4ce79978d88ca4d215949d2402b78d6acc99ea179b8dbb",
            "81c8000bcafebabe7128035be487b9bdbef89041f977a5a880000001993e08cd54d6c1230798",
        );
    }

    // The GCM master salt is 96 bits; this pins how it enters the 112-bit KDF.
    #[test]
    fn aead_aes_128_gcm_with_key_derivation_matches_libsrtp() {
        check_libsrtp(
            SrtpProfile::AEAD_AES_128_GCM,
            "000102030405060708090a0b0c0d0e0f",
            "a0a1a2a3a4a5a6a7a8a9aaab",
            "800f1234decafbadcafebabec5002ede04cfdd2eb91159e0880aa06e\
             d2976826f796b201df3131a127e8a392",
            "81c8000bcafebabec98b8b5df0392a55852b6c21ac8e7025\
             c52c6fbea2b3b446ea31123ba88ce61e80000001",
        );
    }

    // RFC 7714 §16 and §17: packets under the given session key and salt.
    const RFC7714_SALT: &str = "517569642070726f2071756f";
    const RFC7714_RTP: &str = "8040f17b8041f8d35501a0b2\
        47616c6c696120657374206f6d6e69732064697669736120696e207061727465732074726573";
    const RFC7714_RTCP: &str = "81c8000d4d6172734e5450314e545032525450200000042a\
        0000e9304c756e61deadbeefdeadbeefdeadbeefdeadbeefdeadbeef";

    fn check_rfc7714(suite: Suite, key: &str, srtp: &str, srtcp: &str, tag_only: &str) {
        let (rtp, rtcp) = (hex(RFC7714_RTP), hex(RFC7714_RTCP));
        let (srtp, srtcp) = (hex(srtp), hex(srtcp));
        let mut s = with_session_keys(suite, &hex(key), &hex(RFC7714_SALT));

        let (header, payload) = rtp.split_at(12);
        let mut out = Vec::new();
        s.protect_rtp(header, payload, 0xf17b, &mut out);
        assert_eq!(to_hex(&out), to_hex(&srtp), "{suite:?} SRTP");
        assert_eq!(s.unprotect_rtp(&srtp, 0), Some(rtp));

        s.srtcp_index = 0x5d4;
        let mut out = Vec::new();
        s.protect_rtcp(&rtcp, &mut out);
        assert_eq!(to_hex(&out), to_hex(&srtcp), "{suite:?} SRTCP");
        assert_eq!(s.srtcp_index, 0x5d5);
        assert_eq!(s.unprotect_rtcp(&srtcp), Some(rtcp.clone()));

        // Authenticated only (E bit clear): a fresh session, the index was just seen.
        let mut s = with_session_keys(suite, &hex(key), &hex(RFC7714_SALT));
        let tagged = [rtcp.clone(), hex(tag_only), hex("000005d4")].concat();
        assert_eq!(s.unprotect_rtcp(&tagged), Some(rtcp));
        assert_eq!(s.unprotect_rtcp(&tagged), None, "replayed");
    }

    #[test]
    fn aead_aes_128_gcm_matches_rfc_7714() {
        check_rfc7714(
            Suite::Gcm128,
            "000102030405060708090a0b0c0d0e0f",
            // §16.1.1
            "8040f17b8041f8d35501a0b2f24de3a3fb34de6cacba861c9d7e4bcabe633bd50d294e6f\
             42a5f47a51c7d19b36de3adf8833899d7f27beb16a9152cf765ee4390cce",
            // §17.1
            "81c8000d4d61727363e94885dcdab67ca727d7662f6b7e997ff5c0f76c06f32dc676a5f1\
             730d6fda4ce09b4686303ded0bb9275bc84aa45896cf4d2fc5abf87245d9eade800005d4",
            // §17.3
            "841dd9683dd78ec92ae58790125f62b3",
        );
    }

    #[test]
    fn aead_aes_256_gcm_matches_rfc_7714() {
        check_rfc7714(
            Suite::Gcm256,
            "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
            // §16.2.1
            "8040f17b8041f8d35501a0b232b1de78a822fe12ef9f78fa332e33aab18012389a58e2f3\
             b50b2a0276ffae0f1ba63799b87b7aa3db36dfffd6b0f9bb7878d7a76c13",
            // §17.2
            "81c8000d4d617273d50ae4d1f5ce5d304ba297e47d470c282c3ece5dbffe0a50a2eaa5c1\
             110555be8415f658c61de0476f1b6fad1d1eb30c4446839f57ff6f6cb26ac3be800005d4",
            // §17.4
            "91db4afbfeee5a978fab4393ed2615fe",
        );
    }

    #[test]
    fn keying_material_of_the_wrong_length_is_refused() {
        let crypto = provider();
        for profile in PROFILES {
            let suite = Suite::from_profile(profile).unwrap();
            let len = 2 * (suite.key_len() + suite.salt_len());
            for bad in [0, len - 1, len + 1, 2 * len] {
                let r = SrtpSession::new(&crypto, profile, &vec![7; bad], true);
                assert!(matches!(r, Err(Error::WebRtc(_))), "{profile:?} {bad}");
            }
            assert!(SrtpSession::new(&crypto, profile, &vec![7; len], false).is_ok());
        }
    }

    #[test]
    fn overhead_is_the_tag() {
        let (c, _) = pair(SrtpProfile::AES128_CM_SHA1_80);
        assert_eq!(c.rtp_overhead(), 10);
        for profile in [SrtpProfile::AEAD_AES_128_GCM, SrtpProfile::AEAD_AES_256_GCM] {
            assert_eq!(pair(profile).0.rtp_overhead(), 16);
        }
    }

    #[test]
    fn sessions_can_move_between_threads() {
        fn check<T: Send + Sync>() {}
        check::<SrtpSession>();
    }

    fn round_trip(profile: SrtpProfile, tx: &mut SrtpSession, rx: &mut SrtpSession) {
        let prefix = [0x3c; 7];
        for index in [0u64, 1, 0xffff, 0x1_0000, 0x2_1234, 0xffff_ffff_ffff] {
            let header = rtp_header(index as u16, 0xfeed_f00d);
            for len in [0usize, 1, 15, 16, 17, 160, 1200] {
                let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
                let mut out = prefix.to_vec();
                tx.protect_rtp(&header, &payload, index, &mut out);
                let srtp = &out[prefix.len()..];
                assert_eq!(out[..prefix.len()], prefix);
                assert_eq!(srtp.len(), header.len() + len + tx.rtp_overhead());
                assert_eq!(&srtp[..header.len()], &header[..], "header in the clear");
                if len >= 4 {
                    assert_ne!(&srtp[header.len()..header.len() + len], &payload[..]);
                }
                let roc = (index >> 16) as u32;
                let plain = rx.unprotect_rtp(srtp, roc).expect("authenticates");
                assert_eq!(
                    split_rtp(&plain),
                    (&header[..], &payload[..]),
                    "{profile:?}"
                );
                assert_eq!(
                    rx.unprotect_rtp(srtp, roc ^ 1),
                    None,
                    "ROC is authenticated"
                );
                assert_eq!(tx.unprotect_rtp(srtp, roc), None, "keys are per direction");
            }
        }
        for blocks in [0, 1, 3] {
            let rtcp = rtcp_packet(0x0bad_cafe, blocks);
            let mut out = prefix.to_vec();
            tx.protect_rtcp(&rtcp, &mut out);
            let srtcp = &out[prefix.len()..];
            assert_eq!(out[..prefix.len()], prefix);
            assert_eq!(srtcp.len(), rtcp.len() + 4 + tx.rtp_overhead());
            assert_eq!(&srtcp[..8], &rtcp[..8]);
            if blocks > 0 {
                assert_ne!(&srtcp[8..rtcp.len()], &rtcp[8..]);
            }
            assert_eq!(tx.unprotect_rtcp(srtcp), None, "keys are per direction");
            assert_eq!(rx.unprotect_rtcp(srtcp), Some(rtcp), "{profile:?}");
        }
    }

    #[test]
    fn client_and_server_sessions_understand_each_other() {
        for profile in PROFILES {
            let (mut client, mut server) = pair(profile);
            round_trip(profile, &mut client, &mut server);
            round_trip(profile, &mut server, &mut client);
        }
    }

    #[test]
    fn a_retransmission_encrypts_to_the_same_bytes() {
        for profile in PROFILES {
            let (mut c, _) = pair(profile);
            let payload = [0x42; 80];
            let seal = |c: &mut SrtpSession, index: u64| {
                let mut out = Vec::new();
                c.protect_rtp(&rtp_header(index as u16, 9), &payload, index, &mut out);
                out
            };
            let first = seal(&mut c, 0x3_0007);
            seal(&mut c, 0x3_0008);
            assert_eq!(seal(&mut c, 0x3_0007), first, "{profile:?}");
            assert_ne!(
                seal(&mut c, 0x4_0007),
                first,
                "{profile:?}: ROC is in the IV"
            );
        }
    }

    #[test]
    fn srtcp_indices_count_up_from_zero() {
        for profile in PROFILES {
            let (mut c, _) = pair(profile);
            let trailer = |c: &mut SrtpSession| {
                let mut out = Vec::new();
                c.protect_rtcp(&rtcp_packet(1, 1), &mut out);
                let at = match c.suite {
                    Suite::CmSha1 => out.len() - HMAC_TAG_LEN - 4,
                    Suite::Gcm128 | Suite::Gcm256 => out.len() - 4,
                };
                be32(&out[at..])
            };
            assert_eq!(trailer(&mut c), 0x8000_0000);
            assert_eq!(trailer(&mut c), 0x8000_0001);
            c.srtcp_index = 0x7fff_ffff;
            assert_eq!(trailer(&mut c), 0xffff_ffff);
            assert_eq!(trailer(&mut c), 0x8000_0000, "wraps modulo 2^31");
        }
    }

    #[test]
    fn replayed_srtcp_is_refused() {
        for profile in PROFILES {
            let (mut c, mut s) = pair(profile);
            let sent: Vec<Vec<u8>> = (0..300)
                .map(|_| {
                    let mut out = Vec::new();
                    c.protect_rtcp(&rtcp_packet(5, 1), &mut out);
                    out
                })
                .collect();
            assert!(s.unprotect_rtcp(&sent[0]).is_some());
            assert!(s.unprotect_rtcp(&sent[0]).is_none(), "{profile:?}");
            assert!(s.unprotect_rtcp(&sent[2]).is_some());
            assert!(s.unprotect_rtcp(&sent[1]).is_some(), "late but new");
            assert!(s.unprotect_rtcp(&sent[1]).is_none());
            assert!(s.unprotect_rtcp(&sent[2]).is_none());
            assert!(s.unprotect_rtcp(&sent[299]).is_some());
            assert!(
                s.unprotect_rtcp(&sent[299 - 127]).is_some(),
                "oldest in window"
            );
            assert!(
                s.unprotect_rtcp(&sent[299 - 128]).is_none(),
                "behind the window"
            );
            assert!(s.unprotect_rtcp(&sent[3]).is_none());
            // A failed attempt does not burn the index.
            let mut forged = sent[298].clone();
            forged[9] ^= 1;
            assert!(s.unprotect_rtcp(&forged).is_none());
            assert!(s.unprotect_rtcp(&sent[298]).is_some());
        }
    }

    #[test]
    fn any_flipped_bit_is_refused() {
        for profile in PROFILES {
            let (mut c, mut s) = pair(profile);
            let mut srtp = Vec::new();
            c.protect_rtp(&rtp_header(77, 3), &[9; 40], 77, &mut srtp);
            let mut srtcp = Vec::new();
            c.protect_rtcp(&rtcp_packet(3, 2), &mut srtcp);
            for bit in 0..8 * srtp.len() {
                let mut bad = srtp.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                assert_eq!(s.unprotect_rtp(&bad, 0), None, "{profile:?} RTP bit {bit}");
            }
            for bit in 0..8 * srtcp.len() {
                let mut bad = srtcp.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                assert_eq!(s.unprotect_rtcp(&bad), None, "{profile:?} RTCP bit {bit}");
            }
            assert!(s.unprotect_rtp(&srtp, 0).is_some());
            assert!(s.unprotect_rtcp(&srtcp).is_some());
        }
    }

    #[test]
    fn truncated_extended_and_garbage_input_is_refused() {
        // xorshift64: reproducible noise.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        };
        for profile in PROFILES {
            let (mut c, mut s) = pair(profile);
            let mut srtp = Vec::new();
            c.protect_rtp(&rtp_header(1, 3), &[1; 30], 1, &mut srtp);
            let mut srtcp = Vec::new();
            c.protect_rtcp(&rtcp_packet(3, 1), &mut srtcp);
            for len in 0..srtp.len() {
                assert_eq!(s.unprotect_rtp(&srtp[..len], 0), None, "{profile:?} {len}");
                assert_eq!(
                    s.unprotect_rtp(&srtp[len + 1..], 0),
                    None,
                    "{profile:?} {len}"
                );
            }
            for len in 0..srtcp.len() {
                assert_eq!(s.unprotect_rtcp(&srtcp[..len]), None, "{profile:?} {len}");
                assert_eq!(
                    s.unprotect_rtcp(&srtcp[len + 1..]),
                    None,
                    "{profile:?} {len}"
                );
            }
            assert_eq!(s.unprotect_rtp(&[&srtp[..], &[0]].concat(), 0), None);
            assert_eq!(s.unprotect_rtcp(&[&srtcp[..], &[0]].concat()), None);
            for len in 0..400 {
                for _ in 0..4 {
                    let mut junk: Vec<u8> = (0..len).map(|_| next()).collect();
                    assert_eq!(s.unprotect_rtcp(&junk), None);
                    assert_eq!(s.unprotect_rtp(&junk, 0), None);
                    // Plausible headers, so the checks get past the first bytes.
                    if len > 8 {
                        junk[0] = 0x80 | (junk[0] & 0x3f);
                        junk[1] = 200 + junk[1] % 8;
                    }
                    assert_eq!(s.unprotect_rtcp(&junk), None);
                    assert_eq!(s.unprotect_rtp(&junk, 0), None);
                }
            }
            // An RTP extension claiming more than the packet holds.
            let mut long_ext = srtp.clone();
            long_ext[18..20].copy_from_slice(&[0xff, 0xff]);
            assert_eq!(s.unprotect_rtp(&long_ext, 0), None);
            // The genuine packets still pass after all that.
            assert!(s.unprotect_rtp(&srtp, 0).is_some());
            assert!(s.unprotect_rtcp(&srtcp).is_some());
        }
    }

    #[test]
    fn replay_window_bookkeeping() {
        let mut w = ReplayWindow::default();
        assert!(w.is_fresh(5));
        w.accept(5);
        assert!(!w.is_fresh(5));
        assert!(w.is_fresh(4) && w.is_fresh(6));
        w.accept(5 + 200);
        assert!(!w.is_fresh(5) && !w.is_fresh(205) && w.is_fresh(204));
        assert!(w.is_fresh(205 - 127) && !w.is_fresh(205 - 128));
        w.accept(0x7fff_ffff);
        assert!(!w.is_fresh(0x7fff_ffff) && w.is_fresh(0x7fff_fffe));
    }

    #[test]
    fn rtp_header_lengths() {
        assert_eq!(rtp_header_len(&[]), None);
        assert_eq!(rtp_header_len(&[0x80; 11]), None);
        assert_eq!(rtp_header_len(&[0x80; 12]), Some(12));
        assert_eq!(rtp_header_len(&rtp_header(1, 2)), Some(24));
        let mut h = vec![0u8; 16];
        h[0] = 0x90;
        assert_eq!(rtp_header_len(&h), Some(16));
        h[15] = 1;
        assert_eq!(rtp_header_len(&h), None);
        h.extend_from_slice(&[0; 4]);
        assert_eq!(rtp_header_len(&h), Some(20));
        assert_eq!(rtp_header_len(&[0x8f; 71]), None);
        assert_eq!(rtp_header_len(&[0x8f; 72]), Some(72));
    }
}
