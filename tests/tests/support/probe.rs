//! A bare QUIC client that presents whatever certificate a test gives it (or none), to check
//! that a real agent refuses it. It trusts any server: it is the attacker here, not an agent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

#[derive(Debug)]
struct TrustAnything(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for TrustAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A QUIC client configuration presenting `cert_key` (PEM files) or no certificate, trusting
/// any server.
pub fn client_config(
    cert_key: Option<(&std::path::Path, &std::path::Path)>,
) -> quinn::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(TrustAnything(provider)));
    let mut tls = match cert_key {
        Some((cert, key)) => {
            let certs: Vec<_> = CertificateDer::pem_file_iter(cert)
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(key).unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![b"pgferry/1".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).unwrap();
    quinn::ClientConfig::new(Arc::new(crypto))
}

/// Dials `addr` from 127.0.0.1 presenting `cert_key` (PEM files) or no certificate; returns Ok
/// if the agent accepted the handshake, Err(text) with the connection error otherwise.
pub async fn dial(
    addr: SocketAddr,
    cert_key: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<(), String> {
    dial_from("127.0.0.1:0".parse().unwrap(), addr, cert_key).await
}

/// [`dial`] from a socket bound to `bind` (another loopback address is another "host").
pub async fn dial_from(
    bind: SocketAddr,
    addr: SocketAddr,
    cert_key: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<(), String> {
    let mut ep = quinn::Endpoint::client(bind).unwrap();
    ep.set_default_client_config(client_config(cert_key));
    let res = tokio::time::timeout(Duration::from_secs(10), async {
        let conn = ep
            .connect(addr, "localhost")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        // In TLS 1.3 the server judges the client certificate after the client considers the
        // handshake done: a refusal shows up as the connection closing right away.
        match tokio::time::timeout(Duration::from_secs(2), conn.closed()).await {
            Ok(e) => Err(e.to_string()),
            Err(_) => Ok(()),
        }
    })
    .await
    .unwrap_or_else(|_| Err("timeout".into()));
    ep.close(0u32.into(), b"");
    res
}
