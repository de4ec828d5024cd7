//! TLS policy for every Tether connection, in one place.
//!
//! TLS 1.3 only, the aws-lc-rs provider, hybrid post-quantum key exchange
//! (X25519MLKEM768) preferred. Peers are authenticated by X.509-SVID against
//! the current trust bundle, not by hostname: the verifiers read the bundle
//! at handshake time, so a CA rotation takes effect without rebuilding
//! configs.

use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, Error as TlsError, SignatureScheme};
use tether_spiffe::{Bundle, SpiffeId};

/// The trust bundle shared by verifiers; replaced on every bundle update.
pub type SharedBundle = Arc<RwLock<Bundle>>;

/// aws-lc-rs with the post-quantum hybrid group first.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    let pq = rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768;
    p.kx_groups.retain(|g| g.name() != pq.name());
    p.kx_groups.insert(0, pq);
    Arc::new(p)
}

/// Which peer SPIFFE IDs a verifier accepts.
pub type IdPolicy = Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>;

/// A further check of a verified peer: its SPIFFE ID, leaf certificate
/// (DER) and, on the client side, the IP address the connection was made
/// to. Err(why) fails the handshake.
pub type LeafCheck =
    Arc<dyn Fn(&SpiffeId, &[u8], Option<std::net::IpAddr>) -> Result<(), String> + Send + Sync>;

fn now_unix(now: UnixTime) -> i64 {
    i64::try_from(now.as_secs()).unwrap_or(i64::MAX)
}

fn verify_chain(
    bundle: &SharedBundle,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<SpiffeId, TlsError> {
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(end_entity.to_vec());
    chain.extend(intermediates.iter().map(|c| c.to_vec()));
    let guard = bundle.read().unwrap_or_else(|p| p.into_inner());
    tether_spiffe::x509::verify_x509_svid(&chain, &guard, now_unix(now))
        .map_err(|e| TlsError::General(format!("peer X.509-SVID rejected: {e}")))
}

/// The handshake-signature half of both verifiers: TLS 1.3 only, checked
/// with the provider's algorithms.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, TlsError> {
            Err(TlsError::General("TLS 1.2 is not allowed".into()))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, TlsError> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// Verifies a server's X.509-SVID; the TLS server name is ignored because
/// SPIFFE authenticates by ID, not hostname.
#[derive(Clone)]
pub struct SpiffeServerVerifier {
    bundle: SharedBundle,
    accept: IdPolicy,
    check: Option<LeafCheck>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpiffeServerVerifier")
    }
}

impl SpiffeServerVerifier {
    pub fn new(bundle: SharedBundle, accept: IdPolicy) -> Arc<Self> {
        Arc::new(SpiffeServerVerifier {
            bundle,
            accept,
            check: None,
            provider: provider(),
        })
    }

    /// As [`new`](Self::new), with a further check of the server's leaf.
    pub fn with_check(bundle: SharedBundle, accept: IdPolicy, check: LeafCheck) -> Arc<Self> {
        Arc::new(SpiffeServerVerifier {
            bundle,
            accept,
            check: Some(check),
            provider: provider(),
        })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let id = verify_chain(&self.bundle, end_entity, intermediates, now)?;
        if !(self.accept)(&id) {
            return Err(TlsError::General(format!(
                "server identity {id} is not the one expected"
            )));
        }
        if let Some(check) = &self.check {
            let ip = match server_name {
                ServerName::IpAddress(ip) => Some(std::net::IpAddr::from(*ip)),
                _ => None,
            };
            check(&id, end_entity, ip).map_err(TlsError::General)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

/// Verifies client X.509-SVIDs. With `optional`, a client may present no
/// certificate at all (used by the node API, where join-token attestation
/// happens before the agent has one); handlers then decide per call.
pub struct SpiffeClientVerifier {
    bundle: SharedBundle,
    accept: IdPolicy,
    optional: bool,
    check: Option<LeafCheck>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpiffeClientVerifier")
    }
}

impl SpiffeClientVerifier {
    pub fn new(bundle: SharedBundle, accept: IdPolicy, optional: bool) -> Arc<Self> {
        Arc::new(SpiffeClientVerifier {
            bundle,
            accept,
            optional,
            check: None,
            provider: provider(),
        })
    }

    /// As [`new`](Self::new) (certificate mandatory), with a further check
    /// of the client's leaf.
    pub fn with_check(bundle: SharedBundle, accept: IdPolicy, check: LeafCheck) -> Arc<Self> {
        Arc::new(SpiffeClientVerifier {
            bundle,
            accept,
            optional: false,
            check: Some(check),
            provider: provider(),
        })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        !self.optional
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        let id = verify_chain(&self.bundle, end_entity, intermediates, now)?;
        if !(self.accept)(&id) {
            return Err(TlsError::General(format!(
                "client identity {id} is not allowed here"
            )));
        }
        if let Some(check) = &self.check {
            check(&id, end_entity, None).map_err(TlsError::General)?;
        }
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures!();
}

/// A certificate chain (leaf first) and its PKCS#8 key, as rustls wants them.
pub fn certified_key(
    chain: &[Vec<u8>],
    pkcs8: &[u8],
) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.to_vec()));
    let signing = provider().key_provider.load_private_key(key)?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(certs, signing)))
}

/// Server config: TLS 1.3 only, SVID client verification, `h2` ALPN.
pub fn server_config(
    cert: Arc<dyn rustls::server::ResolvesServerCert>,
    clients: Arc<dyn ClientCertVerifier>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(clients)
        .with_cert_resolver(cert);
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(cfg)
}

/// Client config: TLS 1.3 only, SVID server verification, optional client
/// certificate.
pub fn client_config(
    verifier: Arc<SpiffeServerVerifier>,
    client_cert: Option<Arc<rustls::sign::CertifiedKey>>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match client_cert {
        Some(ck) => {
            builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(ck)))
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(cfg)
}

/// The SPIFFE ID of an already verified peer chain.
pub fn peer_id(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    let leaf = certs?.first()?;
    tether_spiffe::x509::check_x509_svid_leaf(leaf).ok()
}

/// A cert resolver whose certificate can be swapped (server SVID rotation).
#[derive(Debug)]
pub struct SwappableCert(RwLock<Arc<rustls::sign::CertifiedKey>>);

impl SwappableCert {
    pub fn new(ck: Arc<rustls::sign::CertifiedKey>) -> Arc<Self> {
        Arc::new(SwappableCert(RwLock::new(ck)))
    }
    pub fn set(&self, ck: Arc<rustls::sign::CertifiedKey>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = ck;
    }
}

impl rustls::server::ResolvesServerCert for SwappableCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// The system's CA certificates (`SSL_CERT_FILE` and `SSL_CERT_DIR` are
/// honoured), for clients of the web PKI (token endpoints, injection
/// upstreams, the database). With none usable, every handshake fails with
/// a clear error: nothing is trusted by default.
pub fn system_roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!(error = %e, "loading system CA certificates");
    }
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    tracing::debug!(added, ignored, "system CA certificates");
    roots
}
