//! The identity plane: per-process keys and SVIDs, created here (the
//! server only ever sees a CSR), and who signs them.
//!
//! Signing goes through [`Signer`]: the agent's is the server's node API
//! on the node's mutual-TLS channel ([`NodeSigner`]); the middle-tier tests
//! use an in-process CA. The process table (`tracker`) decides *when* a
//! process gets, rotates or loses its SVIDs; this module decides nothing
//! about processes.

pub mod intercept;
pub mod node;

use std::sync::Arc;

use tether_ca::PrivateKey;
use tether_proto::tether::{MintJwtSvidRequest, SignX509SvidsRequest, SvidCsr};
use tether_spiffe::SpiffeId;

use crate::BoxFuture;
use crate::clock::unix_now;
use crate::metrics::Metrics;
use node::NodeConn;

/// Per-process private keys alive in this process (process and mesh SVIDs):
/// what a stopped agent must bring back to zero.
static LIVE_KEYS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts one per-process key for as long as it lives.
pub struct LiveKey(());

impl LiveKey {
    fn new() -> Self {
        LIVE_KEYS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        LiveKey(())
    }
}

impl Drop for LiveKey {
    fn drop(&mut self) {
        LIVE_KEYS.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Per-process keys alive in this process, across every agent it runs.
pub fn live_keys() -> usize {
    LIVE_KEYS.load(std::sync::atomic::Ordering::SeqCst)
}

/// One X.509-SVID held for one process instance.
pub struct ProcSvid {
    pub identity: String,
    pub spiffe_id: SpiffeId,
    pub key: Arc<PrivateKey>,
    /// Leaf first, then intermediates.
    pub chain: Vec<Vec<u8>>,
    pub issued_at: i64,
    pub expires_at: i64,
    pub workload_api: bool,
    /// The mesh SVID for this one (same SPIFFE ID, its own key, marked for
    /// tunnels between agents), issued on first use and never handed to
    /// the process: a key the workload can read opens no tunnel. It goes
    /// when this SVID does (rotation, exit).
    pub mesh: tokio::sync::OnceCell<Arc<MeshSvid>>,
    pub live: LiveKey,
}

/// An SVID for tunnels between agents, held only by this agent.
pub struct MeshSvid {
    pub key: PrivateKey,
    /// Leaf first, then intermediates.
    pub chain: Vec<Vec<u8>>,
    /// The mesh's TLS client configuration with it, built on first use.
    pub tls: std::sync::OnceLock<Arc<rustls::ClientConfig>>,
    pub live: LiveKey,
}

/// Why no SVID was issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssueError {
    /// The signer refused or could not be reached (the caller retries).
    #[error("server refused: {0}")]
    Server(String),
    /// A key or CSR could not be made here.
    #[error("internal: {0}")]
    Internal(String),
}

/// One signed certificate, or why this one was refused.
pub type Signed = Result<(Vec<Vec<u8>>, i64), String>;

/// Who signs this node's CSRs.
pub trait Signer: Send + Sync {
    /// Signs every CSR; one answer per CSR, in order: the chain (leaf
    /// first) and its expiry, or why that one was refused.
    fn sign_x509(&self, csrs: Vec<SvidCsr>) -> BoxFuture<Result<Vec<Signed>, IssueError>>;
    /// A JWT-SVID for `spiffe_id` (entitlement is the signer's check too).
    fn mint_jwt(
        &self,
        spiffe_id: String,
        audience: Vec<String>,
    ) -> BoxFuture<Result<String, String>>;
}

/// The server, on the node's channel.
pub struct NodeSigner(pub Arc<NodeConn>);

impl Signer for NodeSigner {
    fn sign_x509(&self, csrs: Vec<SvidCsr>) -> BoxFuture<Result<Vec<Signed>, IssueError>> {
        let mut client = self.0.client();
        Box::pin(async move {
            let resp = client
                .sign_x509_svids(SignX509SvidsRequest { csrs })
                .await
                .map_err(|s| IssueError::Server(s.message().to_string()))?
                .into_inner();
            Ok(resp
                .svids
                .into_iter()
                .map(|s| {
                    if !s.error.is_empty() || s.chain.is_empty() {
                        Err(s.error)
                    } else {
                        Ok((s.chain, s.expires_at))
                    }
                })
                .collect())
        })
    }

    fn mint_jwt(
        &self,
        spiffe_id: String,
        audience: Vec<String>,
    ) -> BoxFuture<Result<String, String>> {
        let mut client = self.0.client();
        Box::pin(async move {
            client
                .mint_jwt_svid(MintJwtSvidRequest {
                    spiffe_id,
                    audience,
                })
                .await
                .map(|r| r.into_inner().token)
                .map_err(|s| s.message().to_string())
        })
    }
}

/// What an SVID is issued for: an identity the process table decided the
/// process holds (the registry's identities implement it).
pub trait Wanted {
    fn name(&self) -> &str;
    fn spiffe_id(&self) -> &SpiffeId;
    fn x509_ttl_secs(&self) -> i64;
    /// The process may fetch it over the Workload API.
    fn workload_api(&self) -> bool;
}

/// Makes keys and has them signed.
pub struct Issuer {
    signer: Arc<dyn Signer>,
    metrics: Arc<Metrics>,
}

impl Issuer {
    pub fn new(signer: Arc<dyn Signer>, metrics: Arc<Metrics>) -> Self {
        Issuer { signer, metrics }
    }

