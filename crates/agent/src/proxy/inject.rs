//! The injector: connections the kernel sent to the agent because the
//! process's verdict for the Service carries the inject flag (a
//! CredentialBinding of one of its identities names that Service). The
//! agent connects to the original destination itself and adds the
//! credential on the way out, so the process never holds it:
//! - `http`: every request's configured header is replaced (`http.rs`);
//! - `redis`: the upstream connection is authenticated before any client
//!   byte is relayed (`redis.rs`);
//! - `postgresql`: the agent answers the server's authentication exchange
//!   as the configured user, then relays the session (`postgres.rs`).
//!
//! With `tls` in the binding the agent originates TLS to the upstream
//! (PostgreSQL: after SSLRequest), verifying it against the binding's CA
//! or the system roots: the client's leg is loopback plaintext.
//!
//! The credential is the binding's value for this exact process instance
//! (`deliver::fetch`, shared with the credential filesystem). Each
//! connection is audited when it starts and when it is refused or revoked;
//! it lives in the connection table (`tether connections`, closed when the
//! process exits) and ends within a verdict change when the process loses
//! the inject verdict (policy or binding removed, process exec'd or gone).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tether_kernel::HeldConnection;
use tether_manifest::{FileFormat, InjectProtocol, UpstreamTls};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use zeroize::Zeroizing;

use super::hold::HoldPorts;
use super::http::{Inject, Rewriter};
use super::mesh::{Conn, Tunnels};
use super::postgres::{self, First, PgError, Scram};
use super::redis;
use crate::audit::AuditLog;
use crate::deliver::fetch::Fetcher;
use crate::enforce::HeldDecision;
use crate::identity::ProcSvid;
use crate::identity::intercept::Interceptor;
use crate::metrics::Metrics;
use crate::state::registry::{AgentBinding, AgentService};
use crate::state::tracker::{Current, Tracker};

/// How long the process's SVID may still be in the making.
const SVID_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent tries to reach the original destination.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the upstream may take to answer the injected authentication.
const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// Read size on the client's request stream.
const READ_BUF: usize = 64 * 1024;
/// Injected connections at once, in all and per process: their own pool
/// (not the hold path's), so long-lived pooled connections cannot starve
/// the decisions of other processes.
const MAX_INJECTED: usize = 4096;
const MAX_INJECTED_PER_PROCESS: usize = 256;
/// How long a PostgreSQL client may take to send its startup packet.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The upstream side: plain TCP or the agent's own TLS over it.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Upstream = Box<dyn Io>;

/// The client's side: its TCP connection, or TLS the agent terminated
/// with a leaf of the intercepting CA.
enum Client {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Client {
    fn tcp(&mut self) -> &mut TcpStream {
        match self {
            Client::Plain(s) => s,
            Client::Tls(t) => t.get_mut().0,
        }
    }

    fn into_tcp(self) -> TcpStream {
        match self {
            Client::Plain(s) => s,
            Client::Tls(t) => t.into_inner().0,
        }
    }
}

impl AsyncRead for Client {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Client::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Client::Tls(t) => std::pin::Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Client {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Client::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Client::Tls(t) => std::pin::Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Client::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Client::Tls(t) => std::pin::Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Client::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Client::Tls(t) => std::pin::Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Serves the intercepting CA's leaf for the client's SNI, only for a
/// hostname of the Service the connection is to.
struct InterceptResolver {
    interceptor: Arc<Interceptor>,
    /// This Service's hostnames (its CA's constraint).
    mine: Vec<String>,
}

impl std::fmt::Debug for InterceptResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InterceptResolver")
    }
}

impl rustls::server::ResolvesServerCert for InterceptResolver {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let sni = hello.server_name()?.to_ascii_lowercase();
        if !self.mine.contains(&sni) {
            return None;
        }
        self.interceptor.leaf(&self.mine, &sni).ok()
    }
}

/// An upstream connection ready for the client's bytes, with its TLS
/// version and cipher when the agent originated TLS; or a PostgreSQL
/// cancel request, passed on and done.
enum Opened {
    Ready(Upstream, Option<(String, String)>),
    Cancel,
}

