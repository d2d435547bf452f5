//! Certificates and QUIC endpoint configs for the origin link.
//!
//! TLS 1.3 only, on aws-lc-rs (one crypto backend for the whole binary), ALPN [`crate::ALPN`].
//! The origin presents a certificate; a relay trusts the certificates (or CA) its operator
//! configures. Without configured files the origin makes a self-signed certificate at start-up,
//! which the embedded demo hands to its relay in memory.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
pub use rustls::pki_types::CertificateDer;
use rustls::pki_types::PrivateKeyDer;

use crate::{Error, ALPN};

/// A certificate chain and its private key.
#[derive(Debug)]
pub struct Identity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Makes a self-signed certificate for `names` (DNS names or IP addresses).
    pub fn self_signed(names: &[&str]) -> Result<Self, Error> {
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let ck =
            rcgen::generate_simple_self_signed(names).map_err(|e| Error::Tls(e.to_string()))?;
        Ok(Self {
            chain: vec![ck.cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into()),
        })
    }

    /// Loads a PEM certificate chain and a PEM private key.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, Error> {
        let chain = load_certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| Error::Tls(format!("reading key {}: {e}", key.display())))?;
        Ok(Self { chain, key })
    }

    /// The leaf certificate as PEM text, so an operator can hand it to relays.
    pub fn cert_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.chain[0])
    }
}

/// The fleet CA's fixed name. Node certificates name it as their issuer, so the CA can sign
/// more of them later from its key alone, without parsing its certificate back.
const CA_NAME: &str = "Tern fleet CA";

fn ca_params() -> Result<rcgen::CertificateParams, Error> {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(tls_err)?;
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, CA_NAME);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2036, 1, 1);
    Ok(p)
}

fn tls_err(e: impl std::fmt::Display) -> Error {
    Error::Tls(e.to_string())
}

/// Makes a fleet CA: (certificate PEM, private key PEM).
pub fn make_ca() -> Result<(String, String), Error> {
    let key = rcgen::KeyPair::generate().map_err(tls_err)?;
    let cert = ca_params()?.self_signed(&key).map_err(tls_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Issues a node certificate for `names` (DNS names or IPs) signed by the CA whose key is
/// `ca_key_pem`: (certificate PEM, private key PEM). Valid for server and client use, so
/// the same certificate serves an origin, and a relay that authenticates to its upstream.
pub fn issue(ca_key_pem: &str, names: &[String]) -> Result<(String, String), Error> {
    if names.is_empty() {
        return Err(Error::Tls(
            "a node certificate needs at least one name".into(),
        ));
    }
    let ca_key = rcgen::KeyPair::from_pem(ca_key_pem).map_err(tls_err)?;
    let issuer = rcgen::Issuer::new(ca_params()?, ca_key);
    let mut p = rcgen::CertificateParams::new(names.to_vec()).map_err(tls_err)?;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, names[0].clone());
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    let key = rcgen::KeyPair::generate().map_err(tls_err)?;
    let cert = p.signed_by(&key, &issuer).map_err(tls_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Loads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| Error::Tls(format!("reading {}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("parsing {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "{} holds no certificate",
            path.display()
        )));
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Live group streams one connection may carry at once, set by the subscriber: about
/// budget / 100 ms + 2 = 5 per subscription, so one connection carries some 200 broadcasts.
const MAX_GROUP_STREAMS: u32 = 1024;

/// Which end of the link a transport config is for.
#[derive(Clone, Copy)]
enum Role {
    Server,
    Subscriber,
}

fn transport(role: Role) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // Unidirectional streams only ever carry groups, origin → subscriber; a server reads none.
    t.max_concurrent_uni_streams(match role {
        Role::Server => 0u32.into(),
        Role::Subscriber => MAX_GROUP_STREAMS.into(),
    });
    // Frames never travel as datagrams.
    t.datagram_receive_buffer_size(None);
    // Keep-alives every second: a restarted origin answers the first one with a stateless
    // reset (see `endpoint_config`), so the relay learns of the restart within a second.
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    // A link that stays silent this long is dead; the relay then reconnects.
    // 5 s fits in a VarInt; the conversion cannot fail.
    t.max_idle_timeout(Some(
        Duration::from_secs(5)
            .try_into()
            .expect("5 s is a valid idle timeout"),
    ));
    Arc::new(t)
}

/// The origin's endpoint config, with a stateless-reset key derived from its private key.
///
/// A QUIC endpoint answers packets of connections it does not know with a stateless reset,
/// which the peer only believes if it carries the token of the original connection. With a
/// random key per process, an origin that restarted could not reset its old connections and
/// relays would wait out the idle timeout; a key derived from the (stable) identity lets the
/// new process reset them at once. The connection-ID generator's key is derived the same
/// way, since an endpoint drops packets whose connection ID it did not issue before it would
/// consider resetting them.
pub fn endpoint_config(identity: &Identity) -> quinn::EndpointConfig {
    let mut material = b"tern origin-link stateless reset v0".to_vec();
    material.extend_from_slice(identity.key.secret_der());
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &material);
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, digest.as_ref());
    let mut config = quinn::EndpointConfig::new(Arc::new(key));
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&digest.as_ref()[24..32]);
    let cid_key = u64::from_le_bytes(cid_key);
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}

