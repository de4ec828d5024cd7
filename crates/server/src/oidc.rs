//! OIDC discovery for JWT-SVIDs: the trust domain's JWT keys published as an
//! OpenID Provider's `/.well-known/openid-configuration` and `jwks_uri`, over
//! HTTPS, under an issuer URL the operator chooses.
//!
//! This is what lets relying parties outside SPIFFE (AWS STS
//! `AssumeRoleWithWebIdentity`, GCP and Azure workload identity federation,
//! OAuth servers checking `private_key_jwt` assertions) trust Tether
//! identities with no shared secret: they fetch the keys from the issuer the
//! token names. The keys are the bundle's JWT authorities, so rotation
//! publishes the next key before it signs and keeps a retired key until the
//! tokens it signed have expired (see `keys`).
//!
//! The listener serves two read-only documents to anyone (they hold public
//! keys only). It is separate from the node API because its clients
//! authenticate nothing and verify the operator's web PKI certificate, not
//! a SPIFFE one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tether_tls::SwappableCert;
use tokio::task::JoinHandle;

use crate::State;

/// Longest issuer URL accepted; it is copied into every JWT-SVID.
const MAX_ISSUER_LEN: usize = 512;
/// A client that has not sent its request by then is dropped.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// A client that has not finished its TLS handshake by then is dropped, so
/// slow handshakes cannot hold the connection slots for long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many connections served at once.
const MAX_CONNECTIONS: usize = 512;
/// How often the certificate files are checked for a replacement.
const CERT_RELOAD_CHECK: Duration = Duration::from_secs(30);
/// Relying parties cache the documents for this long (seconds). Short
/// against rotation: a key is published a half key-lifetime before it
/// signs.
const CACHE_MAX_AGE: u32 = 300;

/// Where and how the discovery documents are served.
#[derive(Clone, Debug)]
pub struct OidcConfig {
    pub issuer: Issuer,
    pub listen: SocketAddr,
    /// The operator's certificate chain (PEM) for the issuer's host name.
    pub cert_pem: PathBuf,
    /// Its private key (PEM).
    pub key_pem: PathBuf,
}

/// An issuer URL as OpenID Connect Discovery 1.0 (section 3) requires it:
/// `https`, a host, optionally a path, no query, fragment or user info.
/// Stored without a trailing slash, exactly as it appears in `iss`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issuer {
    url: String,
    /// The URL's path without the trailing slash ("" for the root).
    path: String,
}

#[derive(Debug, thiserror::Error)]
#[error("issuer URL {url:?}: {problem}")]
pub struct IssuerError {
    url: String,
    problem: &'static str,
}