    /// A fresh key per identity, signed in one call. Identities the signer
    /// refuses are left out (logged); the call fails only as a whole.
    pub async fn issue<W: Wanted + Sync>(
        &self,
        ids: &[&W],
    ) -> Result<Vec<Arc<ProcSvid>>, IssueError> {
        let mut keys = Vec::with_capacity(ids.len());
        let mut csrs = Vec::with_capacity(ids.len());
        for i in ids {
            let key = PrivateKey::generate().map_err(|e| IssueError::Internal(e.to_string()))?;
            let csr = tether_ca::build_csr(&key, i.spiffe_id())
                .map_err(|e| IssueError::Internal(e.to_string()))?;
            csrs.push(SvidCsr {
                spiffe_id: i.spiffe_id().to_string(),
                csr,
                ttl_secs: i.x509_ttl_secs(),
                mesh: false,
            });
            keys.push(key);
        }
        let signed = self.signer.sign_x509(csrs).await?;
        if signed.len() != ids.len() {
            return Err(IssueError::Server(format!(
                "asked for {} SVIDs, got {}",
                ids.len(),
                signed.len()
            )));
        }
        let issued_at = unix_now();
        let mut out = Vec::new();
        for ((i, key), s) in ids.iter().zip(keys).zip(signed) {
            let (chain, expires_at) = match s {
                Ok(c) => c,
                Err(error) => {
                    tracing::warn!(identity = %i.name(), %error, "server refused SVID");
                    continue;
                }
            };
            self.metrics.svids_issued.inc();
            out.push(Arc::new(ProcSvid {
                identity: i.name().to_owned(),
                spiffe_id: i.spiffe_id().clone(),
                key: Arc::new(key),
                chain,
                issued_at,
                expires_at,
                workload_api: i.workload_api(),
                mesh: tokio::sync::OnceCell::new(),
                live: LiveKey::new(),
            }));
        }
        Ok(out)
    }

    /// The mesh SVID for `svid`, issued on first use: same SPIFFE ID and
    /// lifetime, a key of its own, marked by the server as this node's.
    pub async fn mesh_svid(&self, svid: &ProcSvid) -> Result<Arc<MeshSvid>, IssueError> {
        svid.mesh
            .get_or_try_init(|| async {
                let key =
                    PrivateKey::generate().map_err(|e| IssueError::Internal(e.to_string()))?;
                let csr = tether_ca::build_csr(&key, &svid.spiffe_id)
                    .map_err(|e| IssueError::Internal(e.to_string()))?;
                let ttl = (svid.expires_at - unix_now()).max(1);
                let signed = self
                    .signer
                    .sign_x509(vec![SvidCsr {
                        spiffe_id: svid.spiffe_id.to_string(),
                        csr,
                        ttl_secs: ttl,
                        mesh: true,
                    }])
                    .await?;
                let (chain, _) = signed
                    .into_iter()
                    .next()
                    .ok_or_else(|| IssueError::Server("no mesh SVID in the answer".into()))?
                    .map_err(|e| IssueError::Server(format!("mesh SVID refused: {e}")))?;
                Ok(Arc::new(MeshSvid {
                    key,
                    chain,
                    tls: std::sync::OnceLock::new(),
                    live: LiveKey::new(),
                }))
            })
            .await
            .cloned()
    }

    /// Has the signer mint a JWT-SVID for `id`.
    pub async fn mint_jwt(&self, id: &SpiffeId, audience: &[String]) -> Result<String, String> {
        self.signer
            .mint_jwt(id.to_string(), audience.to_vec())
            .await
    }
}

/// The middle tier: issuance against an in-process CA, no server.
#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tether_spiffe::TrustDomain;

    use super::*;

    /// Signs with a local CA; refuses the SPIFFE IDs in `refuse`, and
    /// records what it was asked.
    struct LocalCa {
        ca: tether_ca::Signer,
        refuse: Vec<String>,
        asked: Mutex<Vec<(String, bool)>>,
        short: bool,
    }

    impl LocalCa {
        fn new(refuse: &[&str]) -> Self {
            let td = TrustDomain::new("example.org").expect("td");
            let m = tether_ca::new_self_signed_ca(&td, 3600, unix_now()).expect("ca");
            LocalCa {
                ca: tether_ca::Signer::new(&m).expect("signer"),
                refuse: refuse.iter().map(|s| (*s).to_owned()).collect(),
                asked: Mutex::new(Vec::new()),
                short: false,
            }
        }
    }

