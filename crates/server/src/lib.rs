//! The Tether server (control plane): CA, registry, node attestation,
//! CSR signing, JWT minting and watch streams for agents.
//!
//! Listeners: the node API (gRPC over TLS 1.3; node SVIDs as client
//! certificates) on a TCP port, and the admin API (gRPC) on a root-only
//! Unix socket. See docs/ARCHITECTURE.md.

mod admin_api;
mod keys;
mod listen;
mod node_api;
pub mod oidc;
pub mod secrets;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tether_ca::Upstream;
use tether_spiffe::{Bundle, SpiffeId, TrustDomain};
pub use tether_store::is_postgres_url;
use tether_store::{Lock, Store, Topic};
use tether_tls::{SharedBundle, SwappableCert};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use keys::server_id;
use keys::{ActiveKeys, JwtIssued, KeyManager};

/// A client assertion is used at once, for one token request.
const CLIENT_ASSERTION_TTL_SECS: i64 = 60;
pub use oidc::{Issuer, OidcConfig};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("store: {0}")]
    Store(#[from] tether_store::StoreError),
    #[error("CA: {0}")]
    Ca(#[from] tether_ca::CaError),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl From<ServerError> for tonic::Status {
    fn from(e: ServerError) -> Self {
        match e {
            ServerError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            ServerError::PermissionDenied(m) => tonic::Status::permission_denied(m),
            ServerError::NotFound(m) => tonic::Status::not_found(m),
            ServerError::Ca(tether_ca::CaError::MalformedCsr(m)) => {
                tonic::Status::invalid_argument(format!("malformed CSR: {m}"))
            }
            ServerError::Ca(tether_ca::CaError::CsrRejected(m)) => {
                tonic::Status::invalid_argument(format!("CSR rejected: {m}"))
            }
            other => {
                tracing::error!(error = %other, "internal error");
                tonic::Status::internal(other.to_string())
            }
        }
    }
}

/// A clock the tests can move.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    })
}

/// Where the server keeps its state.
#[derive(Clone)]
pub enum Database {
    /// `server.db` in the data directory, sealed with `secrets.key` beside
    /// it (made on first start): one server.
    Sqlite,
    /// A PostgreSQL database any number of servers share. Secrets are
    /// sealed with the operator's key-encryption key, the same file on
    /// every server; `ca` verifies the database's certificate (the system's
    /// roots otherwise) when the URL's sslmode asks for TLS.
    Postgres {
        url: String,
        ca: Option<PathBuf>,
        kek: PathBuf,
    },
}

pub struct ServerConfig {
    /// How this server names itself to operators (`tether get nodes`
    /// shows each node's); default `<host name>:<node API port>`.
    pub name: Option<String>,
    pub trust_domain: TrustDomain,
    /// Holds the SQLite database (which contains CA keys: owner-only).
    pub data_dir: PathBuf,
    pub database: Database,
    /// Node API listen address (TLS).
    pub listen: SocketAddr,
    pub admin_socket: PathBuf,
    /// Operator CA certificates (PEM) whose node certificates attest by
    /// x509pop, without a join token.
    pub node_ca: Option<PathBuf>,
    /// Operator CA (certificate PEM, key PEM) to chain Tether's CAs to.
    pub upstream: Option<(PathBuf, PathBuf)>,
    pub ca_ttl_secs: i64,
    pub node_svid_ttl_secs: i64,
    /// How often due CA/JWT key rotation steps are checked.
    pub rotation_check: Duration,
    pub clock: Clock,
    /// Publishes the JWT keys for OIDC discovery and puts the issuer into
    /// every JWT-SVID.
    pub oidc: Option<OidcConfig>,
}

impl ServerConfig {
    pub fn new(trust_domain: TrustDomain, data_dir: PathBuf) -> Self {
        ServerConfig {
            name: None,
            trust_domain,
            data_dir,
            database: Database::Sqlite,
            node_ca: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            admin_socket: PathBuf::from("/run/tether/admin.sock"),
            upstream: None,
            ca_ttl_secs: 7 * 86400,
            node_svid_ttl_secs: 3600,
            rotation_check: Duration::from_secs(30),
            clock: system_clock(),
            oidc: None,
        }
    }
}

/// Shared server state used by every API.
pub struct State {
    /// The operator's node CA (DER) for x509pop attestation, if any.
    pub node_ca: Option<Vec<Vec<u8>>>,
    /// This server's name among those sharing the database (set once its
    /// node API is bound).
    name: std::sync::OnceLock<String>,
    pub td: TrustDomain,
    pub store: Store,
    keys: RwLock<Arc<ActiveKeys>>,
    key_manager: KeyManager,
    pub bundle: SharedBundle,
    server_cert: Arc<SwappableCert>,
    server_cert_expiry: RwLock<(i64, i64)>,
    /// Bumped on every registry or bundle change; watch streams follow it.
    pub updates: watch::Sender<u64>,
    pub node_svid_ttl_secs: i64,
    pub clock: Clock,
    /// Seals static secrets before they are stored.
    pub sealer: Arc<secrets::Sealer>,
    /// The OIDC issuer URL JWT-SVIDs carry as `iss`, when discovery is on.
    pub issuer: Option<String>,
    /// Held while a JWT-SVID is signed and while keys rotate, so a key is
    /// never retired between signing a token and noting its expiry.
    jwt_issued: Mutex<JwtIssued>,
}

