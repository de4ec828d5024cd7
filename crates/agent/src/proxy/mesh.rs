//! The mesh: mutual TLS between agents, carrying application connections
//! to Services that agents front.
//!
//! Outbound: the kernel redirects an allowed connect to a meshed Service to
//! the hold listener, which hands it here. The agent opens TLS 1.3 to the
//! mesh port at the original destination's address, presenting the calling
//! process's own X.509-SVID (its key never leaves the agent), sends the
//! original destination inside the tunnel, and copies bytes.
//!
//! Inbound: the mesh port accepts TLS from other agents, verifies the
//! client's SVID against the trust bundle, applies ingress policy for the
//! Service named inside the tunnel, and connects to it on this host. The
//! kernel drops packets from other hosts to the Service itself, so the
//! tunnel is the only way in.
//!
//! Every tunnel is listed in the connection table (`tether connections`)
//! and audited by both agents, each naming both ends. A tunnel is closed
//! when the process that opened it exits, as its key is destroyed then.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tether_attest::ProcessInfo;
use tether_kernel::HeldConnection;
use tether_mesh::proxy_v2::ProxyHeader;
use tether_mesh::{Request, Status};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::enforce::Enforcement;
use crate::identity::node::NodeConn;
use crate::metrics::Metrics;
use crate::state::registry::AgentService;
use crate::state::tracker::{ProcSvid, Tracker};
use tether_attest::{KeyedSlot, KeyedSlots};

/// Default mesh port (every agent of a deployment must use the same).
pub const DEFAULT_PORT: u16 = 15443;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an outbound connection waits for its process's SVID (issued
/// right after the verdicts that let it connect).
const SVID_TIMEOUT: Duration = Duration::from_secs(10);
/// Tunnels accepted at once; beyond it new ones are refused, so a flood
/// cannot exhaust the agent's descriptors.
const MAX_INBOUND: usize = 4096;
/// Outbound tunnels at once (they leave the hold listener's budget once
/// decided, so long-lived tunnels cannot starve new connects).
const MAX_OUTBOUND: usize = 4096;
/// Audit records per second for handshakes that fail before the peer is
/// authenticated; beyond it they are counted, and the next record says
/// how many were left out (a scanner cannot flood the audit log).
const PREAUTH_AUDITS_PER_SEC: u64 = 20;
/// Handshakes in progress at once (unauthenticated peers): a separate,
/// smaller budget, so idle connections cannot take the tunnels' slots.
const MAX_HANDSHAKES: usize = 256;
/// Handshakes pending from one source address: one host's idle or slow
/// connections cannot take the slots every other node needs.
const MAX_HANDSHAKES_PER_SOURCE: usize = 16;
/// A connection that sends nothing (no ClientHello) this long is closed.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(2);
/// Copy buffer per direction: room for four TLS records per syscall
/// (allocated per tunnel and direction, so not larger).
const COPY_BUF: usize = 64 * 1024;
/// Read buffer under TLS: rustls reads at most 4 KiB per call, so without
/// it a 16 KiB record costs several syscalls.
const WIRE_BUF: usize = 64 * 1024;

/// The encrypted side of a tunnel.
type Wire = tokio::io::BufReader<TcpStream>;

/// One live tunnel, as `tether connections` shows it.
pub struct Conn {
    id: u64,
    direction: &'static str,
    /// The local process (outbound) that owns it.
    pid: Option<u32>,
    exe: String,
    local_id: String,
    peer_id: String,
    peer_addr: SocketAddr,
    destination: SocketAddr,
    service: String,
    tls_version: String,
    cipher: String,
    since: i64,
    /// Application bytes sent to the peer and received from it.
    sent: AtomicU64,
    received: AtomicU64,
    close: Notify,
    /// For an injected connection: the binding, its source and protocol.
    injected: Option<serde_json::Value>,
}

