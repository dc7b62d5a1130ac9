//! TLS 1.3 set-up: rustls configurations whose certificate verifiers add pgferry's identity policy
//! to WebPKI's chain check.
//!
//! ```text
//!   peer certificate ─► WebPKI (chain to our CA, validity, EKU, server name) ─► identity::Policy
//!                        (role, migration, region, revocation list re-read now)
//!                             │ failure                                     │ failure
//!                             └──────────────► RefusalSlot ◄────────────────┘
//!                                                   │  read by the agent after the handshake
//!                                                   ▼  failed: log line + audit record
//! ```
//!
//! Each connection gets its own rustls configuration with its own [`RefusalSlot`], so a refusal
//! is reported with the address it came from. There is no way to build these configurations
//! without a verifier: the only constructors take the [`TlsIdentity`] with its CA.
//!
//! The protocol is pinned: TLS 1.3 only, one cipher suite (`TLS13_AES_128_GCM_SHA256`, the one
//! QUIC requires for its initial packets anyway) and one key-exchange group (X25519). quinn does
//! not expose the negotiated parameters, so pinning is what lets the audit log state them as
//! facts rather than guesses.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::control::ALPN;
use crate::identity::{Check, Fingerprint, PeerIdentity, Policy, Refusal, RevocationList};

/// The negotiated TLS parameters, fixed by configuration (see the module doc).
pub const TLS_PROTOCOL: &str = "TLSv1.3";
/// The only cipher suite offered and accepted.
pub const TLS_CIPHER_SUITE: &str = "TLS13_AES_128_GCM_SHA256";
/// The only key-exchange group offered and accepted.
pub const TLS_KX_GROUP: &str = "X25519";

fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring as r;
    Arc::new(CryptoProvider {
        cipher_suites: vec![r::cipher_suite::TLS13_AES_128_GCM_SHA256],
        kx_groups: vec![r::kx_group::X25519],
        ..r::default_provider()
    })
}

/// This agent's certificate, key and trust anchor, loaded and checked once at start.
#[derive(Debug)]
pub struct TlsIdentity {
    /// Our certificate (DER).
    pub cert: CertificateDer<'static>,
    /// Our key (PKCS#8 DER; also signs audit checkpoints).
    pub key_pkcs8: Vec<u8>,
    /// What our certificate says.
    pub own: PeerIdentity,
    /// The CA.
    roots: Arc<rustls::RootCertStore>,
    /// Base policy; the revocation list in it is replaced by a fresh read at each handshake.
    policy: Policy,
    revocation_list: Option<PathBuf>,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
}