impl State {
    /// This server's name among those sharing the database.
    pub fn name(&self) -> &str {
        self.name.get().map_or("", String::as_str)
    }

    pub fn now(&self) -> i64 {
        (self.clock)()
    }

    pub fn keys(&self) -> Arc<ActiveKeys> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn current_bundle(&self) -> Bundle {
        self.bundle
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn notify(&self) {
        self.updates.send_modify(|v| *v += 1);
    }

    /// Runs key reconciliation (creation, due rotation steps, or a forced
    /// step) and publishes the result.
    pub fn reconcile_keys(&self, force: Option<&str>) -> Result<(), ServerError> {
        // One server at a time decides on keys; the others read what it
        // decided. The database lock is taken before the JWT bookkeeping,
        // so minting JWTs here never waits on another server.
        let (changed, signer_changed, bundle_moved, now) =
            self.store
                .exclusive(Lock::Keys, || -> Result<_, ServerError> {
                    let now = self.now();
                    let mut issued = self.jwt_issued.lock().unwrap_or_else(|p| p.into_inner());
                    let retire_until = issued.retire_until(self.keys().jwt.kid(), now);
                    let (keys, changed) =
                        self.key_manager
                            .reconcile(&self.store, now, force, retire_until)?;
                    issued.activated(keys.jwt.kid(), now);
                    let signer_changed = self.keys().signer_id != keys.signer_id;
                    // Another server's decision changes this server's bundle
                    // without changing the database now: its agents still need
                    // the new bundle.
                    let bundle_moved = self.current_bundle() != keys.bundle;
                    *self.bundle.write().unwrap_or_else(|p| p.into_inner()) = keys.bundle.clone();
                    *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
                    // Held until the new key is in place: a JWT minted meanwhile
                    // (under this lock) is signed by the key whose expiry it
                    // notes, never by a retired one whose publication was just
                    // cut short.
                    drop(issued);
                    Ok((changed, signer_changed, bundle_moved, now))
                })??;
        let (issued, expiry) = *self
            .server_cert_expiry
            .read()
            .unwrap_or_else(|p| p.into_inner());
        if signer_changed || now >= issued + (expiry - issued) / 2 {
            self.renew_server_svid(now)?;
        }
        if changed || bundle_moved {
            tracing::info!(
                sequence = self.current_bundle().sequence,
                "trust bundle changed"
            );
            self.notify();
        }
        if changed || signer_changed {
            // Other servers on the database follow now rather than at their
            // next key check (they find nothing to decide, so this ends).
            if let Err(e) = self.store.publish(Topic::Keys) {
                tracing::warn!(error = %e, "could not tell the other servers about a key change");
            }
        }
        Ok(())
    }

    /// Signs a JWT-SVID for `id` valid `ttl` seconds from now, with the
    /// issuer when OIDC discovery is on. Returns the token and its expiry.
    pub fn mint_jwt(
        &self,
        id: &SpiffeId,
        audience: &[String],
        ttl: i64,
    ) -> Result<(String, i64), ServerError> {
        let mut issued = self.jwt_issued.lock().unwrap_or_else(|p| p.into_inner());
        let keys = self.keys();
        let now = self.now();
        let exp = now + ttl;
        let token =
            tether_spiffe::jwt::sign_as(&keys.jwt, self.issuer.as_deref(), id, audience, now, exp)
                .map_err(|e| ServerError::Internal(format!("signing JWT-SVID: {e}")))?;
        issued.note(keys.jwt.kid(), exp);
        Ok((token, exp))
    }

    /// Signs an RFC 7523 client assertion for `client_id` at `token_endpoint`
    /// (a minute's life, a random jti). Noted like a JWT-SVID, so its key
    /// stays published until it expires.
    pub fn mint_client_assertion(
        &self,
        client_id: &str,
        token_endpoint: &str,
    ) -> Result<(String, i64), ServerError> {
        let mut jti = [0u8; 16];
        aws_lc_rs::rand::fill(&mut jti)
            .map_err(|_| ServerError::Internal("no randomness for a jti".into()))?;
        let mut issued = self.jwt_issued.lock().unwrap_or_else(|p| p.into_inner());
        let keys = self.keys();
        let now = self.now();
        let exp = now + CLIENT_ASSERTION_TTL_SECS;
        let token = tether_spiffe::jwt::sign_client_assertion(
            &keys.jwt,
            client_id,
            token_endpoint,
            &hex::encode(jti),
            now,
            exp,
        )
        .map_err(|e| ServerError::Internal(format!("signing client assertion: {e}")))?;
        issued.note(keys.jwt.kid(), exp);
        Ok((token, exp))
    }

    fn renew_server_svid(&self, now: i64) -> Result<(), ServerError> {
        let (chain, key, not_after) = keys::issue_server_svid(&self.keys(), &self.td, now)?;
        let ck = tether_tls::certified_key(&chain, key.pkcs8_der())
            .map_err(|e| ServerError::Internal(e.to_string()))?;
        self.server_cert.set(ck);
        *self
            .server_cert_expiry
            .write()
            .unwrap_or_else(|p| p.into_inner()) = (now, not_after);
        Ok(())
    }

    /// Creates a join token; only its hash is stored.
    pub fn create_join_token(
        &self,
        ttl_secs: i64,
        node_name: Option<&str>,
    ) -> Result<(String, i64), ServerError> {
        if !(1..=30 * 86400).contains(&ttl_secs) {
            return Err(ServerError::InvalidArgument(format!(
                "join token TTL {ttl_secs}s out of range (1s to 30d)"
            )));
        }
        if let Some(n) = node_name {
            tether_manifest::validate_name(n)
                .map_err(|m| ServerError::InvalidArgument(format!("node name: {m}")))?;
        }
        let token = hex::encode(rand::random::<[u8; 24]>());
        let now = self.now();
        self.store
            .create_join_token(&token_hash(&token), now, now + ttl_secs, node_name)?;
        Ok((token, now + ttl_secs))
    }

    pub fn node_id(&self, name: &str) -> Result<SpiffeId, ServerError> {
        SpiffeId::new(&self.td, &format!("/tether/node/{name}"))
            .map_err(|e| ServerError::InvalidArgument(e.to_string()))
    }
}

pub(crate) fn token_hash(token: &str) -> String {
    hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        token.as_bytes(),
    ))
}