impl Issuer {
    pub fn parse(s: &str) -> Result<Issuer, IssuerError> {
        let err = |problem| IssuerError {
            url: s.chars().take(80).collect(),
            problem,
        };
        if s.len() > MAX_ISSUER_LEN {
            return Err(err("longer than 512 bytes"));
        }
        if s.contains('#') {
            return Err(err("must not have a fragment"));
        }
        let uri: hyper::Uri = s.parse().map_err(|_| err("not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(err("must start with https://"));
        }
        let auth = uri.authority().ok_or_else(|| err("has no host"))?;
        if auth.as_str().contains('@') {
            return Err(err("must not carry user info"));
        }
        if auth.host().is_empty() {
            return Err(err("has no host"));
        }
        if uri.query().is_some() {
            return Err(err("must not have a query"));
        }
        let path = uri.path().trim_end_matches('/').to_owned();
        Ok(Issuer {
            url: format!("https://{}{}", auth.as_str(), path),
            path,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.url
    }

    fn discovery_path(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.path)
    }

    fn jwks_path(&self) -> String {
        format!("{}/jwks", self.path)
    }

    /// The discovery document (OpenID Connect Discovery 1.0, section 3):
    /// the members a relying party needs to validate ID-token-like JWTs.
    fn configuration(&self) -> Vec<u8> {
        let doc = serde_json::json!({
            "issuer": self.url,
            "jwks_uri": format!("{}/jwks", self.url),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256", "ES384"],
            "claims_supported": ["sub", "aud", "exp", "iat", "iss"],
        });
        serde_json::to_vec(&doc).unwrap_or_default()
    }
}

fn load_cert(cfg: &OidcConfig) -> anyhow::Result<Arc<rustls::sign::CertifiedKey>> {
    use anyhow::Context as _;
    let certs = CertificateDer::pem_file_iter(&cfg.cert_pem)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading --oidc-tls-cert {}", cfg.cert_pem.display()))?;
    if certs.is_empty() {
        anyhow::bail!(
            "--oidc-tls-cert {}: no CERTIFICATE in the file",
            cfg.cert_pem.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key_pem)
        .with_context(|| format!("reading --oidc-tls-key {}", cfg.key_pem.display()))?;
    let signing = tether_tls::provider()
        .key_provider
        .load_private_key(key)
        .with_context(|| format!("--oidc-tls-key {}", cfg.key_pem.display()))?;
    let ck = rustls::sign::CertifiedKey::new(certs, signing);
    ck.keys_match()
        .with_context(|| "--oidc-tls-cert and --oidc-tls-key are not a pair".to_string())?;
    Ok(Arc::new(ck))
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// The JWKS document: every JWT key in the current bundle.
fn jwks(state: &State) -> Result<Vec<u8>, String> {
    let bundle = state.current_bundle();
    let keys = bundle
        .jwt_authorities
        .iter()
        .map(|a| a.to_oidc_jwk())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    serde_json::to_vec(&serde_json::json!({ "keys": keys })).map_err(|e| e.to_string())
}

fn respond(
    state: &State,
    issuer: &Issuer,
    req: &Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *r.status_mut() = status;
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    let path = req.uri().path();
    let body = if path == issuer.discovery_path() {
        issuer.configuration()
    } else if path == issuer.jwks_path() {
        match jwks(state) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "building the OIDC JWKS");
                return plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n");
            }
        }
    } else {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = hyper::header::HeaderValue::from_str(&format!("max-age={CACHE_MAX_AGE}")) {
        h.insert(hyper::header::CACHE_CONTROL, v);
    }
    r
}

/// Binds the discovery listener and serves it. The certificate files are
/// re-read when they change, so the operator's certificate renews without
/// a restart.
pub async fn serve(
    state: Arc<State>,
    cfg: &OidcConfig,
) -> anyhow::Result<(SocketAddr, Vec<JoinHandle<()>>)> {
    // Times taken before the first load: a renewal landing in between is
    // picked up by the first check.
    let loaded = (modified(&cfg.cert_pem), modified(&cfg.key_pem));
    let cert = SwappableCert::new(load_cert(cfg)?);
    let mut tls = rustls::ServerConfig::builder_with_provider(tether_tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert.clone());
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding --oidc-listen {}: {e}", cfg.listen))?;
    let bound = listener.local_addr()?;
    let issuer = Arc::new(cfg.issuer.clone());
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let accept = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return;
            };
            let (acceptor, state, issuer) = (acceptor.clone(), state.clone(), issuer.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let serve = async move {
                    let Ok(Ok(tls)) =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                    else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let r = respond(&state, &issuer, &req);
                        async move { Ok::<_, std::convert::Infallible>(r) }
                    });
                    let io = hyper_util::rt::TokioIo::new(tls);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                };
                let _ = tokio::time::timeout(CONNECTION_TIMEOUT, serve).await;
            });
        }
    });
    let files = cfg.clone();
    let reload = tokio::spawn(async move {
        let mut seen = loaded;
        loop {
            tokio::time::sleep(CERT_RELOAD_CHECK).await;
            let now = (modified(&files.cert_pem), modified(&files.key_pem));
            if now == seen {
                continue;
            }
            match load_cert(&files) {
                Ok(ck) => {
                    cert.set(ck);
                    seen = now;
                    tracing::info!("OIDC TLS certificate reloaded");
                }
                // A half-written pair: keep serving the old one, retry.
                Err(e) => tracing::warn!(error = %e, "OIDC TLS certificate not reloaded"),
            }
        }
    });
    Ok((bound, vec![accept, reload]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuer_urls() {
        let i = Issuer::parse("https://id.example.com/").unwrap();
        assert_eq!(i.as_str(), "https://id.example.com");
        assert_eq!(i.discovery_path(), "/.well-known/openid-configuration");
        let i = Issuer::parse("https://127.0.0.1:8443/td/prod/").unwrap();
        assert_eq!(i.as_str(), "https://127.0.0.1:8443/td/prod");
        assert_eq!(i.jwks_path(), "/td/prod/jwks");
        for (bad, why) in [
            ("http://id.example.com", "https"),
            ("https://id.example.com/?x=1", "query"),
            ("https://id.example.com/#f", "fragment"),
            ("https://u:p@id.example.com", "user info"),
            ("id.example.com", "https"),
            ("", "URL"),
        ] {
            let e = Issuer::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(Issuer::parse(&format!("https://a.example/{}", "x".repeat(600))).is_err());
    }

    #[test]
    fn configuration_names_the_issuer_and_its_jwks() {
        let i = Issuer::parse("https://id.example.com/td").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&i.configuration()).unwrap();
        assert_eq!(v["issuer"], "https://id.example.com/td");
        assert_eq!(v["jwks_uri"], "https://id.example.com/td/jwks");
    }
}