impl Conn {
    /// An injected connection (direction `injected`): no tunnel, no peer
    /// SPIFFE ID; closed like a tunnel when its process exits.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn injected(
        id: u64,
        pid: u32,
        exe: String,
        local_id: String,
        destination: SocketAddr,
        service: String,
        tls: Option<(String, String)>,
        injected: serde_json::Value,
    ) -> Conn {
        let (tls_version, cipher) = tls.unwrap_or_default();
        Conn {
            id,
            direction: "injected",
            pid: Some(pid),
            exe,
            local_id,
            peer_id: String::new(),
            peer_addr: destination,
            destination,
            service,
            tls_version,
            cipher,
            since: unix_now(),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            close: Notify::new(),
            injected: Some(injected),
        }
    }

    /// Resolves when the connection must close (its process exited, or the
    /// agent stops).
    pub(crate) async fn closed(&self) {
        self.close.notified().await
    }

    pub(crate) fn count(&self, sent: u64, received: u64) {
        self.sent.fetch_add(sent, Ordering::Relaxed);
        self.received.fetch_add(received, Ordering::Relaxed);
    }

    fn json(&self) -> serde_json::Value {
        let mut v = self.json_base();
        if let Some(i) = &self.injected {
            v["injected"] = i.clone();
        }
        v
    }

    fn json_base(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id, "direction": self.direction, "pid": self.pid, "exe": self.exe,
            "localSpiffeId": self.local_id, "peerSpiffeId": self.peer_id,
            "peerAddress": self.peer_addr.to_string(), "destination": self.destination.to_string(),
            "service": self.service, "tlsVersion": self.tls_version, "cipherSuite": self.cipher,
            "since": self.since, "bytesSent": self.sent.load(Ordering::Relaxed),
            "bytesReceived": self.received.load(Ordering::Relaxed),
        })
    }
}

/// Live tunnels, and the outbound ones by owning process.
#[derive(Default)]
struct Table {
    conns: HashMap<u64, Arc<Conn>>,
    by_pid: HashMap<u32, Vec<u64>>,
}

/// The connection table: every live tunnel, closed when its process exits
/// or the agent stops. Built before the process table, which tells it about
/// exits (it holds nothing of the process table, so no cycle).
#[derive(Default)]
pub struct Tunnels {
    table: Mutex<Table>,
}

impl Tunnels {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Live tunnels, oldest first.
    pub fn list(&self) -> Vec<serde_json::Value> {
        let mut v: Vec<Arc<Conn>> = lock(&self.table).conns.values().cloned().collect();
        v.sort_by_key(|c| c.id);
        v.iter().map(|c| c.json()).collect()
    }

    pub(crate) fn register(&self, c: Conn) -> Arc<Conn> {
        let c = Arc::new(c);
        let mut t = lock(&self.table);
        t.conns.insert(c.id, c.clone());
        if let Some(pid) = c.pid {
            t.by_pid.entry(pid).or_default().push(c.id);
        }
        c
    }

    pub(crate) fn unregister(&self, id: u64) {
        let mut t = lock(&self.table);
        let Some(c) = t.conns.remove(&id) else { return };
        if let Some(pid) = c.pid
            && let Some(ids) = t.by_pid.get_mut(&pid)
        {
            ids.retain(|i| *i != id);
            if ids.is_empty() {
                t.by_pid.remove(&pid);
            }
        }
    }
}

impl crate::state::tracker::ProcessObserver for Tunnels {
    /// The process exited: close its tunnels (their key is being
    /// destroyed). Called for every process exit on the host, so it looks
    /// the pid up rather than scanning the table.
    fn process_removed(&self, pid: i32) {
        let t = lock(&self.table);
        for id in t.by_pid.get(&(pid as u32)).into_iter().flatten() {
            if let Some(c) = t.conns.get(id) {
                c.close.notify_one();
            }
        }
    }

    /// Every tunnel ends: each holds its process's mesh key.
    fn shutdown(&self) {
        for c in lock(&self.table).conns.values() {
            c.close.notify_one();
        }
    }
}

pub struct Mesh {
    port: u16,
    node: Arc<NodeConn>,
    tracker: Arc<Tracker>,
    enf: Arc<Enforcement>,
    metrics: Arc<Metrics>,
    acceptor: tokio_rustls::TlsAcceptor,
    tunnels: Arc<Tunnels>,
    next_id: AtomicU64,
    outbound_slots: Arc<tokio::sync::Semaphore>,
    /// (second, records written in it, records left out since the last one).
    preauth_audits: Mutex<(u64, u64, u64)>,
    /// Pending handshakes, per source address and in all.
    pending: Arc<KeyedSlots<std::net::IpAddr>>,
}