/// A started server: its bound address and tasks.
pub struct RunningServer {
    pub state: Arc<State>,
    pub node_addr: SocketAddr,
    /// Where OIDC discovery is served, when it is on.
    pub oidc_addr: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningServer {
    pub fn abort(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Opens the store, makes sure keys exist, binds both listeners and starts
/// serving. Returns once the listeners are bound.
pub async fn start(cfg: ServerConfig) -> anyhow::Result<RunningServer> {
    use anyhow::Context as _;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    restrict_dir(&cfg.data_dir);
    let (store, sealer) = open_store(&cfg)?;
    let upstream = match &cfg.upstream {
        Some((cert, key)) => {
            let c = std::fs::read_to_string(cert)
                .with_context(|| format!("reading upstream CA certificate {}", cert.display()))?;
            let k = std::fs::read_to_string(key)
                .with_context(|| format!("reading upstream CA key {}", key.display()))?;
            Some(Upstream::from_pem(&c, &k).context("upstream CA")?)
        }
        None => None,
    };
    let km = KeyManager {
        td: cfg.trust_domain.clone(),
        ttl_secs: cfg.ca_ttl_secs,
        upstream,
        sealer: sealer.clone(),
        // Only SQLite databases written before keys were sealed hold clear
        // ones; in PostgreSQL a clear key can only have been planted.
        clear_keys_allowed: store.dialect() == tether_store::sql::Dialect::Sqlite,
    };
    let now = (cfg.clock)();
    // A key found active may have signed anything up to the longest TTL
    // ago; one this start makes active has signed nothing yet.
    let active_before = store
        .jwt_keys()?
        .into_iter()
        .find(|k| k.state == tether_store::KeyState::Active && k.not_after > now)
        .map(|k| k.kid)
        .unwrap_or_default();
    let mut issued = JwtIssued::unknown(&active_before);
    let (keys, _) = store
        .exclusive(Lock::Keys, || {
            km.reconcile(&store, now, None, issued.retire_until(&active_before, now))
        })?
        .context("initialising CA and JWT keys")?;
    issued.activated(keys.jwt.kid(), now);
    let jwt_issued = Mutex::new(issued);
    let (chain, key, not_after) = keys::issue_server_svid(&keys, &cfg.trust_domain, now)?;
    let ck = tether_tls::certified_key(&chain, key.pkcs8_der())
        .map_err(|e| anyhow::anyhow!("server SVID: {e}"))?;
    let (updates, _) = watch::channel(0u64);
    let node_ca = match &cfg.node_ca {
        Some(p) => Some(read_certs(p).with_context(|| format!("--node-ca {}", p.display()))?),
        None => None,
    };
    let state = Arc::new(State {
        node_ca,
        name: std::sync::OnceLock::new(),
        td: cfg.trust_domain.clone(),
        store,
        bundle: Arc::new(RwLock::new(keys.bundle.clone())),
        keys: RwLock::new(Arc::new(keys)),
        key_manager: km,
        server_cert: SwappableCert::new(ck),
        server_cert_expiry: RwLock::new((now, not_after)),
        updates,
        node_svid_ttl_secs: cfg.node_svid_ttl_secs,
        clock: cfg.clock.clone(),
        sealer,
        issuer: cfg.oidc.as_ref().map(|o| o.issuer.as_str().to_owned()),
        jwt_issued,
    });

    let mut tasks = Vec::new();
    let (node_addr, t) =
        listen::serve_node_api(state.clone(), cfg.listen, state.server_cert.clone()).await?;
    tasks.push(t);
    let _ = state.name.set(cfg.name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}:{}", host.trim(), node_addr.port())
    }));
    tasks.push(listen::serve_admin_api(state.clone(), &cfg.admin_socket)?);
    let oidc_addr = match &cfg.oidc {
        Some(o) => {
            let (addr, t) = oidc::serve(state.clone(), o).await?;
            tasks.extend(t);
            tracing::info!(issuer = o.issuer.as_str(), oidc = %addr, "OIDC discovery served");
            Some(addr)
        }
        None => None,
    };
    tasks.push(follow_feed(state.clone()));
    let st = state.clone();
    let every = cfg.rotation_check;
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        let mut seen = st.store.revision().ok();
        loop {
            tick.tick().await;
            // Off the runtime's workers: it may wait on the database.
            let s = st.clone();
            match tokio::task::spawn_blocking(move || s.reconcile_keys(None)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "key rotation check failed; will retry"),
                Err(e) => tracing::error!(error = %e, "key rotation check panicked; will retry"),
            }
            // A change another server made while the feed was down reaches
            // the agents here at the latest.
            if let Ok(r) = st.store.revision()
                && seen != Some(r)
            {
                seen = Some(r);
                st.notify();
            }
        }
    }));
    tracing::info!(trust_domain = %cfg.trust_domain, node_api = %node_addr, admin = %cfg.admin_socket.display(), "server started");
    Ok(RunningServer {
        state,
        node_addr,
        oidc_addr,
        tasks,
    })
}

