//! The agent's side of the node API: join-token attestation, the node SVID
//! (persisted so a restarted agent does not need a new token), its renewal,
//! and the mTLS channel to the server.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::{Context as _, anyhow};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tether_ca::PrivateKey;
use tether_proto::tether::node_client::NodeClient;
use tether_proto::tether::{AttestRequest, NodeSvid, RenewNodeRequest};
use tether_spiffe::{Bundle, SpiffeId, TrustDomain};
use tether_tls::SharedBundle;
use tonic::transport::{Channel, Endpoint};
use zeroize::Zeroizing;

use crate::clock::unix_now;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// What the agent keeps on disk (owner-only) about its node identity. The
/// node key is the one key Tether persists: without it a restarted agent
/// would need a fresh join token. Workload keys never touch disk.
#[derive(Serialize, Deserialize)]
struct Persisted {
    node_name: String,
    server: String,
    chain: Vec<String>,
    key_pkcs8: String,
    expires_at: i64,
    bundle_json: String,
}

pub struct NodeIdentity {
    pub name: String,
    pub id: SpiffeId,
    pub chain: Vec<Vec<u8>>,
    pub key: PrivateKey,
    pub issued_at: i64,
    pub expires_at: i64,
}

/// The servers an agent may talk to (any of them serves the whole trust
/// domain): a list given as `a:8081,b:8081`, each entry possibly a name
/// with several addresses. Connections go to the one that answered last
/// and move on, in order, when it does not.
pub struct Servers {
    list: Vec<String>,
    current: std::sync::atomic::AtomicUsize,
}

/// How long one server may take to accept a connection before the next is
/// tried.
const CONNECT_EACH: std::time::Duration = std::time::Duration::from_secs(3);

impl Servers {
    pub fn parse(s: &str) -> anyhow::Result<Arc<Servers>> {
        let list: Vec<String> = s
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_owned)
            .collect();
        if list.is_empty() {
            anyhow::bail!("no server address given");
        }
        for e in &list {
            Endpoint::from_shared(format!("http://{e}"))
                .map_err(|err| anyhow!("server address {e:?}: {err}"))?;
        }
        Ok(Arc::new(Servers {
            list,
            current: Default::default(),
        }))
    }

    /// The server connections go to now.
    pub fn current(&self) -> &str {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed);
        self.list.get(i).map_or("", String::as_str)
    }

    pub fn all(&self) -> String {
        self.list.join(",")
    }

    /// A TLS connection to the current server, or to the next that
    /// completes a handshake (one refusing connections, slow, or failing
    /// TLS, say with a certificate this node does not trust, is passed
    /// over), which becomes current.
    async fn connect(
        &self,
        tls: &tokio_rustls::TlsConnector,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let n = self.list.len();
        let start = self.current.load(std::sync::atomic::Ordering::Relaxed);
        let mut last = std::io::Error::other("no server");
        for k in 0..n {
            let i = (start + k) % n;
            let addr = &self.list[i];
            let attempt = async {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let _ = tcp.set_nodelay(true);
                // The name is only for SNI; the verifier checks the SPIFFE ID.
                let name = rustls_pki_types::ServerName::try_from("tether-server")
                    .map_err(std::io::Error::other)?;
                tls.connect(name, tcp).await
            };
            match tokio::time::timeout(CONNECT_EACH, attempt).await {
                Ok(Ok(stream)) => {
                    if i != start {
                        tracing::warn!(from = %self.list[start % n], to = %addr, "server unreachable; moved to the next");
                    }
                    self.current.store(i, std::sync::atomic::Ordering::Relaxed);
                    return Ok(stream);
                }
                Ok(Err(e)) => last = std::io::Error::new(e.kind(), format!("{addr}: {e}")),
                Err(_) => {
                    last = std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("{addr}: no TLS connection in {}s", CONNECT_EACH.as_secs()),
                    )
                }
            }
        }
        Err(last)
    }
}

/// The node's operator-issued certificate and key, for x509pop attestation.
pub struct X509Pop {
    chain: Vec<Vec<u8>>,
    key: PrivateKey,
}