/// A refusal while opening: the audit verdict and why.
type OpenError = (&'static str, String);

pub struct Injector {
    tracker: Arc<Tracker>,
    fetcher: Arc<Fetcher>,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    tunnels: Arc<Tunnels>,
    next_id: AtomicU64,
    /// TLS client configurations by CA bundle (None: the system roots).
    tls: Mutex<HashMap<Option<String>, Arc<rustls::ClientConfig>>>,
    interceptor: Arc<Interceptor>,
    slots: Arc<tether_attest::KeyedSlots<u32>>,
    /// Upstream sockets are made in the client's network namespace.
    namespaces: Arc<crate::proxy::netns::Namespaces>,
}

/// Who the connection is for and what it carries, for its audit records.
struct Facts {
    rec: HeldConnection,
    exe: String,
    uid: u32,
    service: String,
    binding: Option<AgentBinding>,
    spiffe_id: String,
}

impl Facts {
    fn record(&self, verdict: &str) -> serde_json::Value {
        let b = self.binding.as_ref();
        json!({
            "event": "inject",
            "verdict": verdict,
            "pid": self.rec.tgid,
            "exe": self.exe,
            "uid": self.uid,
            "spiffeId": self.spiffe_id,
            "identity": b.map(|b| b.identity.as_str()),
            "binding": b.map(|b| b.name.as_str()),
            "source": b.map(|b| b.source.as_str()),
            "protocol": b.and_then(|b| b.inject.as_ref()).map(|i| i.protocol.name()),
            "service": self.service,
            "dst": self.rec.original_dst.to_string(),
        })
    }
}

/// How an injected connection ended, when it did not end normally.
enum End {
    /// The client sent something that cannot be framed one way only.
    Refused(String),
    /// The process lost the inject verdict (audited `revoked`), or is gone
    /// or no longer the one that connected (`closed`).
    Revoked(&'static str, String),
    Io(std::io::Error),
}

impl Injector {
    pub fn new(
        tracker: Arc<Tracker>,
        fetcher: Arc<Fetcher>,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
        tunnels: Arc<Tunnels>,
        interceptor: Arc<Interceptor>,
        namespaces: Arc<crate::proxy::netns::Namespaces>,
    ) -> Arc<Self> {
        Arc::new(Injector {
            tracker,
            fetcher,
            audit,
            metrics,
            tunnels,
            next_id: AtomicU64::new(1),
            tls: Mutex::new(HashMap::new()),
            interceptor,
            slots: tether_attest::KeyedSlots::new(MAX_INJECTED_PER_PROCESS, MAX_INJECTED),
            namespaces,
        })
    }

    /// Carries one connection the hold path allowed with injection.
    pub async fn serve(
        &self,
        client: TcpStream,
        rec: HeldConnection,
        start_ticks: u64,
        service: AgentService,
        decision: HeldDecision,
        ports: Arc<dyn HoldPorts>,
    ) {
        let (exe, uid) = decision
            .proc
            .as_ref()
            .map(|(i, _)| (i.exe_path.clone(), i.uid))
            .unwrap_or((String::new(), rec.uid));
        let mut facts = Facts {
            rec,
            exe,
            uid,
            service: service.name.clone(),
            binding: None,
            spiffe_id: String::new(),
        };
        let mut client = Client::Plain(client);
        let Some(_slot) = self.slots.take(rec.tgid) else {
            let why = format!(
                "too many injected connections (at most {MAX_INJECTED_PER_PROCESS} per process, {MAX_INJECTED} in all)"
            );
            return self.refuse(client, &facts, "deny", &why);
        };
        // A credential goes only to an address the operator named: the
        // kernel also routes other local addresses at the Service's port
        // here (another loopback address or family), where any local
        // process may be listening.
        if !crate::decide::declared_tcp_address(&service.spec, rec.original_dst) {
            let why = format!(
                "{} is not one of the Service's declared addresses (injection goes only to those)",
                rec.original_dst
            );
            return self.refuse(client, &facts, "deny", &why);
        }
        let (current, binding, svid) = match self.bound(&rec, start_ticks, &service.name).await {
            Ok(found) => found,
            Err(why) => return self.refuse(client, &facts, "deny", &why),
        };
        facts.binding = Some(binding.clone());
        facts.spiffe_id = svid.spiffe_id.to_string();
        let Some(protocol) = binding.inject.as_ref().map(|i| i.protocol.clone()) else {
            return self.refuse(client, &facts, "deny", "the binding no longer injects");
        };
        // JSON for STS (the key, secret and session token); the others are
        // fetched as their bytes whatever the format.
        let value = match self
            .fetcher
            .fetched(&current, &binding, &svid, FileFormat::Json)
            .await
        {
            Ok(v) => v,
            Err(why) => {
                return self.refuse(client, &facts, "deny", &format!("no credential: {why}"));
            }
        };
        let mut tls = binding.inject.as_ref().and_then(|i| i.tls.clone());
        // With interception, the Host a request may name: the SNI its TLS
        // was verified for (so a front end cannot route it elsewhere).
        let mut sni_hosts: Vec<String> = Vec::new();
        // HTTPS from the client: terminated here with a leaf for its SNI,
        // and TLS again to the upstream for that name.
        if binding
            .inject
            .as_ref()
            .is_some_and(|i| i.intercept.is_some())
        {
            match self.terminate(client.into_tcp(), &service).await {
                Ok((t, sni)) => {
                    client = Client::Tls(t);
                    sni_hosts = vec![sni.clone(), format!("{sni}:{}", rec.original_dst.port())];
                    let mut up = tls.unwrap_or(UpstreamTls {
                        server_name: None,
                        ca: None,
                    });
                    up.server_name.get_or_insert(sni);
                    tls = Some(up);
                }
                Err(why) => return self.audit_refusal(&facts, "refused-request", &why),
            }
        }
        let opened = match &protocol {
            InjectProtocol::Postgresql { user } => {
                self.open_postgres(client.tcp(), &rec, tls.as_ref(), user, &value.bytes)
                    .await
            }
            _ => self.open(&rec, tls.as_ref()).await,
        };
        let (mut upstream, tls_info) = match opened {
            Ok(Opened::Ready(u, t)) => (u, t),
            Ok(Opened::Cancel) => {
                self.metrics.injected_connection(protocol.name(), "cancel");
                return;
            }
            Err((verdict, why)) => return self.refuse(client, &facts, verdict, &why),
        };
        // Protocol start: what must happen before the client's first
        // byte, and what judges the client's stream from then on.
        let filter: Option<Box<dyn Filter>> = match &protocol {
            InjectProtocol::Redis { user } => {
                if let Err(why) = redis_auth(&mut upstream, user.as_deref(), &value.bytes).await {
                    return self.refuse(client, &facts, "upstream-refused", &why);
                }
                Some(Box::new(redis::CommandFilter::default()))
            }
            InjectProtocol::Http {
                header,
                scheme,
                authority,
            } => match Inject::new(header, *scheme, &value.bytes) {
                Ok(i) => Some(Box::new(Rewriter::new(
                    i.with_authority(authority.clone())
                        .or_authorities(sni_hosts.clone()),
                ))),
                Err(e) => return self.refuse(client, &facts, "deny", &e.to_string()),
            },
            InjectProtocol::AwsSigV4 {
                region,
                service,
                authority,
            } => match aws_keys(&value.bytes) {
                Ok((ak, sk, token)) => Some(Box::new(Rewriter::new(
                    Inject::sigv4(
                        &ak,
                        &sk,
                        token.as_ref().map(|t| t.as_str()),
                        region,
                        service,
                    )
                    .with_authority(authority.clone()),
                ))),
                Err(why) => return self.refuse(client, &facts, "deny", &why),
            },
            InjectProtocol::Postgresql { .. } => None,
        };
        drop(value);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = self.tunnels.register(Conn::injected(
            id,
            rec.tgid,
            facts.exe.clone(),
            facts.spiffe_id.clone(),
            rec.original_dst,
            facts.service.clone(),
            tls_info,
            json!({ "binding": binding.name, "source": binding.source, "protocol": protocol.name() }),
        ));
        let mut started = facts.record("allow");
        started["upstream"] = json!(if tls.is_some() { "tls" } else { "connected" });
        self.audit.publish(started);
        self.metrics.injected_connection(protocol.name(), "allowed");

        let relay = async {
            match filter {
                Some(f) => relay_filtered(&mut client, &mut upstream, f, &conn).await,
                None => relay_raw(&mut client, &mut upstream, &conn).await,
            }
        };
        let end = tokio::select! {
            r = relay => r,
            (verdict, why) = revoked(&*ports, &rec, start_ticks) => Err(End::Revoked(verdict, why)),
            _ = conn.closed() => Err(End::Revoked("closed", "the process exited".into())),
        };
        self.tunnels.unregister(id);
        match end {
            Ok(requests) => {
                tracing::debug!(pid = rec.tgid, requests, "injected connection ended");
            }
            Err(End::Io(e)) => {
                tracing::debug!(pid = rec.tgid, error = %e, "injected connection ended with an error");
                reset(client.into_tcp());
                drop(upstream);
            }
            Err(End::Refused(r)) => {
                let mut a = facts.record("refused-request");
                a["reason"] = json!(r);
                self.audit.publish(a);
                self.metrics
                    .injected_connection(protocol.name(), "refused_request");
                reset(client.into_tcp());
                drop(upstream);
            }
            Err(End::Revoked(verdict, why)) => {
                let mut a = facts.record(verdict);
                a["reason"] = json!(why);
                self.audit.publish(a);
                self.metrics.injected_connection(protocol.name(), verdict);
                reset(client.into_tcp());
                drop(upstream);
            }
        }
    }

    /// The process instance, the binding that injects into `service` for
    /// one of its identities (the first by name), and that identity's
    /// SVID; waits briefly for an SVID still being issued.
    async fn bound(
        &self,
        rec: &HeldConnection,
        start_ticks: u64,
        service: &str,
    ) -> Result<(Current, AgentBinding, Arc<ProcSvid>), String> {
        let pid = rec.tgid as i32;
        let mut changes = self.tracker.changes.subscribe();
        let deadline = tokio::time::Instant::now() + SVID_TIMEOUT;
        loop {
            let reg = self.tracker.registry.borrow().clone();
            // The image that connected, not one exec'd since.
            let same_image = self
                .tracker
                .exec_record(pid)
                .is_some_and(|r| r.exec_id == rec.exec_id);
            if let Some(c) = self
                .tracker
                .current(pid)
                .filter(|c| c.start_time == start_ticks && same_image)
            {
                let found = reg.bindings.iter().find_map(|b| {
                    b.inject.as_ref().filter(|i| i.service == service)?;
                    let svid = c.svids.iter().find(|s| s.identity == b.identity)?;
                    Some((b.clone(), svid.clone()))
                });
                if let Some((b, svid)) = found {
                    return Ok((c, b, svid));
                }
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err("agent shutting down".into()),
                Err(_) => {
                    return Err(format!(
                        "process {pid} holds no identity bound to inject into {service} (after {SVID_TIMEOUT:?})"
                    ));
                }
            }
        }
    }

    /// Connects to the original destination, with the agent's own TLS when
    /// the binding asks for it.
    async fn open(
        &self,
        rec: &HeldConnection,
        tls: Option<&UpstreamTls>,
    ) -> Result<Opened, OpenError> {
        let tcp = connect(&self.namespaces, rec).await?;
        match tls {
            None => Ok(Opened::Ready(Box::new(tcp), None)),
            Some(t) => {
                let (s, info) = self.handshake(tcp, rec, t).await?;
                Ok(Opened::Ready(s, Some(info)))
            }
        }
    }

    /// TLS to the upstream, verified against the binding's CA (or the
    /// system roots) for its server name (or the destination address).
    async fn handshake(
        &self,
        tcp: TcpStream,
        rec: &HeldConnection,
        t: &UpstreamTls,
    ) -> Result<(Upstream, (String, String)), OpenError> {
        let cfg = self.tls_config(t.ca.as_deref()).map_err(|e| ("deny", e))?;
        let name = match &t.server_name {
            Some(n) => rustls::pki_types::ServerName::try_from(n.clone())
                .map_err(|e| ("deny", format!("tls.serverName {n:?}: {e}")))?,
            None => rustls::pki_types::ServerName::IpAddress(rec.original_dst.ip().into()),
        };
        let tls = tokio::time::timeout(
            UPSTREAM_TIMEOUT,
            tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
        )
        .await
        .map_err(|_| {
            (
                "upstream-failed",
                format!(
                    "TLS to {} took longer than {UPSTREAM_TIMEOUT:?}",
                    rec.original_dst
                ),
            )
        })?
        .map_err(|e| {
            (
                "upstream-failed",
                format!("TLS to {}: {e}", rec.original_dst),
            )
        })?;
        let (_, conn) = tls.get_ref();
        let info = (
            conn.protocol_version()
                .map(|v| format!("{v:?}"))
                .unwrap_or_default(),
            conn.negotiated_cipher_suite()
                .map(|c| format!("{:?}", c.suite()))
                .unwrap_or_default(),
        );
        Ok((Box::new(tls), info))
    }

    fn tls_config(&self, ca: Option<&str>) -> Result<Arc<rustls::ClientConfig>, String> {
        let key = ca.map(str::to_owned);
        if let Some(c) = self.tls.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(c.clone());
        }
        let roots = match ca {
            Some(pem) => {
                use rustls::pki_types::pem::PemObject as _;
                let mut roots = rustls::RootCertStore::empty();
                for c in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    let c = c.map_err(|e| format!("tls.ca: {e}"))?;
                    roots.add(c).map_err(|e| format!("tls.ca: {e}"))?;
                }
                roots
            }
            None => crate::deliver::exchange::system_roots(),
        };
        if roots.is_empty() {
            return Err("no CA certificate to verify the upstream with".into());
        }
        let cfg = rustls::ClientConfig::builder_with_provider(tether_tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let cfg = Arc::new(cfg);
        self.tls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, cfg.clone());
        Ok(cfg)
    }

    /// PostgreSQL: reads the client's startup (answering SSLRequest `N`:
    /// its leg is loopback), opens the upstream (TLS through SSLRequest
    /// when the binding asks), sends the startup as the configured user,
    /// answers the authentication exchange, and hands the client the
    /// server's AuthenticationOk and whatever followed it.
    async fn open_postgres(
        &self,
        client: &mut TcpStream,
        rec: &HeldConnection,
        tls: Option<&UpstreamTls>,
        user: &str,
        password: &[u8],
    ) -> Result<Opened, OpenError> {
        let refused = |e: PgError| ("refused-request", e.to_string());
        let (first, leftover) = tokio::time::timeout(STARTUP_TIMEOUT, read_startup(client))
            .await
            .map_err(|_| {
                (
                    "refused-request",
                    format!("no startup packet within {STARTUP_TIMEOUT:?}"),
                )
            })?
            .map_err(refused)?;
        let tcp = connect(&self.namespaces, rec).await?;
        let (mut up, info): (Upstream, _) = match tls {
            None => (Box::new(tcp), None),
            Some(t) => {
                let mut tcp = tcp;
                let answer = async {
                    let mut req = 8u32.to_be_bytes().to_vec();
                    req.extend_from_slice(&postgres::SSL_REQUEST.to_be_bytes());
                    tcp.write_all(&req).await?;
                    let mut b = [0u8; 1];
                    tcp.read_exact(&mut b).await?;
                    Ok::<u8, std::io::Error>(b[0])
                };
                match tokio::time::timeout(UPSTREAM_TIMEOUT, answer).await {
                    Ok(Ok(b'S')) => {}
                    Ok(Ok(_)) => {
                        return Err(("upstream-failed", "the server does not offer TLS".into()));
                    }
                    Ok(Err(e)) => return Err(("upstream-failed", format!("SSLRequest: {e}"))),
                    Err(_) => return Err(("upstream-failed", "no answer to SSLRequest".into())),
                }
                let (s, info) = self.handshake(tcp, rec, t).await?;
                (s, Some(info))
            }
        };
        let (version, params) = match first {
            First::Cancel(bytes) => {
                let _ = up.write_all(&bytes).await;
                let _ = up.shutdown().await;
                return Ok(Opened::Cancel);
            }
            First::Startup { version, params } => (version, params),
            First::Encryption => {
                return Err(refused(PgError::Startup(
                    "a second encryption request".into(),
                )));
            }
        };
        let plaintext_remote = tls.is_none() && !rec.original_dst.ip().is_loopback();
        let auth = tokio::time::timeout(
            AUTH_TIMEOUT,
            pg_authenticate(&mut up, version, &params, user, password, plaintext_remote),
        )
        .await
        .map_err(|_| {
            (
                "upstream-refused",
                format!("authentication took longer than {AUTH_TIMEOUT:?}"),
            )
        })?;
        let rest = match auth {
            Ok(rest) => rest,
            Err((e, error_bytes)) => {
                // The server's own ErrorResponse, so the client says why.
                if let Some(b) = error_bytes {
                    let _ = client.write_all(&b).await;
                }
                return Err(("upstream-refused", e.to_string()));
            }
        };
        client
            .write_all(&rest)
            .await
            .map_err(|e| ("upstream-failed", format!("client: {e}")))?;
        if !leftover.is_empty() {
            up.write_all(&leftover)
                .await
                .map_err(|e| ("upstream-failed", e.to_string()))?;
        }
        Ok(Opened::Ready(up, info))
    }

    /// TLS from the client, with the intercepting CA's leaf for its SNI (a
    /// hostname of `service`); the stream and that name.
    async fn terminate(
        &self,
        tcp: TcpStream,
        service: &AgentService,
    ) -> Result<(Box<tokio_rustls::server::TlsStream<TcpStream>>, String), String> {
        let mine = self
            .tracker
            .registry
            .borrow()
            .service_hostnames(&service.name);
        if mine.is_empty() {
            return Err(format!(
                "Service {} has no hostnames to intercept for",
                service.name
            ));
        }
        let resolver = Arc::new(InterceptResolver {
            interceptor: self.interceptor.clone(),
            mine,
        });
        let mut cfg = match rustls::ServerConfig::builder_with_provider(tether_tls::provider())
            .with_safe_default_protocol_versions()
        {
            Ok(b) => b.with_no_client_auth().with_cert_resolver(resolver),
            Err(e) => return Err(e.to_string()),
        };
        // The rewriter speaks HTTP/1.1 only.
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let accepted = tokio::time::timeout(UPSTREAM_TIMEOUT, acceptor.accept(tcp)).await;
        match accepted {
            Ok(Ok(t)) => {
                let sni = t.get_ref().1.server_name().unwrap_or_default().to_owned();
                Ok((Box::new(t), sni))
            }
            // The TCP stream went with the failed handshake (closed).
            Ok(Err(e)) => Err(format!("TLS from the client: {e}")),
            Err(_) => Err("TLS from the client took too long".into()),
        }
    }

    fn refuse(&self, client: Client, facts: &Facts, verdict: &str, why: &str) {
        self.audit_refusal(facts, verdict, why);
        reset(client.into_tcp());
    }

    fn audit_refusal(&self, facts: &Facts, verdict: &str, why: &str) {
        let mut a = facts.record(verdict);
        a["reason"] = json!(why);
        self.audit.publish(a);
        let proto = facts
            .binding
            .as_ref()
            .and_then(|b| b.inject.as_ref())
            .map_or("unknown", |i| i.protocol.name());
        self.metrics.injected_connection(proto, verdict);
    }
}