/// The origin's QUIC server config, accepting any client.
pub fn server_config(identity: Identity) -> Result<quinn::ServerConfig, Error> {
    server_config_with(identity, None)
}

fn root_store(roots: &[CertificateDer<'static>]) -> Result<rustls::RootCertStore, Error> {
    let mut store = rustls::RootCertStore::empty();
    for c in roots {
        store
            .add(c.clone())
            .map_err(|e| Error::Tls(format!("trusted certificate: {e}")))?;
    }
    Ok(store)
}

/// The origin's QUIC server config; with `client_roots`, only subscribers presenting a
/// certificate issued by one of them complete the handshake (mutual TLS).
pub fn server_config_with(
    identity: Identity,
    client_roots: Option<&[CertificateDer<'static>]>,
) -> Result<quinn::ServerConfig, Error> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?;
    let builder = match client_roots {
        Some(roots) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(root_store(roots)?),
                provider(),
            )
            .build()
            .map_err(tls_err)?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut tls = builder
        .with_single_cert(identity.chain, identity.key)
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(tls_err)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport(Role::Server));
    Ok(cfg)
}

/// A subscriber's QUIC client config trusting exactly `roots`, without a client certificate.
pub fn client_config(roots: &[CertificateDer<'static>]) -> Result<quinn::ClientConfig, Error> {
    client_config_with(roots, None)
}

/// A subscriber's QUIC client config trusting exactly `roots`, presenting `identity` to
/// upstreams that require mutual TLS.
pub fn client_config_with(
    roots: &[CertificateDer<'static>],
    identity: Option<Identity>,
) -> Result<quinn::ClientConfig, Error> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(root_store(roots)?);
    let mut tls = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain, id.key)
            .map_err(tls_err)?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(tls_err)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport(Role::Subscriber));
    Ok(cfg)
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    // Standard base64 with 64-column lines, as PEM readers expect; written here to avoid a
    // dependency for twenty lines.
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len() * 4 / 3 + 4);
    for chunk in der.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        // Base64 output is ASCII.
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_node_certificate_from_the_fleet_ca_is_trusted_over_quic() {
        let (ca_pem, ca_key) = make_ca().unwrap();
        // Issued later, from the key alone, like `tern certs` on a second run.
        let (cert_pem, key_pem) =
            issue(&ca_key, &["localhost".into(), "127.0.0.1".into()]).unwrap();
        let dir = std::env::temp_dir().join(format!("tern-pki-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (n, c) in [
            ("ca.pem", &ca_pem),
            ("n.pem", &cert_pem),
            ("n-key.pem", &key_pem),
        ] {
            std::fs::write(dir.join(n), c).unwrap();
        }
        let id = Identity::from_pem_files(&dir.join("n.pem"), &dir.join("n-key.pem")).unwrap();
        let roots = load_certs(&dir.join("ca.pem")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);

        let server =
            quinn::Endpoint::server(server_config(id).unwrap(), "127.0.0.1:0".parse().unwrap())
                .unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            while let Some(inc) = server.accept().await {
                tokio::spawn(async move {
                    let _ = inc.await;
                });
            }
        });
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(client_config(&roots).unwrap());
        client
            .connect(addr, "localhost")
            .unwrap()
            .await
            .expect("CA-signed certificate accepted");
        // Another CA's roots refuse it.
        let (other_ca, _) = make_ca().unwrap();
        let other = CertificateDer::from_pem_slice(other_ca.as_bytes()).unwrap();
        client.set_default_client_config(client_config(&[other]).unwrap());
        assert!(client.connect(addr, "localhost").unwrap().await.is_err());
    }

    #[test]
    fn self_signed_pem_round_trips() {
        let id = Identity::self_signed(&["localhost"]).unwrap();
        let pem = id.cert_pem();
        let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(back, id.chain[0]);
    }
}