impl X509Pop {
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<X509Pop> {
        use rustls_pki_types::pem::PemObject as _;
        let pem = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
        let chain = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
            .map(|c| c.map(|c| c.to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("{}: not PEM certificates", cert.display()))?;
        if chain.is_empty() {
            anyhow::bail!("{}: no certificate in it", cert.display());
        }
        let k = Zeroizing::new(
            std::fs::read_to_string(key).with_context(|| format!("reading {}", key.display()))?,
        );
        let key = PrivateKey::from_pem(&k).with_context(|| format!("{}", key.display()))?;
        Ok(X509Pop { chain, key })
    }
}

/// Connection to the server, rebuilt whenever the node SVID changes.
pub struct NodeConn {
    pub servers: Arc<Servers>,
    pub td: TrustDomain,
    pub bundle: SharedBundle,
    identity: RwLock<Arc<NodeIdentity>>,
    channel: RwLock<Channel>,
    state_file: PathBuf,
    /// The addresses last asked to be vouched for (the SVID may hold fewer:
    /// the server leaves out addresses another node holds).
    asked: std::sync::Mutex<Vec<String>>,
}

fn server_policy(td: &TrustDomain) -> tether_tls::IdPolicy {
    let td = td.clone();
    Arc::new(move |id: &SpiffeId| id.trust_domain() == &td && id.path() == "/tether/server")
}

/// A lazily connecting gRPC channel over TLS 1.3 to one of `servers`,
/// verifying the server's SVID and presenting `client` if given.
pub fn channel(
    servers: &Arc<Servers>,
    td: &TrustDomain,
    bundle: &SharedBundle,
    client: Option<&NodeIdentity>,
) -> anyhow::Result<Channel> {
    let ck = match client {
        Some(c) => Some(
            tether_tls::certified_key(&c.chain, c.key.pkcs8_der())
                .map_err(|e| anyhow!("node SVID: {e}"))?,
        ),
        None => None,
    };
    let verifier = tether_tls::SpiffeServerVerifier::new(bundle.clone(), server_policy(td));
    let cfg = Arc::new(tether_tls::client_config(verifier, ck, &[b"h2"])?);
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let servers = servers.clone();
    let first = servers.list.first().cloned().unwrap_or_default();
    // The URI is only a label: the connector picks the server.
    let endpoint = Endpoint::from_shared(format!("http://{first}"))
        .map_err(|e| anyhow!("server address {first:?}: {e}"))?
        .connect_timeout(
            CONNECT_EACH * (servers.list.len() as u32) + std::time::Duration::from_secs(2),
        )
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_while_idle(true);
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
            let connector = connector.clone();
            let servers = servers.clone();
            async move {
                let tls = servers.connect(&connector).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        })),
    )
}

fn identity_from(svid: &NodeSvid, key: PrivateKey) -> anyhow::Result<NodeIdentity> {
    let id =
        SpiffeId::parse(&svid.spiffe_id).context("server returned an invalid node SPIFFE ID")?;
    Ok(NodeIdentity {
        name: svid.node_name.clone(),
        id,
        chain: svid.chain.clone(),
        key,
        issued_at: unix_now(),
        expires_at: svid.expires_at,
    })
}