/// Serves the node SVID (renewed under us) as the mesh server certificate.
struct NodeCert {
    node: Arc<NodeConn>,
    cache: Mutex<Option<(i64, Arc<rustls::sign::CertifiedKey>)>>,
}

impl std::fmt::Debug for NodeCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCert")
    }
}

impl rustls::server::ResolvesServerCert for NodeCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let id = self.node.identity();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, ck)) = cache.as_ref()
            && *at == id.issued_at
        {
            return Some(ck.clone());
        }
        match tether_tls::certified_key(&id.chain, id.key.pkcs8_der()) {
            Ok(ck) => {
                *cache = Some((id.issued_at, ck.clone()));
                Some(ck)
            }
            Err(e) => {
                tracing::error!(error = %e, "node SVID unusable as mesh certificate");
                None
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

use crate::clock::unix_now;

/// Closes with a reset: the application sees a failure, never a clean EOF
/// that could pass for an empty answer.
fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

/// A pending inbound handshake's slot: of its source's and of all.
type Pending = KeyedSlot<std::net::IpAddr>;

fn tls_facts(c: &rustls::CommonState) -> (String, String) {
    let version = match c.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(v) => format!("{v:?}"),
        None => String::new(),
    };
    let cipher = c
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_default();
    (version, cipher)
}

impl Mesh {
    pub fn new(
        port: u16,
        node: Arc<NodeConn>,
        tracker: Arc<Tracker>,
        enf: Arc<Enforcement>,
        metrics: Arc<Metrics>,
        tunnels: Arc<Tunnels>,
    ) -> anyhow::Result<Arc<Self>> {
        let td = node.td.clone();
        // Only mesh SVIDs: issued to another node's agent on that node's
        // authenticated channel, never handed to a process. An SVID a
        // workload got from the Workload API opens no tunnel.
        let clients = tether_tls::SpiffeClientVerifier::with_check(
            node.bundle.clone(),
            Arc::new(move |id| id.trust_domain() == &td),
            Arc::new(|id, leaf, _| match tether_spiffe::x509::mesh_node(leaf) {
                Some(_) => Ok(()),
                None => Err(format!(
                    "{id} is not a mesh SVID: only an agent's own tunnel certificate opens a tunnel"
                )),
            }),
        );
        let resolver = Arc::new(NodeCert {
            node: node.clone(),
            cache: Mutex::new(None),
        });
        let mut cfg = tether_tls::server_config(resolver, clients, &[tether_mesh::ALPN])?;
        // Tunnels are short and per process: no resumption state to keep,
        // and every tunnel proves its client's current SVID.
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
        Ok(Arc::new(Mesh {
            port,
            node,
            tracker,
            enf,
            metrics,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
            tunnels,
            next_id: AtomicU64::new(1),
            outbound_slots: Arc::new(tokio::sync::Semaphore::new(MAX_OUTBOUND)),
            preauth_audits: Mutex::new((0, 0, 0)),
            pending: KeyedSlots::new(MAX_HANDSHAKES_PER_SOURCE, MAX_HANDSHAKES),
        }))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Live tunnels, oldest first.
    fn register(&self, c: Conn) -> Arc<Conn> {
        self.tunnels.register(c)
    }

    fn unregister(&self, id: u64) {
        self.tunnels.unregister(id)
    }

    fn audit(&self, mut rec: serde_json::Value) {
        rec["event"] = serde_json::json!("tunnel");
        self.enf.publish(rec);
    }

    /// Audits a handshake that failed before the peer was authenticated,
    /// within the per-second budget.
    fn audit_preauth(&self, mut rec: serde_json::Value) {
        let now = u64::try_from(unix_now()).unwrap_or(0);
        let mut b = lock(&self.preauth_audits);
        if b.0 != now {
            b.0 = now;
            b.1 = 0;
        }
        if b.1 >= PREAUTH_AUDITS_PER_SEC {
            b.2 += 1;
            return;
        }
        b.1 += 1;
        if b.2 > 0 {
            rec["omittedBefore"] = serde_json::json!(b.2);
            b.2 = 0;
        }
        drop(b);
        self.audit(rec);
    }

    /// Binds the mesh port on every address: `[::]`, and `0.0.0.0` too
    /// when `[::]` is IPv6-only here (`net.ipv6.bindv6only=1`) or absent.
    pub async fn bind(port: u16) -> anyhow::Result<Vec<TcpListener>> {
        let any4 = SocketAddr::from(([0, 0, 0, 0], port));
        let any6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
        let err = |e: std::io::Error| anyhow::anyhow!("binding the mesh port {port}: {e}");
        let mut out = Vec::new();
        match TcpListener::bind(any6).await {
            Ok(l) => out.push(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => return Err(err(e)),
            Err(_) => {} // no IPv6 on this host
        }
        match TcpListener::bind(any4).await {
            Ok(l) => out.push(l),
            // The dual-stack [::] socket already takes IPv4.
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && !out.is_empty() => {}
            Err(e) => return Err(err(e)),
        }
        Ok(out)
    }

    pub fn serve(self: &Arc<Self>, listeners: Vec<TcpListener>) -> Vec<JoinHandle<()>> {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_INBOUND));
        listeners
            .into_iter()
            .map(|l| self.serve_one(l, slots.clone()))
            .collect()
    }

    fn serve_one(
        self: &Arc<Self>,
        listener: TcpListener,
        slots: Arc<tokio::sync::Semaphore>,
    ) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((s, peer)) => {
                        // The dual-stack listener shows IPv4 peers mapped.
                        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                        let (Ok(slot), Some(hs)) = (
                            slots.clone().try_acquire_owned(),
                            me.pending.take(peer.ip()),
                        ) else {
                            tracing::warn!(%peer, "too many mesh tunnels or handshakes (in all or from this address); refused");
                            me.metrics.mesh_connection("inbound", "overload");
                            me.audit_preauth(serde_json::json!({
                                "direction": "inbound", "peerAddress": peer.to_string(),
                                "verdict": "deny",
                                "reason": "too many pending handshakes, in all or from this address",
                            }));
                            reset(s);
                            continue;
                        };
                        let me = me.clone();
                        tokio::spawn(async move {
                            me.inbound(s, peer, hs).await;
                            drop(slot);
                        });
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "mesh accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        })
    }

    // ---- outbound -------------------------------------------------------

    /// The process's SVID to present for `service`: one whose identity the
    /// allowing policy names, waiting briefly if it is still being issued.
    async fn svid_for(
        &self,
        rec: &HeldConnection,
        start_ticks: u64,
        rule: &str,
    ) -> Result<Arc<ProcSvid>, String> {
        let wanted: Vec<String> = {
            let reg = self.tracker.registry.borrow().clone();
            reg.policies
                .iter()
                .find(|p| p.name == rule)
                .map(|p| p.spec.identities.clone())
                .unwrap_or_default()
        };
        let mut changes = self.tracker.changes.subscribe();
        let deadline = tokio::time::Instant::now() + SVID_TIMEOUT;
        loop {
            let svids = self
                .tracker
                .svids_of(rec.tgid as i32, start_ticks)
                .unwrap_or_default();
            // The identity the allowing policy names; any only if the rule
            // names none this process has (so audit and certificate agree).
            let pick = svids
                .iter()
                .find(|s| wanted.contains(&s.identity))
                .or_else(|| svids.first().filter(|_| wanted.is_empty()));
            if let Some(s) = pick {
                return Ok(s.clone());
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err("agent shutting down".into()),
                Err(_) => {
                    return Err(format!(
                        "process {} has no X.509-SVID to present after {SVID_TIMEOUT:?}",
                        rec.tgid
                    ));
                }
            }
        }
    }

    async fn client_config(&self, svid: &ProcSvid) -> Result<Arc<rustls::ClientConfig>, String> {
        let mesh = self
            .tracker
            .mesh_svid(svid)
            .await
            .map_err(|e| format!("no mesh SVID for {}: {e}", svid.spiffe_id))?;
        if let Some(c) = mesh.tls.get() {
            return Ok(c.clone());
        }
        let td = self.node.td.clone();
        let verifier = tether_tls::SpiffeServerVerifier::with_check(
            self.node.bundle.clone(),
            // The far end must be an agent of this trust domain...
            Arc::new(move |id| id.trust_domain() == &td && id.path().starts_with("/tether/node/")),
            // ...and the one whose node SVID vouches for the destination
            // address: no other node's agent, even of this trust domain,
            // can stand in for the one that fronts the Service.
            Arc::new(|id, leaf, ip| {
                let ip = ip.ok_or("no destination address to check the agent against")?;
                if tether_spiffe::x509::ip_sans(leaf)
                    .iter()
                    .any(|a| a.to_canonical() == ip.to_canonical())
                {
                    Ok(())
                } else {
                    Err(format!(
                        "the agent answering at {ip} is {id}, whose node SVID does not vouch for {ip}"
                    ))
                }
            }),
        );
        let ck = tether_tls::certified_key(&mesh.chain, mesh.key.pkcs8_der())
            .map_err(|e| format!("mesh SVID unusable for TLS: {e}"))?;
        let mut cfg = tether_tls::client_config(verifier, Some(ck), &[tether_mesh::ALPN])
            .map_err(|e| format!("TLS client configuration: {e}"))?;
        cfg.resumption = rustls::client::Resumption::disabled();
        // No SNI: the peer is addressed by IP, and nothing about the
        // destination may cross the wire in cleartext.
        cfg.enable_sni = false;
        let cfg = Arc::new(cfg);
        Ok(mesh.tls.get_or_init(|| cfg).clone())
    }

    /// Carries an allowed connection to a meshed Service through a tunnel.
    pub async fn outbound(
        self: &Arc<Self>,
        client: TcpStream,
        rec: &HeldConnection,
        start_ticks: u64,
        service: &AgentService,
        rule: &str,
        proc: Option<(ProcessInfo, Vec<String>)>,
    ) {
        let dst = rec.original_dst;
        let exe = proc
            .as_ref()
            .map(|(i, _)| i.exe_path.clone())
            .unwrap_or_default();
        let mut base = serde_json::json!({
            "direction": "outbound", "pid": rec.tgid, "exe": exe, "service": service.name,
            "destination": dst.to_string(), "rule": rule,
        });
        let Ok(_tunnel_slot) = self.outbound_slots.clone().try_acquire_owned() else {
            tracing::warn!(%dst, pid = rec.tgid, "too many outbound tunnels; reset");
            self.metrics.mesh_connection("outbound", "overload");
            return reset(client);
        };
        let fail = |base: &mut serde_json::Value, outcome: &str, reason: String| {
            tracing::info!(%dst, pid = rec.tgid, %reason, "mesh tunnel not opened");
            self.metrics.mesh_connection("outbound", outcome);
            base["verdict"] = serde_json::json!("deny");
            base["reason"] = serde_json::json!(reason);
            self.audit(base.clone());
        };
        let svid = match self.svid_for(rec, start_ticks, rule).await {
            Ok(s) => s,
            Err(e) => {
                return {
                    fail(&mut base, "no_svid", e);
                    reset(client)
                };
            }
        };
        base["spiffeId"] = serde_json::json!(svid.spiffe_id.to_string());
        let cfg = match self.client_config(&svid).await {
            Ok(c) => c,
            Err(e) => {
                return {
                    fail(&mut base, "error", e);
                    reset(client)
                };
            }
        };
        let peer_addr = SocketAddr::new(dst.ip(), self.port);
        base["peerAddress"] = serde_json::json!(peer_addr.to_string());
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(peer_addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return {
                    fail(
                        &mut base,
                        "peer_unreachable",
                        format!("no agent answers at {peer_addr}: {e}"),
                    );
                    reset(client)
                };
            }
            Err(_) => {
                return {
                    fail(
                        &mut base,
                        "peer_unreachable",
                        format!("no agent answered at {peer_addr} within {CONNECT_TIMEOUT:?}"),
                    );
                    reset(client)
                };
            }
        };
        let _ = tcp.set_nodelay(true);
        let connector = tokio_rustls::TlsConnector::from(cfg);
        let name = ServerName::IpAddress(dst.ip().into());
        let tcp = Wire::with_capacity(WIRE_BUF, tcp);
        let mut tls =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    return {
                        fail(
                            &mut base,
                            "handshake_failed",
                            format!("TLS with the agent at {peer_addr} failed: {e}"),
                        );
                        reset(client)
                    };
                }
                Err(_) => {
                    return {
                        fail(
                            &mut base,
                            "handshake_failed",
                            format!("TLS with the agent at {peer_addr} timed out"),
                        );
                        reset(client)
                    };
                }
            };
        let (version, cipher) = tls_facts(tls.get_ref().1);
        let peer_id = tether_tls::peer_id(tls.get_ref().1.peer_certificates())
            .map(|i| i.to_string())
            .unwrap_or_default();
        base["peerSpiffeId"] = serde_json::json!(peer_id);
        base["tls"] = serde_json::json!({ "version": version, "cipherSuite": cipher });
        // A Service that names its nodes is only reached through them: any
        // other agent, even of this trust domain, hears nothing, not even
        // the destination.
        let fronting = service
            .spec
            .mesh
            .as_ref()
            .map(|m| m.nodes.as_slice())
            .unwrap_or(&[]);
        let td = self.node.td.to_string();
        if !fronting.is_empty()
            && !fronting
                .iter()
                .any(|n| peer_id == format!("spiffe://{td}/tether/node/{n}"))
        {
            return {
                fail(
                    &mut base,
                    "wrong_peer",
                    format!(
                        "the agent at {peer_addr} is {peer_id}, not one of the nodes that front {} ({fronting:?})",
                        service.name
                    ),
                );
                reset(client)
            };
        }
        let req = Request { destination: dst }.encode();
        if let Err(e) = async {
            tls.write_all(&req).await?;
            tls.flush().await
        }
        .await
        {
            return {
                fail(
                    &mut base,
                    "peer_failed",
                    format!("sending the tunnel request: {e}"),
                );
                reset(client)
            };
        }
        let _ = client.set_nodelay(true);
        let conn = self.register(Conn {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            direction: "outbound",
            pid: Some(rec.tgid),
            exe,
            local_id: svid.spiffe_id.to_string(),
            peer_id,
            peer_addr,
            destination: dst,
            service: service.name.clone(),
            tls_version: version,
            cipher,
            since: unix_now(),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            close: Notify::new(),
            injected: None,
        });
        // The peer's answer is read as the first byte of the return stream,
        // so the application's first bytes go out without waiting for it.
        let me = self.clone();
        let audit_base = base.clone();
        let gate = StatusGate {
            inner: tls,
            status: None,
            on_status: Some(Box::new(move |s: Status| {
                let mut rec = audit_base;
                if s == Status::Ok {
                    rec["verdict"] = serde_json::json!("allow");
                    me.metrics.mesh_connection("outbound", "opened");
                } else {
                    rec["verdict"] = serde_json::json!("deny");
                    rec["reason"] =
                        serde_json::json!(format!("peer agent refused: {}", s.as_str()));
                    me.metrics.mesh_connection("outbound", "refused_by_peer");
                }
                me.audit(rec);
            })),
        };
        let mut app = Counted {
            inner: client,
            conn: conn.clone(),
        };
        let mut tunnel = gate;
        let result = tokio::select! {
            r = tokio::io::copy_bidirectional_with_sizes(&mut app, &mut tunnel, COPY_BUF, COPY_BUF) => r.map(|_| ()),
            _ = conn.close.notified() => Err(std::io::Error::other("the process exited")),
        };
        self.unregister(conn.id);
        if tunnel.status.is_none() {
            // Closed before the peer answered at all.
            let mut rec = base;
            rec["verdict"] = serde_json::json!("deny");
            rec["reason"] = serde_json::json!("the tunnel closed before the peer agent answered");
            self.audit(rec);
        }
        if let Err(e) = result {
            tracing::debug!(%dst, error = %e, "tunnel ended with an error");
            reset(app.inner);
            reset(tunnel.inner.into_inner().0.into_inner());
        }
    }

    // ---- inbound --------------------------------------------------------

    async fn inbound(self: &Arc<Self>, tcp: TcpStream, peer: SocketAddr, handshake_slot: Pending) {
        let _ = tcp.set_nodelay(true);
        let mut base =
            serde_json::json!({ "direction": "inbound", "peerAddress": peer.to_string() });
        let deny = |base: &mut serde_json::Value, outcome: &str, reason: String| {
            tracing::info!(%peer, %reason, "mesh tunnel refused");
            self.metrics.mesh_connection("inbound", outcome);
            base["verdict"] = serde_json::json!("deny");
            base["reason"] = serde_json::json!(reason);
            if outcome == "handshake_failed" {
                self.audit_preauth(base.clone());
            } else {
                self.audit(base.clone());
            }
        };
        // A peer that says nothing is gone after a short wait.
        if tokio::time::timeout(FIRST_BYTE_TIMEOUT, tcp.readable())
            .await
            .is_err()
        {
            return deny(
                &mut base,
                "handshake_failed",
                format!("nothing received within {FIRST_BYTE_TIMEOUT:?}"),
            );
        }
        let tcp = Wire::with_capacity(WIRE_BUF, tcp);
        let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp)).await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                return deny(
                    &mut base,
                    "handshake_failed",
                    format!("TLS handshake failed: {e}"),
                );
            }
            Err(_) => {
                return deny(
                    &mut base,
                    "handshake_failed",
                    "TLS handshake timed out".into(),
                );
            }
        };
        let (version, cipher) = tls_facts(tls.get_ref().1);
        let Some(peer_id) = tether_tls::peer_id(tls.get_ref().1.peer_certificates()) else {
            return deny(
                &mut base,
                "handshake_failed",
                "peer presented no SPIFFE ID".into(),
            );
        };
        let peer_id = peer_id.to_string();
        base["peerSpiffeId"] = serde_json::json!(peer_id);
        // The node whose agent holds this mesh SVID (the verifier refused
        // any other certificate).
        if let Some(node) = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|leaf| tether_spiffe::x509::mesh_node(leaf))
        {
            base["peerNode"] = serde_json::json!(node);
        }
        base["tls"] = serde_json::json!({ "version": version, "cipherSuite": cipher });

        let mut buf = Vec::with_capacity(tether_mesh::MAX_REQUEST);
        let parsed = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            let mut chunk = [0u8; tether_mesh::MAX_REQUEST];
            loop {
                match Request::parse(&buf) {
                    Ok(Some(r)) => return Ok(r),
                    Ok(None) => {}
                    Err(e) => return Err(e.to_string()),
                }
                // Never read past the longest request: what follows is the
                // application's and must reach the service intact.
                let want = tether_mesh::MAX_REQUEST - buf.len();
                match tls.read(&mut chunk[..want.max(1)]).await {
                    Ok(0) => return Err("tunnel closed before its request".to_string()),
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) => return Err(format!("reading the tunnel request: {e}")),
                }
            }
        })
        .await;
        let (req, used) = match parsed {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                refuse(&mut tls, Status::BadRequest).await;
                return deny(&mut base, "bad_request", e);
            }
            Err(_) => {
                return deny(
                    &mut base,
                    "bad_request",
                    "no tunnel request within the timeout".into(),
                );
            }
        };
        // Authenticated and asked: no longer a pending handshake.
        drop(handshake_slot);
        let leftover = buf.split_off(used);
        let dst = req.destination;
        base["destination"] = serde_json::json!(dst.to_string());
        let Some(service) = self.enf.meshed_service_at(dst) else {
            refuse(&mut tls, Status::NotFronted).await;
            return deny(
                &mut base,
                "not_fronted",
                format!("{dst} is not a meshed Service"),
            );
        };
        base["service"] = serde_json::json!(service.name);
        let me = self.node.identity().name.clone();
        let fronting = service
            .spec
            .mesh
            .as_ref()
            .map(|m| m.nodes.as_slice())
            .unwrap_or(&[]);
        if !fronting.is_empty() && !fronting.contains(&me) {
            refuse(&mut tls, Status::NotFronted).await;
            return deny(
                &mut base,
                "not_fronted",
                format!(
                    "{} is fronted by {fronting:?}, not this node ({me})",
                    service.name
                ),
            );
        }
        let rule = match self.enf.ingress(&service.name, &peer_id) {
            Ok(rule) => rule,
            Err(why) => {
                base["rule"] = serde_json::json!(crate::enforce::DEFAULT_DENY);
                refuse(&mut tls, Status::Denied).await;
                return deny(&mut base, "denied", why.to_string());
            }
        };
        base["rule"] = serde_json::json!(rule);
        let upstream = match connect_local(dst).await {
            Ok(s) => s,
            Err((status, why)) => {
                refuse(&mut tls, status).await;
                return deny(&mut base, "upstream_failed", why);
            }
        };
        let _ = upstream.set_nodelay(true);
        let mut up = Counted {
            inner: upstream,
            conn: self.register(Conn {
                id: self.next_id.fetch_add(1, Ordering::Relaxed),
                direction: "inbound",
                pid: None,
                exe: String::new(),
                local_id: self.node.identity().id.to_string(),
                peer_id: peer_id.clone(),
                peer_addr: peer,
                destination: dst,
                service: service.name.clone(),
                tls_version: version.clone(),
                cipher: cipher.clone(),
                since: unix_now(),
                sent: AtomicU64::new(0),
                received: AtomicU64::new(0),
                close: Notify::new(),
                injected: None,
            }),
        };
        let id = up.conn.id;
        let opened = async {
            if service.spec.mesh.as_ref().is_some_and(|m| m.proxy_protocol) {
                let h = ProxyHeader {
                    source: peer,
                    destination: dst,
                    spiffe_id: peer_id.clone(),
                    tls_version: version.clone(),
                    cipher: cipher.clone(),
                };
                up.inner.write_all(&h.encode()).await?;
            }
            if !leftover.is_empty() {
                up.write_all(&leftover).await?;
            }
            tls.write_all(&[Status::Ok.to_byte()]).await?;
            tls.flush().await
        }
        .await;
        if let Err(e) = opened {
            self.unregister(id);
            return deny(
                &mut base,
                "upstream_failed",
                format!("starting the tunnel: {e}"),
            );
        }
        self.metrics.mesh_connection("inbound", "opened");
        base["verdict"] = serde_json::json!("allow");
        self.audit(base);
        let r =
            tokio::io::copy_bidirectional_with_sizes(&mut tls, &mut up, COPY_BUF, COPY_BUF).await;
        self.unregister(id);
        if let Err(e) = r {
            tracing::debug!(%peer, error = %e, "tunnel ended with an error");
            reset(up.inner);
            reset(tls.into_inner().0.into_inner());
        }
    }
}

