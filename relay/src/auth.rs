//! Listener authentication: JWT bearer tokens naming the broadcast, or open (the demo).
//!
//! A token's claims must hold `broadcast` (the id, or `"*"` for any) and `exp`; HS256 with a
//! shared secret, or ES256 / EdDSA with the issuer's public key in PEM. Pure: no I/O beyond
//! reading the key at construction; the clock is the system clock via the JWT library's `exp`
//! check, with no leeway beyond 30 s for skew.
//!
//! A verifier may hold the previous key beside the current one, so an issuer can switch keys
//! while tokens signed with the old one are still in use (see docs/operations.md).

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tern_origin_link::BroadcastId;

use crate::Error;

/// Who may listen.
pub enum Auth {
    /// Anyone: the demo and closed networks.
    Open,
    /// A valid bearer token is required.
    Jwt(Box<Verifier>),
}

/// Checks bearer tokens against the current key and, during a rotation, the previous one.
pub struct Verifier {
    /// The current key first.
    keys: Vec<(DecodingKey, Validation)>,
}

#[derive(Deserialize)]
struct Claims {
    broadcast: String,
}

/// Why a request was refused; the text goes back to the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization: Bearer` header.
    Missing,
    /// The token does not verify, or has expired.
    Invalid(String),
    /// The token is for another broadcast.
    WrongBroadcast,
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing => f.write_str("a bearer token is required (Authorization: Bearer ...)"),
            Self::Invalid(why) => write!(f, "invalid token: {why}"),
            Self::WrongBroadcast => f.write_str("the token does not grant this broadcast"),
        }
    }
}

impl Verifier {
    /// HS256 with a shared secret.
    pub fn hs256(secret: &[u8]) -> Self {
        Self::with(DecodingKey::from_secret(secret), Algorithm::HS256)
    }

    /// ES256 or EdDSA with a PEM public key (the kind of key decides the algorithm).
    pub fn from_public_pem(pem: &[u8]) -> Result<Self, Error> {
        if let Ok(k) = DecodingKey::from_ec_pem(pem) {
            return Ok(Self::with(k, Algorithm::ES256));
        }
        if let Ok(k) = DecodingKey::from_ed_pem(pem) {
            return Ok(Self::with(k, Algorithm::EdDSA));
        }
        Err(Error::Io(
            "the token public key is neither an EC P-256 nor an Ed25519 PEM public key".into(),
        ))
    }

    fn with(key: DecodingKey, alg: Algorithm) -> Self {
        let mut validation = Validation::new(alg);
        validation.leeway = 30;
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_aud = false;
        Self {
            keys: vec![(key, validation)],
        }
    }

    /// Also accepts tokens that `previous` accepts (a key being rotated out).
    pub fn with_previous(mut self, previous: Self) -> Self {
        self.keys.extend(previous.keys);
        self
    }

    /// Checks `token` for `broadcast`. When no key verifies it, the reason given is the
    /// current key's.
    pub fn check(&self, token: &str, broadcast: &BroadcastId) -> Result<(), Denied> {
        let mut first_error = None;
        let mut claims = None;
        for (key, validation) in &self.keys {
            match jsonwebtoken::decode::<Claims>(token, key, validation) {
                Ok(data) => {
                    claims = Some(data.claims);
                    break;
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let Some(claims) = claims else {
            return Err(Denied::Invalid(
                first_error.map_or_else(|| "no key".into(), |e| e.to_string()),
            ));
        };
        let b = claims.broadcast;
        if b == "*" || b == broadcast.as_str() {
            Ok(())
        } else {
            Err(Denied::WrongBroadcast)
        }
    }
}

impl Auth {
    /// Checks the `Authorization` header value (if any) for `broadcast`.
    pub fn check(
        &self,
        authorization: Option<&str>,
        broadcast: &BroadcastId,
    ) -> Result<(), Denied> {
        match self {
            Self::Open => Ok(()),
            Self::Jwt(v) => {
                let token = authorization
                    .and_then(|h| {
                        let (scheme, rest) = h.split_once(' ')?;
                        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
                    })
                    .ok_or(Denied::Missing)?;
                v.check(token, broadcast)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde::Serialize;

    #[derive(Serialize)]
    struct C<'a> {
        broadcast: &'a str,
        exp: u64,
    }

    fn now() -> u64 {
        tern_origin_link::unix_micros_now() / 1_000_000
    }

    fn token(secret: &[u8], broadcast: &str, exp: u64) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &C { broadcast, exp },
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    #[test]
    fn hs256_tokens() {
        let auth = Auth::Jwt(Box::new(Verifier::hs256(b"s3cret")));
        let demo: BroadcastId = "demo".parse().unwrap();
        let good = token(b"s3cret", "demo", now() + 600);
        assert_eq!(auth.check(Some(&format!("Bearer {good}")), &demo), Ok(()));
        assert_eq!(auth.check(Some(&format!("bearer  {good}")), &demo), Ok(()));
        let any = token(b"s3cret", "*", now() + 600);
        assert_eq!(auth.check(Some(&format!("Bearer {any}")), &demo), Ok(()));

        assert_eq!(auth.check(None, &demo), Err(Denied::Missing));
        assert_eq!(auth.check(Some("Basic abc"), &demo), Err(Denied::Missing));
        let other = token(b"s3cret", "other", now() + 600);
        assert_eq!(
            auth.check(Some(&format!("Bearer {other}")), &demo),
            Err(Denied::WrongBroadcast)
        );
        let expired = token(b"s3cret", "demo", now() - 120);
        assert!(matches!(
            auth.check(Some(&format!("Bearer {expired}")), &demo),
            Err(Denied::Invalid(_))
        ));
        let forged = token(b"guess", "demo", now() + 600);
        assert!(matches!(
            auth.check(Some(&format!("Bearer {forged}")), &demo),
            Err(Denied::Invalid(_))
        ));
        assert!(matches!(
            auth.check(Some("Bearer not.a.jwt"), &demo),
            Err(Denied::Invalid(_))
        ));
    }

    #[test]
    fn a_previous_key_is_accepted_until_it_is_dropped() {
        let demo: BroadcastId = "demo".parse().unwrap();
        let old = token(b"old-secret", "demo", now() + 600);
        let new = token(b"new-secret", "demo", now() + 600);
        let rotating = Verifier::hs256(b"new-secret").with_previous(Verifier::hs256(b"old-secret"));
        assert_eq!(rotating.check(&old, &demo), Ok(()));
        assert_eq!(rotating.check(&new, &demo), Ok(()));
        // An old-key token still has to be for this broadcast and unexpired.
        let old_other = token(b"old-secret", "other", now() + 600);
        assert_eq!(
            rotating.check(&old_other, &demo),
            Err(Denied::WrongBroadcast)
        );
        let old_expired = token(b"old-secret", "demo", now() - 120);
        assert!(matches!(
            rotating.check(&old_expired, &demo),
            Err(Denied::Invalid(_))
        ));
        let rotated = Verifier::hs256(b"new-secret");
        assert!(matches!(
            rotated.check(&old, &demo),
            Err(Denied::Invalid(_))
        ));
        assert_eq!(rotated.check(&new, &demo), Ok(()));
    }

    #[test]
    fn open_mode_lets_everyone_in() {
        let demo: BroadcastId = "demo".parse().unwrap();
        assert_eq!(Auth::Open.check(None, &demo), Ok(()));
    }

    #[test]
    fn bad_public_keys_are_refused() {
        assert!(Verifier::from_public_pem(
            b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
        )
        .is_err());
    }
}