/// Follows the changes every server on the database publishes: registry
/// changes wake this server's watch streams, key changes (and a reconnected
/// feed, which may have missed some) make it read the keys again.
fn follow_feed(state: Arc<State>) -> JoinHandle<()> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    state.store.subscribe(move |t| {
        let _ = tx.send(t);
    });
    tokio::spawn(async move {
        while let Some(t) = rx.recv().await {
            if matches!(t, Topic::Keys | Topic::Resync) {
                let st = state.clone();
                match tokio::task::spawn_blocking(move || st.reconcile_keys(None)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "following a key change failed; the next key check retries")
                    }
                    Err(e) => tracing::error!(error = %e, "following a key change panicked"),
                }
            }
            state.notify();
        }
    })
}

/// The store and the sealer of its secrets, as `cfg.database` says.
fn open_store(cfg: &ServerConfig) -> anyhow::Result<(Store, Arc<secrets::Sealer>)> {
    use anyhow::Context as _;
    Ok(match &cfg.database {
        Database::Sqlite => {
            let db = cfg.data_dir.join("server.db");
            let store = Store::open(&db).with_context(|| format!("opening {}", db.display()))?;
            let sealer = secrets::Sealer::load_or_create(&cfg.data_dir.join("secrets.key"))?;
            (store, Arc::new(sealer))
        }
        Database::Postgres { url, ca, kek } => {
            let sealer = secrets::Sealer::load(kek).context("--kek-file")?;
            let roots = match ca {
                Some(p) => {
                    let mut roots = rustls::RootCertStore::empty();
                    for c in
                        read_certs(p).with_context(|| format!("--database-ca {}", p.display()))?
                    {
                        roots
                            .add(c.into())
                            .with_context(|| format!("--database-ca {}", p.display()))?;
                    }
                    roots
                }
                None => tether_tls::system_roots(),
            };
            let tls = rustls::ClientConfig::builder_with_provider(tether_tls::provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
            let store = Store::open_postgres(url, Some(Arc::new(tls)))
                .context("opening the PostgreSQL database")?;
            (store, Arc::new(sealer))
        }
    })
}

/// The certificates (DER) of a PEM file; at least one.
fn read_certs(p: &std::path::Path) -> anyhow::Result<Vec<Vec<u8>>> {
    use anyhow::Context as _;
    use rustls_pki_types::pem::PemObject as _;
    let pem = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .context("not PEM certificates")?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in it");
    Ok(certs)
}

fn restrict_dir(p: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700));
}