/// Answers a tunnel request with a refusal and closes the tunnel.
async fn refuse(tls: &mut tokio_rustls::server::TlsStream<Wire>, s: Status) {
    let _ = tls.write_all(&[s.to_byte()]).await;
    let _ = tls.shutdown().await;
}

/// Connects to a Service on this host, from one of this host's addresses:
/// binding the destination's own address first makes sure a tunnel can
/// only reach this host, never relay elsewhere.
async fn connect_local(dst: SocketAddr) -> Result<TcpStream, (Status, String)> {
    let ip = dst.ip();
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
        return Err((
            Status::NotFronted,
            format!("{ip} is not an address a tunnel may name"),
        ));
    }
    let sock = match dst.ip() {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| (Status::Unreachable, format!("socket: {e}")))?;
    // Bound to the destination's own address: that fails unless it is
    // this host's (ip_nonlocal_bind aside), so a tunnel cannot relay.
    if let Err(e) = sock.bind(SocketAddr::new(dst.ip(), 0)) {
        return Err((
            Status::NotFronted,
            format!("{} is not an address of this host ({e})", dst.ip()),
        ));
    }
    match tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(dst)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err((Status::Unreachable, format!("connecting to {dst}: {e}"))),
        Err(_) => Err((Status::Unreachable, format!("{dst} did not answer"))),
    }
}

