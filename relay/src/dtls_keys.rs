//! Hands each listener's DTLS-SRTP keying material to the fan-out core.
//!
//! str0m keeps the SRTP context it derives from the DTLS handshake private. The core writes
//! media itself (see [`crate::egress`]), so it needs the same keys: this module wraps the
//! crypto provider's DTLS factory so that every DTLS instance copies the exported keying
//! material, once, into a slot its listener holds. Everything else passes straight through
//! to the wrapped provider.
//!
//! A DTLS instance is created inside [`str0m::RtcConfig::build`]; [`build_rtc`] names the slot
//! for the instance made during that call through a thread-local, so slots never cross
//! listeners even with several cores on several threads.

use std::cell::RefCell;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use str0m::crypto::dtls::{
    DtlsCert, DtlsImplError, DtlsInstance, DtlsOutput, DtlsProvider, DtlsVersion, ProtocolVersion,
    SrtpProfile,
};
use str0m::crypto::{CryptoError, CryptoProvider};
use str0m::{Rtc, RtcConfig};

/// The keying material of one finished DTLS handshake.
#[derive(Clone)]
pub struct Keying {
    /// The RFC 5764 exporter output: both directions' master keys, then both salts.
    pub material: Vec<u8>,
    /// The SRTP protection profile the handshake chose.
    pub profile: SrtpProfile,
    /// Whether this side was the DTLS client (which half of `material` is ours).
    pub client: bool,
}

impl std::fmt::Debug for Keying {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key bytes.
        f.debug_struct("Keying")
            .field("profile", &self.profile)
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

/// Where a listener's DTLS instance leaves its keying material.
pub type KeySlot = Arc<Mutex<Option<Keying>>>;

thread_local! {
    /// The slot for the DTLS instance the current `build_rtc` call creates.
    static NEXT_SLOT: RefCell<Option<KeySlot>> = const { RefCell::new(None) };
}

/// The provider with its DTLS factory wrapped. The SRTP, hash and HMAC parts are the
/// crate's default provider's, unchanged.
pub fn provider() -> CryptoProvider {
    static WRAPPED: OnceLock<Capturing> = OnceLock::new();
    let mut p = str0m::crypto::from_feature_flags();
    let inner = p.dtls_provider;
    p.dtls_provider = WRAPPED.get_or_init(|| Capturing { inner });
    p
}

/// Builds an `Rtc` whose DTLS instance reports its keying material to the returned slot.
/// The config must carry [`provider`]'s provider for the slot to ever fill.
pub fn build_rtc(config: RtcConfig, now: Instant) -> (Rtc, KeySlot) {
    let slot: KeySlot = Arc::new(Mutex::new(None));
    NEXT_SLOT.with(|s| *s.borrow_mut() = Some(slot.clone()));
    let rtc = config.build(now);
    // Unused if the config had another provider: never leak it into a later build.
    NEXT_SLOT.with(|s| s.borrow_mut().take());
    (rtc, slot)
}

/// Takes the keying material out of a slot, if the handshake has produced it.
pub fn take(slot: &KeySlot) -> Option<Keying> {
    slot.lock().ok()?.take()
}

#[derive(Debug)]
struct Capturing {
    inner: &'static dyn DtlsProvider,
}

impl DtlsProvider for Capturing {
    fn generate_certificate(&self) -> Option<DtlsCert> {
        self.inner.generate_certificate()
    }

    fn new_dtls(
        &self,
        cert: &DtlsCert,
        now: Instant,
        dtls_version: DtlsVersion,
        mtu: Option<usize>,
    ) -> Result<Box<dyn DtlsInstance>, CryptoError> {
        let inner = self.inner.new_dtls(cert, now, dtls_version, mtu)?;
        let slot = NEXT_SLOT.with(|s| s.borrow_mut().take());
        Ok(Box::new(CapturingInstance { inner, slot }))
    }

    fn is_test(&self) -> bool {
        self.inner.is_test()
    }
}

#[derive(Debug)]
struct CapturingInstance {
    inner: Box<dyn DtlsInstance>,
    slot: Option<KeySlot>,
}

impl DtlsInstance for CapturingInstance {
    fn set_active(&mut self, active: bool) {
        self.inner.set_active(active)
    }

    fn handle_packet(&mut self, packet: &[u8]) -> Result<(), DtlsImplError> {
        self.inner.handle_packet(packet)
    }

    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        let out = self.inner.poll_output(buf);
        if let (DtlsOutput::KeyingMaterial(km, profile), Some(slot)) = (&out, &self.slot) {
            if let Ok(mut s) = slot.lock() {
                *s = Some(Keying {
                    material: km.to_vec(),
                    profile: *profile,
                    client: self.inner.is_active(),
                });
            }
        }
        out
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsImplError> {
        self.inner.handle_timeout(now)
    }

    fn send_application_data(&mut self, data: &[u8]) -> Result<usize, DtlsImplError> {
        self.inner.send_application_data(data)
    }

    fn is_active(&self) -> bool {
        self.inner.is_active()
    }

    fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.inner.protocol_version()
    }

    fn is_closing(&self) -> bool {
        self.inner.is_closing()
    }

    fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    fn close(&mut self) -> Result<(), DtlsImplError> {
        self.inner.close()
    }
}