impl TlsIdentity {
    /// Loads the files and checks our own certificate against the policy: an agent whose own
    /// certificate would be refused by its peer does not start.
    pub fn load(
        ca: &Path,
        cert: &Path,
        key: &Path,
        revocation_list: Option<&Path>,
        policy: Policy,
    ) -> Result<Self> {
        let ca_pem = read(ca, "CA certificate")?;
        let mut roots = rustls::RootCertStore::empty();
        let mut n = 0;
        for c in CertificateDer::pem_slice_iter(&ca_pem) {
            let c = c.with_context(|| format!("parsing CA certificate {}", ca.display()))?;
            roots
                .add(c)
                .with_context(|| format!("CA certificate {} is not usable", ca.display()))?;
            n += 1;
        }
        if n == 0 {
            bail!("{} contains no PEM certificate", ca.display());
        }
        let cert_pem = read(cert, "certificate")?;
        let cert_der = CertificateDer::pem_slice_iter(&cert_pem)
            .next()
            .with_context(|| format!("{} contains no PEM certificate", cert.display()))?
            .with_context(|| format!("parsing certificate {}", cert.display()))?;
        let key_pem = read(key, "private key")?;
        let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
            .with_context(|| format!("parsing private key {}", key.display()))?;
        let PrivateKeyDer::Pkcs8(pkcs8) = &key_der else {
            bail!(
                "private key {} is not PKCS#8 (pgferry-certs writes PKCS#8 keys)",
                key.display()
            );
        };
        let key_pkcs8 = pkcs8.secret_pkcs8_der().to_vec();
        super::config::check_private_file(key, "private key")?;

        // The key must belong to the certificate, or every handshake would fail obscurely.
        let signing = provider()
            .key_provider
            .load_private_key(key_der.clone_key())
            .with_context(|| format!("loading private key {}", key.display()))?;
        let certified = rustls::sign::CertifiedKey::new(vec![cert_der.clone()], signing);
        certified.keys_match().map_err(|_| {
            anyhow::anyhow!(
                "private key {} does not belong to certificate {}",
                key.display(),
                cert.display()
            )
        })?;

        let own = PeerIdentity::from_der(&cert_der).with_context(|| {
            format!(
                "certificate {} is not a pgferry certificate",
                cert.display()
            )
        })?;
        let mut policy = policy;
        // The migration is the one our own certificate names; the peer must match it.
        policy.migration = own.migration.clone();
        if let Some(path) = revocation_list {
            policy.revoked = RevocationList::load(path)
                .with_context(|| format!("reading revocation list {}", path.display()))?;
        }
        policy
            .check_own(&own, time::OffsetDateTime::now_utc())
            .map_err(|r| anyhow::anyhow!("own certificate {}: {r}", cert.display()))?;
        // Chain check of our own certificate: a certificate from another CA would be refused by
        // the peer; say so here rather than at every connection attempt.
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots.clone()),
            provider(),
        )
        .build()?;
        let any_name = own
            .names
            .first()
            .cloned()
            .context("own certificate has no DNS or IP name")?;
        let name = ServerName::try_from(any_name).context("own certificate name")?;
        verifier
            .verify_server_cert(&cert_der, &[], &name, &[], UnixTime::now())
            .map_err(|e| {
                anyhow::anyhow!(
                    "own certificate {} does not verify against CA {}: {e}",
                    cert.display(),
                    ca.display()
                )
            })?;
        Ok(Self {
            cert: cert_der,
            key_pkcs8,
            own,
            roots: Arc::new(roots),
            policy,
            revocation_list: revocation_list.map(Path::to_path_buf),
        })
    }

    /// The policy used for our own certificate (with the revocation list as read at start).
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key_pkcs8.clone().into())
    }

    fn policy_check(&self, slot: &RefusalSlot) -> Arc<PolicyCheck> {
        Arc::new(PolicyCheck {
            policy: self.policy.clone(),
            revocation_list: self.revocation_list.clone(),
            slot: slot.clone(),
        })
    }

    /// A server configuration for one incoming connection, recording refusals into `slot`.
    pub fn server_config(&self, slot: &RefusalSlot) -> Result<quinn::ServerConfig> {
        let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots.clone(),
            provider(),
        )
        .build()?;
        let verifier = Arc::new(PolicyClientVerifier {
            inner,
            check: self.policy_check(slot),
        });
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.cert.clone()], self.key())?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls))?;
        Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
    }

    /// A client configuration for one dial, recording refusals into `slot`.
    pub fn client_config(&self, slot: &RefusalSlot) -> Result<quinn::ClientConfig> {
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            self.roots.clone(),
            provider(),
        )
        .build()?;
        let verifier = Arc::new(PolicyServerVerifier {
            inner,
            check: self.policy_check(slot),
        });
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous() // only to install our verifier, which wraps WebPKI's: nothing is skipped
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(vec![self.cert.clone()], self.key())?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))?;
        Ok(quinn::ClientConfig::new(Arc::new(crypto)))
    }
}

/// Where a verifier leaves the reason it refused a peer, for the agent to report.
#[derive(Debug, Clone, Default)]
pub struct RefusalSlot(Arc<Mutex<Option<Refusal>>>);