/// Counts application bytes on the plaintext side of a tunnel: what is
/// read from it goes to the peer, what is written to it came from the peer.
struct Counted {
    inner: TcpStream,
    conn: Arc<Conn>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.conn.sent.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.conn.received.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

type OnStatus = Box<dyn FnOnce(Status) + Send>;

/// The client side of a tunnel: its first byte back is the peer agent's
/// [`Status`], consumed here; anything but Ok ends the stream with an
/// error, so the application gets a reset, not an empty answer.
struct StatusGate {
    inner: tokio_rustls::client::TlsStream<Wire>,
    status: Option<Status>,
    on_status: Option<OnStatus>,
}

impl AsyncRead for StatusGate {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.status.is_none() {
            let mut b = [0u8; 1];
            let mut rb = ReadBuf::new(&mut b);
            match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "peer agent closed the tunnel without answering",
                    )));
                }
                Poll::Ready(Ok(())) => {
                    let s = Status::from_byte(b[0]);
                    self.status = Some(s);
                    if let Some(f) = self.on_status.take() {
                        f(s);
                    }
                }
            }
        }
        match self.status {
            Some(Status::Ok) => Pin::new(&mut self.inner).poll_read(cx, buf),
            Some(s) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                s.as_str(),
            ))),
            None => Poll::Pending,
        }
    }
}

impl AsyncWrite for StatusGate {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
