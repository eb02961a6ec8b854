//! The pool's ephemeral certificate authority and the rustls configurations built from it.
//!
//! Each pool generates its own CA at start, with a unique subject, and keeps its key in memory
//! only. The parent's server certificate and each runner's single-use client certificate chain to
//! it. Both sides trust that CA alone, and only TLS 1.3 with the ring provider is offered.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use uuid::Uuid;

use crate::wire::ALPN;

/// An error making certificates or TLS configurations. The cause (from rcgen, rustls or
/// quinn, which are not part of this crate's API) is its [`source`](std::error::Error::source).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// Certificate generation failed.
    #[error("certificate generation failed")]
    Certificate(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// rustls refused the configuration.
    #[error("TLS configuration failed")]
    Config(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The client certificate verifier could not be built.
    #[error("client verifier failed")]
    Verifier(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// quinn refused the rustls configuration.
    #[error("QUIC crypto configuration failed")]
    Quic(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl From<rcgen::Error> for TlsError {
    fn from(e: rcgen::Error) -> Self {
        TlsError::Certificate(Box::new(e))
    }
}

impl From<rustls::Error> for TlsError {
    fn from(e: rustls::Error) -> Self {
        TlsError::Config(Box::new(e))
    }
}

impl From<rustls::server::VerifierBuilderError> for TlsError {
    fn from(e: rustls::server::VerifierBuilderError) -> Self {
        TlsError::Verifier(Box::new(e))
    }
}

impl From<quinn::crypto::rustls::NoInitialCipherSuite> for TlsError {
    fn from(e: quinn::crypto::rustls::NoInitialCipherSuite) -> Self {
        TlsError::Quic(Box::new(e))
    }
}

/// A certificate and its private key. `Debug` never shows the key.
#[derive(Clone)]
pub struct IssuedCert {
    /// The DER certificate.
    pub cert: CertificateDer<'static>,
    key: Arc<[u8]>,
}

impl IssuedCert {
    /// Wraps a DER certificate and its PKCS#8 DER key.
    #[must_use]
    pub fn new(cert: CertificateDer<'static>, pkcs8_key: Vec<u8>) -> Self {
        Self {
            cert,
            key: pkcs8_key.into(),
        }
    }

    /// The PKCS#8 DER private key. Handle with care: never log it.
    pub fn key_der(&self) -> &[u8] {
        &self.key
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.to_vec()))
    }
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_len", &self.cert.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// A pool's certificate authority. Its key never leaves the process.
pub struct PoolCa {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
}

impl fmt::Debug for PoolCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolCa").finish_non_exhaustive()
    }
}

/// The name the parent's server certificate is issued for; runners check it.
pub const PARENT_SERVER_NAME: &str = "parent.firebrand.invalid";

// Certificates are checked only during handshakes, against clocks that may disagree by a few
// minutes across machines.
const CLOCK_SKEW: Duration = Duration::from_secs(300);
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

impl PoolCa {
    /// Generates a CA with a unique subject.
    ///
    /// # Errors
    /// [`TlsError::Certificate`] if key generation or signing fails.
    pub fn generate(pool_name: &str) -> Result<Self, TlsError> {
        let mut params = CertificateParams::default();
        params.distinguished_name =
            distinguished_name(&format!("Firebrand pool {pool_name} CA {}", Uuid::new_v4()));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, CA_LIFETIME);
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
        let cert = params.self_signed(&key)?.der().clone();
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert,
        })
    }

    /// The CA certificate, DER.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Issues the parent's server certificate for [`PARENT_SERVER_NAME`].
    ///
    /// # Errors
    /// [`TlsError::Certificate`] if signing fails.
    pub fn issue_server(&self) -> Result<IssuedCert, TlsError> {
        let mut params = CertificateParams::new(vec![PARENT_SERVER_NAME.to_string()])?;
        params.distinguished_name = distinguished_name("firebrand parent");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        set_validity(&mut params, CA_LIFETIME);
        self.sign(params)
    }

    /// Issues a single-use client certificate for one runner, valid for `lifetime`.
    ///
    /// # Errors
    /// [`TlsError::Certificate`] if signing fails.
    pub fn issue_runner(
        &self,
        runner_id: Uuid,
        lifetime: Duration,
    ) -> Result<IssuedCert, TlsError> {
        let mut params =
            CertificateParams::new(vec![format!("{runner_id}.runner.firebrand.invalid")])?;
        params.distinguished_name = distinguished_name(&format!("firebrand runner {runner_id}"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        set_validity(&mut params, lifetime);
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Result<IssuedCert, TlsError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert::new(cert.der().clone(), key.serialize_der()))
    }
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn set_validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = std::time::SystemTime::now();
    params.not_before = (now - CLOCK_SKEW).into();
    params.not_after = (now + lifetime + CLOCK_SKEW).into();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &CertificateDer<'static>) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone())?;
    Ok(Arc::new(roots))
}

/// The parent's QUIC server crypto: its certificate, and mandatory client certificates from
/// `ca` alone.
///
/// # Errors
/// A [`TlsError`] if rustls or quinn refuse the configuration.
pub fn server_crypto(
    ca: &CertificateDer<'static>,
    server: &IssuedCert,
) -> Result<quinn::crypto::rustls::QuicServerConfig, TlsError> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
            .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![server.cert.clone()], server.private_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(quinn::crypto::rustls::QuicServerConfig::try_from(config)?)
}

/// A runner's QUIC client crypto: it trusts `ca` alone and presents `client`.
///
/// # Errors
/// A [`TlsError`] if rustls or quinn refuse the configuration.
pub fn client_crypto(
    ca: &CertificateDer<'static>,
    client: &IssuedCert,
) -> Result<quinn::crypto::rustls::QuicClientConfig, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(vec![client.cert.clone()], client.private_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(quinn::crypto::rustls::QuicClientConfig::try_from(config)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_keys() {
        let ca = PoolCa::generate("test").unwrap();
        let cert = ca
            .issue_runner(Uuid::new_v4(), Duration::from_secs(60))
            .unwrap();
        let shown = format!("{cert:?} {ca:?}");
        assert!(shown.contains("<redacted>"));
        assert!(!shown.contains(&format!("{:?}", &cert.key_der()[..8])));
    }

    #[test]
    fn configs_build_for_issued_certs() {
        let ca = PoolCa::generate("test").unwrap();
        server_crypto(ca.cert(), &ca.issue_server().unwrap()).unwrap();
        client_crypto(
            ca.cert(),
            &ca.issue_runner(Uuid::new_v4(), Duration::from_secs(60))
                .unwrap(),
        )
        .unwrap();
    }
}