/// Access key id, secret key and session token.
type AwsKeys = (String, Zeroizing<String>, Option<Zeroizing<String>>);

/// AWS keys from a source's value: the `credential_process` JSON an
/// `awsSts` source is fetched as (or a static source holding the same).
fn aws_keys(value: &[u8]) -> Result<AwsKeys, String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Keys {
        access_key_id: String,
        secret_access_key: String,
        session_token: Option<String>,
    }
    let k: Keys = serde_json::from_slice(value).map_err(|_| {
        "the source's value is not AWS credentials (AccessKeyId, SecretAccessKey[, SessionToken] as JSON)"
            .to_string()
    })?;
    Ok((
        k.access_key_id,
        Zeroizing::new(k.secret_access_key),
        k.session_token.map(Zeroizing::new),
    ))
}

async fn connect(
    namespaces: &crate::proxy::netns::Namespaces,
    rec: &HeldConnection,
) -> Result<TcpStream, OpenError> {
    // From the agent's own network namespace, whatever the client's: the
    // credential must not cross routes or netfilter rules that whoever is
    // root in the client's namespace may have set (a DNAT to a listener of
    // theirs). The destination is a declared address of the Service
    // (checked before), which is what the node reaches it at.
    let upstream = namespaces.connect(namespaces.home(), rec.original_dst);
    match tokio::time::timeout(UPSTREAM_TIMEOUT, upstream).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err((
            "upstream-failed",
            format!("connecting to {}: {e}", rec.original_dst),
        )),
        Err(_) => Err((
            "upstream-failed",
            format!(
                "{} did not answer in {UPSTREAM_TIMEOUT:?}",
                rec.original_dst
            ),
        )),
    }
}