impl RefusalSlot {
    /// A new empty slot.
    pub fn new() -> Self {
        Self::default()
    }
    fn set(&self, r: Refusal) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.get_or_insert(r);
    }
    /// Takes the recorded refusal, if any.
    pub fn take(&self) -> Option<Refusal> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

#[derive(Debug)]
struct PolicyCheck {
    policy: Policy,
    revocation_list: Option<PathBuf>,
    slot: RefusalSlot,
}

impl PolicyCheck {
    /// Turns a WebPKI failure into a refusal with the check that failed.
    fn webpki_failed(&self, end_entity: &CertificateDer<'_>, e: rustls::Error) -> rustls::Error {
        let check = match &e {
            rustls::Error::InvalidCertificate(
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. },
            ) => Check::Validity,
            _ => Check::Chain,
        };
        let reason = match check {
            Check::Validity => format!("certificate is outside its validity period ({e})"),
            _ => format!("certificate does not chain to the configured CA ({e})"),
        };
        self.slot.set(Refusal {
            check,
            fingerprint: Some(Fingerprint::of_der(end_entity)),
            reason,
        });
        generic_refusal()
    }

    /// The identity part: role, migration, region, revocation (re-read now), validity.
    fn identity(
        &self,
        end_entity: &CertificateDer<'_>,
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let mut policy = self.policy.clone();
        if let Some(path) = &self.revocation_list {
            match RevocationList::load(path) {
                Ok(list) => policy.revoked = list,
                Err(e) => {
                    // Fail closed: without the list we cannot know the peer is not revoked.
                    self.slot.set(Refusal {
                        check: Check::Revoked,
                        fingerprint: Some(Fingerprint::of_der(end_entity)),
                        reason: format!(
                            "revocation list {} cannot be read ({e}); refusing every peer until it is fixed",
                            path.display()
                        ),
                    });
                    return Err(generic_refusal());
                }
            }
        }
        let now = time::OffsetDateTime::from_unix_timestamp(now.as_secs() as i64)
            .unwrap_or_else(|_| time::OffsetDateTime::now_utc());
        match policy.check_peer_der(end_entity, now) {
            Ok(_) => Ok(()),
            Err(r) => {
                self.slot.set(r);
                Err(generic_refusal())
            }
        }
    }
}

/// What a refused peer is told: one error for every check. rustls turns the error's text into
/// the QUIC CONNECTION_CLOSE reason, which goes to a peer that has not authenticated: the real
/// reason (which check, our allowed regions, the revocation note) stays in the [`RefusalSlot`],
/// the log and the audit log. The alert is `access_denied` whatever failed.
fn generic_refusal() -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

#[derive(Debug)]
struct PolicyClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    check: Arc<PolicyCheck>,
}

impl ClientCertVerifier for PolicyClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| self.check.webpki_failed(end_entity, e))?;
        self.check.identity(end_entity, now)?;
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct PolicyServerVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    check: Arc<PolicyCheck>,
}

impl ServerCertVerifier for PolicyServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map_err(|e| self.check.webpki_failed(end_entity, e))?;
        self.check.identity(end_entity, now)?;
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Classifies a failed handshake for the operator when no verifier recorded a reason: the peer
/// sent no certificate, or it refused *our* certificate (its own log says why).
pub fn classify_handshake_error(e: &quinn::ConnectionError) -> Refusal {
    let text = e.to_string();
    let (check, reason) = if text.contains("no certificates") || text.contains("NoCertificates") {
        (
            Check::NoCertificate,
            "peer presented no client certificate (mutual TLS is required)".to_string(),
        )
    } else if text.contains("ALPN") || text.contains("application protocol") {
        (
            Check::Chain,
            format!(
                "peer does not speak {}: {text}",
                String::from_utf8_lossy(ALPN)
            ),
        )
    } else {
        (
            Check::Chain,
            format!("TLS handshake failed: {text} (if the peer refused us, its log and audit log say why)"),
        )
    };
    Refusal {
        check,
        fingerprint: None,
        reason,
    }
}