impl NodeConn {
    /// Reuses a persisted node SVID if it is still valid, else attests with
    /// `join_token`.
    pub async fn establish(
        servers: &Arc<Servers>,
        td: &TrustDomain,
        bootstrap: Option<Bundle>,
        join_token: Option<&str>,
        pop: Option<&X509Pop>,
        node_name: &str,
        data_dir: &Path,
    ) -> anyhow::Result<Arc<NodeConn>> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let state_file = data_dir.join("node.json");
        if let Some(p) = load(&state_file, td)?
            && p.0.expires_at > unix_now() + 60
            && p.0.name == node_name
        {
            let (ident, bundle) = p;
            tracing::info!(node = %ident.name, "reusing persisted node SVID");
            let bundle: SharedBundle = Arc::new(RwLock::new(bundle));
            let ch = channel(servers, td, &bundle, Some(&ident))?;
            // What it vouches for is what was asked last time, as far as
            // we know; a difference shows up on the first address check.
            let asked = ident
                .chain
                .first()
                .map(|leaf| tether_spiffe::x509::ip_sans(leaf))
                .unwrap_or_default()
                .iter()
                .map(ToString::to_string)
                .collect();
            return Ok(Arc::new(NodeConn {
                servers: servers.clone(),
                td: td.clone(),
                bundle,
                identity: RwLock::new(Arc::new(ident)),
                channel: RwLock::new(ch),
                state_file,
                asked: std::sync::Mutex::new(asked),
            }));
        }
        if join_token.is_none() && pop.is_none() {
            anyhow::bail!(
                "no valid node SVID in {} and no join token or x509pop certificate given; create a token with `tether token create`",
                state_file.display()
            );
        }
        let bundle = bootstrap.ok_or_else(|| anyhow!("a trust bundle is needed to verify the server on first attestation (--trust-bundle)"))?;
        let bundle: SharedBundle = Arc::new(RwLock::new(bundle));
        let key = PrivateKey::generate()?;
        // The server decides the node ID; the CSR carries only the key.
        let placeholder = SpiffeId::new(td, &format!("/tether/node/{node_name}"))
            .map_err(|e| anyhow!("node name: {e}"))?;
        let csr = tether_ca::build_csr(&key, &placeholder)?;
        let ch = channel(servers, td, &bundle, None)?;
        let addresses = crate::host_addrs::own();
        let (x509pop_chain, x509pop_signature) = match (join_token, pop) {
            (None, Some(p)) => (
                p.chain.clone(),
                p.key
                    .sign(&tether_spiffe::x509pop::message(node_name, &csr))?,
            ),
            _ => (Vec::new(), Vec::new()),
        };
        let svid = NodeClient::new(ch)
            .attest(AttestRequest {
                join_token: join_token.unwrap_or_default().to_string(),
                csr,
                node_name: node_name.to_string(),
                addresses: addresses.clone(),
                x509pop_chain,
                x509pop_signature,
            })
            .await
            .map_err(|s| {
                anyhow!(
                    "node attestation with {} failed: {}",
                    servers.current(),
                    s.message()
                )
            })?
            .into_inner();
        let new_bundle = Bundle::from_json(td.clone(), svid.bundle_json.as_bytes())
            .context("bundle from server")?;
        *bundle.write().unwrap_or_else(|p| p.into_inner()) = new_bundle;
        let ident = identity_from(&svid, key)?;
        tracing::info!(node = %ident.name, id = %ident.id, "node attested");
        let conn = Arc::new(NodeConn {
            servers: servers.clone(),
            td: td.clone(),
            bundle: bundle.clone(),
            channel: RwLock::new(channel(servers, td, &bundle, Some(&ident))?),
            identity: RwLock::new(Arc::new(ident)),
            state_file,
            asked: std::sync::Mutex::new(addresses),
        });
        conn.persist()?;
        Ok(conn)
    }

    /// Renews the node SVID when this host's addresses are no longer the
    /// ones it asked to be vouched for: tunnels from other nodes accept this
    /// agent only at an address its SVID names.
    pub async fn follow_addresses(&self) {
        let now = crate::host_addrs::own();
        let changed = *self.asked.lock().unwrap_or_else(|p| p.into_inner()) != now;
        if changed {
            tracing::info!(addresses = ?now, "this host's addresses changed; renewing the node SVID");
            if let Err(e) = self.renew().await {
                tracing::warn!(error = %e, "renewing the node SVID for new addresses failed");
            }
        }
    }

    pub fn client(&self) -> NodeClient<Channel> {
        NodeClient::new(
            self.channel
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
        .max_decoding_message_size(16 * 1024 * 1024)
    }

    pub fn identity(&self) -> Arc<NodeIdentity> {
        self.identity
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_bundle(&self, b: Bundle) -> anyhow::Result<()> {
        *self.bundle.write().unwrap_or_else(|p| p.into_inner()) = b;
        self.persist()
    }

    /// Renews the node SVID with a fresh key and switches the channel.
    pub async fn renew(&self) -> anyhow::Result<()> {
        let old = self.identity();
        let key = PrivateKey::generate()?;
        let csr = tether_ca::build_csr(&key, &old.id)?;
        let addresses = crate::host_addrs::own();
        *self.asked.lock().unwrap_or_else(|p| p.into_inner()) = addresses.clone();
        let svid = self
            .client()
            .renew_node(RenewNodeRequest { csr, addresses })
            .await
            .map_err(|s| anyhow!("node SVID renewal failed: {}", s.message()))?
            .into_inner();
        let ident = identity_from(&svid, key)?;
        let ch = channel(&self.servers, &self.td, &self.bundle, Some(&ident))?;
        *self.identity.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ident);
        *self.channel.write().unwrap_or_else(|p| p.into_inner()) = ch;
        self.persist()?;
        tracing::info!(expires_at = svid.expires_at, "node SVID renewed");
        Ok(())
    }

    /// Writes the node state atomically with owner-only permissions.
    fn persist(&self) -> anyhow::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt;
        let ident = self.identity();
        let p = Persisted {
            node_name: ident.name.clone(),
            server: self.servers.all(),
            chain: ident.chain.iter().map(|c| B64.encode(c)).collect(),
            key_pkcs8: B64.encode(ident.key.pkcs8_der()),
            expires_at: ident.expires_at,
            bundle_json: self
                .bundle
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .to_json()?,
        };
        let json = Zeroizing::new(serde_json::to_vec(&p)?);
        let tmp = self.state_file.with_extension("json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.state_file)?;
        Ok(())
    }
}

fn load(path: &Path, td: &TrustDomain) -> anyhow::Result<Option<(NodeIdentity, Bundle)>> {
    let data = match std::fs::read(path) {
        Ok(d) => Zeroizing::new(d),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow!("reading {}: {e}", path.display())),
    };
    let p: Persisted = match serde_json::from_slice(&data) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "ignoring unreadable node state");
            return Ok(None);
        }
    };
    let key_der = Zeroizing::new(B64.decode(&p.key_pkcs8).context("node key")?);
    let key = PrivateKey::from_pkcs8(&key_der)?;
    let chain = p
        .chain
        .iter()
        .map(|c| B64.decode(c))
        .collect::<Result<Vec<_>, _>>()
        .context("node chain")?;
    let leaf = chain.first().ok_or_else(|| anyhow!("empty node chain"))?;
    let id = tether_spiffe::x509::check_x509_svid_leaf(leaf).context("persisted node SVID")?;
    let bundle =
        Bundle::from_json(td.clone(), p.bundle_json.as_bytes()).context("persisted bundle")?;
    // Renewal is scheduled from the certificate's own start, not from when
    // this agent process started.
    let issued_at = x509_parser::parse_x509_certificate(leaf)
        .map(|(_, c)| c.validity().not_before.timestamp())
        .unwrap_or_else(|_| unix_now());
    Ok(Some((
        NodeIdentity {
            name: p.node_name,
            id,
            chain,
            key,
            issued_at,
            expires_at: p.expires_at,
        },
        bundle,
    )))
}