/// The client's startup packet (after answering `N` to encryption
/// requests, at most two), and any bytes that came after it.
async fn read_startup(client: &mut TcpStream) -> Result<(First, Vec<u8>), PgError> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 4096];
    let mut encryption_requests = 0;
    loop {
        if let Some((first, n)) = postgres::first_packet(&buf)? {
            buf.drain(..n);
            if first == First::Encryption {
                encryption_requests += 1;
                if encryption_requests > 2 || !buf.is_empty() {
                    return Err(PgError::Startup(
                        "unexpected bytes after an encryption request".into(),
                    ));
                }
                client
                    .write_all(b"N")
                    .await
                    .map_err(|e| PgError::Startup(e.to_string()))?;
                continue;
            }
            return Ok((first, buf));
        }
        let n = client
            .read(&mut chunk)
            .await
            .map_err(|e| PgError::Startup(e.to_string()))?;
        if n == 0 {
            return Err(PgError::Startup(
                "the client closed before its startup packet".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Answers the server's authentication requests. Ok: the bytes from
/// AuthenticationOk on (for the client). Err: why, and the server's
/// ErrorResponse when it sent one.
async fn pg_authenticate(
    up: &mut Upstream,
    version: u32,
    params: &[(String, String)],
    user: &str,
    password: &[u8],
    plaintext_remote: bool,
) -> Result<Vec<u8>, (PgError, Option<Vec<u8>>)> {
    let io = |e: std::io::Error| (PgError::Server(e.to_string()), None);
    let password = Zeroizing::new(password.trim_ascii().to_vec());
    up.write_all(&postgres::startup_for(version, params, user))
        .await
        .map_err(io)?;
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let mut before_ok: Vec<u8> = Vec::new();
    let mut scram: Option<Scram> = None;
    loop {
        let Some((ty, payload, n)) = postgres::message(&buf).map_err(|e| (e, None))? else {
            let got = up.read(&mut chunk).await.map_err(io)?;
            if got == 0 {
                return Err((PgError::Server("closed during authentication".into()), None));
            }
            buf.extend_from_slice(&chunk[..got]);
            continue;
        };
        let payload = payload.to_vec();
        let whole = buf[..n].to_vec();
        buf.drain(..n);
        match ty {
            b'E' => {
                return Err((
                    PgError::Refused(postgres::error_message(&payload)),
                    Some(whole),
                ));
            }
            // NegotiateProtocolVersion: the client learns it before AuthOk.
            b'v' => before_ok.extend_from_slice(&whole),
            b'R' if payload.len() >= 4 => {
                let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                let data = &payload[4..];
                // Once SASL is under way, the server may not switch to a
                // weaker method (md5, cleartext) mid-exchange.
                if scram.is_some() && !matches!(code, 0 | 11 | 12) {
                    return Err((
                        PgError::Server(format!("method {code} after SCRAM began")),
                        None,
                    ));
                }
                let answer = match code {
                    0 => {
                        // A SCRAM exchange ends with the server's proof.
                        if scram.as_ref().is_some_and(|s| !s.verified()) {
                            return Err((
                                PgError::Server(
                                    "AuthenticationOk without the SCRAM server proof".into(),
                                ),
                                None,
                            ));
                        }
                        before_ok.extend_from_slice(&whole);
                        before_ok.extend_from_slice(&buf);
                        return Ok(before_ok);
                    }
                    3 if plaintext_remote => {
                        return Err((
                            PgError::Unsupported(
                                "a cleartext password over plaintext to another host".into(),
                            ),
                            None,
                        ));
                    }
                    3 => postgres::cleartext(&password),
                    5 if data.len() == 4 => {
                        let salt = [data[0], data[1], data[2], data[3]];
                        postgres::md5_password(&password, user, &salt)
                    }
                    10 => {
                        if !postgres::mechanisms(data)
                            .iter()
                            .any(|m| m == postgres::SCRAM)
                        {
                            return Err((
                                PgError::Unsupported(format!(
                                    "SASL {:?}",
                                    postgres::mechanisms(data)
                                )),
                                None,
                            ));
                        }
                        let s = Scram::new(&password).map_err(|e| (e, None))?;
                        let first = s.initial();
                        scram = Some(s);
                        first
                    }
                    11 => {
                        let mut s = scram.take().ok_or_else(|| {
                            (PgError::Server("SASLContinue before SASL".into()), None)
                        })?;
                        // PBKDF2 with the server's iteration count: off the
                        // runtime's workers, which decide held connections.
                        let data = data.to_vec();
                        let (s, answer) = tokio::task::spawn_blocking(move || {
                            let a = s.respond(&data);
                            (s, a)
                        })
                        .await
                        .map_err(|e| (PgError::Server(e.to_string()), None))?;
                        scram = Some(s);
                        answer.map_err(|e| (e, None))?
                    }
                    12 => {
                        scram
                            .as_ref()
                            .ok_or_else(|| (PgError::Server("SASLFinal before SASL".into()), None))?
                            .verify(data)
                            .map_err(|e| (e, None))?;
                        if let Some(s) = scram.as_mut() {
                            s.mark_verified();
                        }
                        continue;
                    }
                    other => {
                        return Err((
                            PgError::Unsupported(format!("authentication method {other}")),
                            None,
                        ));
                    }
                };
                up.write_all(&answer).await.map_err(io)?;
            }
            other => {
                return Err((
                    PgError::Server(format!(
                        "message {:?} during authentication",
                        char::from(other)
                    )),
                    None,
                ));
            }
        }
    }
}

/// Resolves (with why) once the process no longer has the inject verdict
/// for the connection's Service: policy or binding removed, or the process
/// exec'd, was marked or exited (its verdicts go with it).
async fn revoked(
    ports: &dyn HoldPorts,
    rec: &HeldConnection,
    start_ticks: u64,
) -> (&'static str, String) {
    let mut changes = ports.verdict_changes();
    loop {
        match ports.verdict(rec, start_ticks) {
            Some(d) if d.allow && d.inject => {}
            Some(d) if d.allow => {
                return (
                    "revoked",
                    "the binding no longer injects into this Service".into(),
                );
            }
            Some(_) => {
                return (
                    "revoked",
                    "the process may no longer reach this Service".into(),
                );
            }
            None => {
                return (
                    "closed",
                    "the process exited, exec'd or was marked: it is no longer the one that connected".into(),
                );
            }
        }
        if changes.changed().await.is_err() {
            return ("closed", "agent shutting down".into());
        }
    }
}

/// AUTH on the upstream connection; the server's answer is consumed here,
/// so the client never sees it.
async fn redis_auth(up: &mut Upstream, user: Option<&str>, password: &[u8]) -> Result<(), String> {
    let cmd = redis::auth_command(user, password.trim_ascii());
    let exchange = async {
        up.write_all(&cmd).await.map_err(|e| e.to_string())?;
        let mut buf = Vec::with_capacity(64);
        let mut chunk = [0u8; 128];
        loop {
            match redis::parse_auth_reply(&buf) {
                Ok(Some(n)) if n == buf.len() => return Ok(()),
                // Nothing may follow: the client has not asked anything.
                Ok(Some(_)) => return Err("the server sent more than an answer to AUTH".into()),
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            let n = up.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("the server closed the connection after AUTH".into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(AUTH_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer to AUTH within {AUTH_TIMEOUT:?}"))?
}

/// Client to server through the rewriter; server to client as it comes.
/// What judges (and, for HTTP, rewrites) the client's stream.
trait Filter: Send {
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, String>;
    /// Unconsumed bytes allowed to wait; past it, [`Filter::overflow`].
    fn limit(&self) -> usize;
    fn overflow(&self) -> String;
    /// Requests (or commands) passed so far, for the log.
    fn count(&self) -> u64;
}

impl Filter for Rewriter {
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, String> {
        Rewriter::feed(self, input, out).map_err(|e| e.to_string())
    }
    fn limit(&self) -> usize {
        Rewriter::limit(self)
    }
    fn overflow(&self) -> String {
        Rewriter::overflow(self).to_string()
    }
    fn count(&self) -> u64 {
        self.requests
    }
}

impl Filter for redis::CommandFilter {
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, String> {
        redis::CommandFilter::feed(self, input, out).map_err(|e| e.to_string())
    }
    fn limit(&self) -> usize {
        redis::CommandFilter::limit(self)
    }
    fn overflow(&self) -> String {
        "a command line longer than Redis accepts".into()
    }
    fn count(&self) -> u64 {
        0
    }
}

async fn relay_filtered<C: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
    upstream: &mut Upstream,
    mut rw: Box<dyn Filter>,
    conn: &Conn,
) -> Result<u64, End> {
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let up = async {
        let mut buf: Vec<u8> = Vec::with_capacity(READ_BUF);
        let mut out: Vec<u8> = Vec::with_capacity(READ_BUF);
        let mut chunk = vec![0u8; READ_BUF];
        loop {
            let n = cr.read(&mut chunk).await.map_err(End::Io)?;
            if n == 0 {
                // A request cut short stays cut short: the server sees the
                // client's half-close.
                uw.shutdown().await.map_err(End::Io)?;
                return Ok(rw.count());
            }
            buf.extend_from_slice(&chunk[..n]);
            let used = rw.feed(&buf, &mut out).map_err(End::Refused)?;
            buf.drain(..used);
            if buf.len() > rw.limit() {
                return Err(End::Refused(rw.overflow()));
            }
            if !out.is_empty() {
                uw.write_all(&out).await.map_err(End::Io)?;
                conn.count(out.len() as u64, 0);
                out.clear();
            }
        }
    };
    let down = async {
        let n = tokio::io::copy(&mut ur, &mut cw).await.map_err(End::Io)?;
        conn.count(0, n);
        cw.shutdown().await.map_err(End::Io)?;
        Ok::<(), End>(())
    };
    let (requests, ()) = tokio::try_join!(up, down)?;
    Ok(requests)
}

/// Both ways as they come (the credential went first).
async fn relay_raw<C: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
    upstream: &mut Upstream,
    conn: &Conn,
) -> Result<u64, End> {
    let (sent, received) = tokio::io::copy_bidirectional(client, upstream)
        .await
        .map_err(End::Io)?;
    conn.count(sent, received);
    Ok(0)
}

fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}