    impl Signer for LocalCa {
        fn sign_x509(&self, csrs: Vec<SvidCsr>) -> BoxFuture<Result<Vec<Signed>, IssueError>> {
            let mut out: Vec<Signed> = Vec::new();
            for c in &csrs {
                self.asked
                    .lock()
                    .expect("asked")
                    .push((c.spiffe_id.clone(), c.mesh));
                if self.refuse.contains(&c.spiffe_id) {
                    out.push(Err("not entitled".into()));
                    continue;
                }
                let id = SpiffeId::parse(&c.spiffe_id).expect("id");
                let signed = self
                    .ca
                    .sign_svid(&c.csr, &id, &[], c.ttl_secs, unix_now())
                    .map(|s| (s.chain, s.not_after))
                    .map_err(|e| e.to_string());
                out.push(signed);
            }
            if self.short {
                out.pop();
            }
            Box::pin(async move { Ok(out) })
        }

        fn mint_jwt(&self, id: String, _aud: Vec<String>) -> BoxFuture<Result<String, String>> {
            Box::pin(async move { Err(format!("no JWT for {id} here")) })
        }
    }

    struct Want(String, SpiffeId);

    impl Wanted for Want {
        fn name(&self) -> &str {
            &self.0
        }
        fn spiffe_id(&self) -> &SpiffeId {
            &self.1
        }
        fn x509_ttl_secs(&self) -> i64 {
            600
        }
        fn workload_api(&self) -> bool {
            true
        }
    }

    fn identity(name: &str) -> Want {
        Want(
            name.to_owned(),
            SpiffeId::parse(&format!("spiffe://example.org/{name}")).expect("id"),
        )
    }

    /// The URI SAN of a DER leaf.
    fn uri_of(leaf: &[u8]) -> String {
        tether_spiffe::x509::check_x509_svid_leaf(leaf)
            .map(|id| id.to_string())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn each_identity_gets_its_own_key_and_refusals_are_left_out() {
        let ca = Arc::new(LocalCa::new(&["spiffe://example.org/b"]));
        let issuer = Issuer::new(ca.clone(), Metrics::new());
        let (a, b, c) = (identity("a"), identity("b"), identity("c"));
        let before = live_keys();
        let svids = issuer.issue(&[&a, &b, &c]).await.expect("issued");
        let names: Vec<&str> = svids.iter().map(|s| s.identity.as_str()).collect();
        assert_eq!(names, ["a", "c"], "b was refused");
        for s in &svids {
            assert_eq!(uri_of(&s.chain[0]), s.spiffe_id.to_string());
            assert!(s.expires_at > s.issued_at && s.expires_at <= s.issued_at + 600 + 1);
        }
        assert_ne!(
            svids[0].key.spki_der(),
            svids[1].key.spki_der(),
            "no key is shared"
        );
        assert!(live_keys() >= before + 2);
        drop(svids);
        assert_eq!(
            ca.asked.lock().expect("asked").len(),
            3,
            "one CSR per identity"
        );
    }

    #[tokio::test]
    async fn a_short_answer_fails_the_whole_call() {
        let mut ca = LocalCa::new(&[]);
        ca.short = true;
        let issuer = Issuer::new(Arc::new(ca), Metrics::new());
        let err = issuer
            .issue(&[&identity("a"), &identity("b")])
            .await
            .err()
            .expect("a short answer is an error");
        assert!(
            matches!(err, IssueError::Server(ref m) if m.contains("asked for 2")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn the_mesh_svid_is_issued_once_marked_and_typed_when_refused() {
        let ca = Arc::new(LocalCa::new(&[]));
        let issuer = Issuer::new(ca.clone(), Metrics::new());
        let svid = issuer
            .issue(&[&identity("a")])
            .await
            .expect("issued")
            .remove(0);
        let m1 = issuer.mesh_svid(&svid).await.expect("mesh");
        let m2 = issuer.mesh_svid(&svid).await.expect("mesh again");
        assert!(Arc::ptr_eq(&m1, &m2), "issued on first use only");
        assert_eq!(uri_of(&m1.chain[0]), "spiffe://example.org/a");
        assert_ne!(m1.key.spki_der(), svid.key.spki_der());
        let asked = ca.asked.lock().expect("asked").clone();
        assert_eq!(
            asked,
            [
                ("spiffe://example.org/a".to_owned(), false),
                ("spiffe://example.org/a".to_owned(), true)
            ]
        );
        assert!(issuer.mint_jwt(&svid.spiffe_id, &[]).await.is_err());

        let refusing = Issuer::new(
            Arc::new(LocalCa::new(&["spiffe://example.org/a"])),
            Metrics::new(),
        );
        // A fresh SVID: the first one's mesh SVID is cached with it.
        let fresh = issuer
            .issue(&[&identity("a")])
            .await
            .expect("issued")
            .remove(0);
        let err = refusing.mesh_svid(&fresh).await.err().expect("refused");
        assert!(
            matches!(err, IssueError::Server(ref m) if m.contains("not entitled")),
            "{err}"
        );
    }
}
