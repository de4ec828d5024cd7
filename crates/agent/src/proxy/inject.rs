//! The injector: connections the kernel sent to the agent because the
//! process's verdict for the Service carries the inject flag (a
//! CredentialBinding of one of its identities names that Service). The
//! agent connects to the original destination itself and adds the
//! credential on the way out, so the process never holds it:
//! - `http`: every request's configured header is replaced (`http.rs`);
//! - `redis`: the upstream connection is authenticated before any client
//!   byte is relayed (`redis.rs`).
//!
//! The credential is the binding's value for this exact process instance
//! (`deliver::fetch`, shared with the credential filesystem). Each
//! connection is audited when it starts and when it is refused or revoked;
//! it lives in the connection table (`tether connections`, closed when the
//! process exits) and ends within a verdict change when the process loses
//! the inject verdict (policy or binding removed, process exec'd or gone).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;
use tether_kernel::HeldConnection;
use tether_manifest::{FileFormat, InjectProtocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::hold::HoldPorts;
use super::http::{Inject, Refusal, Rewriter};
use super::mesh::{Conn, Tunnels};
use super::redis;
use crate::audit::AuditLog;
use crate::deliver::fetch::Fetcher;
use crate::enforce::HeldDecision;
use crate::identity::ProcSvid;
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

pub struct Injector {
    tracker: Arc<Tracker>,
    fetcher: Arc<Fetcher>,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    tunnels: Arc<Tunnels>,
    next_id: AtomicU64,
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
    Refused(Refusal),
    /// The process lost the inject verdict, or exited.
    Revoked(String),
    Io(std::io::Error),
}

impl Injector {
    pub fn new(
        tracker: Arc<Tracker>,
        fetcher: Arc<Fetcher>,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
        tunnels: Arc<Tunnels>,
    ) -> Arc<Self> {
        Arc::new(Injector {
            tracker,
            fetcher,
            audit,
            metrics,
            tunnels,
            next_id: AtomicU64::new(1),
        })
    }

    /// Carries one connection the hold path allowed with injection.
    pub async fn serve(
        &self,
        mut client: TcpStream,
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
        let mut upstream = match tokio::time::timeout(
            UPSTREAM_TIMEOUT,
            TcpStream::connect(rec.original_dst),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return self.refuse(
                    client,
                    &facts,
                    "upstream-failed",
                    &format!("connecting to {}: {e}", rec.original_dst),
                );
            }
            Err(_) => {
                return self.refuse(
                    client,
                    &facts,
                    "upstream-failed",
                    &format!(
                        "{} did not answer in {UPSTREAM_TIMEOUT:?}",
                        rec.original_dst
                    ),
                );
            }
        };
        let _ = upstream.set_nodelay(true);
        // Protocol start: what must happen before the client's first byte.
        let http = match &protocol {
            InjectProtocol::Redis { user } => {
                if let Err(why) = redis_auth(&mut upstream, user.as_deref(), &value.bytes).await {
                    return self.refuse(client, &facts, "upstream-refused", &why);
                }
                None
            }
            InjectProtocol::Http { header, scheme } => {
                match Inject::new(header, *scheme, &value.bytes) {
                    Ok(i) => Some(Rewriter::new(i)),
                    Err(e) => return self.refuse(client, &facts, "deny", &e.to_string()),
                }
            }
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
            None,
            json!({ "binding": binding.name, "source": binding.source, "protocol": protocol.name() }),
        ));
        let mut started = facts.record("allow");
        started["upstream"] = json!("connected");
        self.audit.publish(started);
        self.metrics.injected_connection(protocol.name(), "allowed");

        let relay = async {
            match http {
                Some(rw) => relay_http(&mut client, &mut upstream, rw, &conn).await,
                None => relay_raw(&mut client, &mut upstream, &conn).await,
            }
        };
        let end = tokio::select! {
            r = relay => r,
            why = revoked(&*ports, &rec, start_ticks) => Err(End::Revoked(why)),
            _ = conn.closed() => Err(End::Revoked("the process exited".into())),
        };
        self.tunnels.unregister(id);
        match end {
            Ok(requests) => {
                tracing::debug!(pid = rec.tgid, requests, "injected connection ended");
            }
            Err(End::Io(e)) => {
                tracing::debug!(pid = rec.tgid, error = %e, "injected connection ended with an error");
                reset(client);
                reset(upstream);
            }
            Err(End::Refused(r)) => {
                let mut a = facts.record("refused-request");
                a["reason"] = json!(r.to_string());
                self.audit.publish(a);
                self.metrics
                    .injected_connection(protocol.name(), "refused_request");
                reset(client);
                reset(upstream);
            }
            Err(End::Revoked(why)) => {
                let mut a = facts.record("revoked");
                a["reason"] = json!(why);
                self.audit.publish(a);
                self.metrics.injected_connection(protocol.name(), "revoked");
                reset(client);
                reset(upstream);
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
            if let Some(c) = self
                .tracker
                .current(pid)
                .filter(|c| c.start_time == start_ticks)
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

    fn refuse(&self, client: TcpStream, facts: &Facts, verdict: &str, why: &str) {
        let mut a = facts.record(verdict);
        a["reason"] = json!(why);
        self.audit.publish(a);
        let proto = facts
            .binding
            .as_ref()
            .and_then(|b| b.inject.as_ref())
            .map_or("unknown", |i| i.protocol.name());
        self.metrics.injected_connection(proto, verdict);
        reset(client);
    }
}

/// Resolves (with why) once the process no longer has the inject verdict
/// for the connection's Service: policy or binding removed, or the process
/// exec'd, was marked or exited (its verdicts go with it).
async fn revoked(ports: &dyn HoldPorts, rec: &HeldConnection, start_ticks: u64) -> String {
    let mut changes = ports.verdict_changes();
    loop {
        match ports.verdict(rec, start_ticks) {
            Some(d) if d.allow && d.inject => {}
            Some(d) if d.allow => return "the binding no longer injects into this Service".into(),
            Some(_) => return "the process may no longer reach this Service".into(),
            None => return "the process is gone, or no longer the one that connected".into(),
        }
        if changes.changed().await.is_err() {
            return "agent shutting down".into();
        }
    }
}

/// AUTH on the upstream connection; the server's answer is consumed here,
/// so the client never sees it.
async fn redis_auth(up: &mut TcpStream, user: Option<&str>, password: &[u8]) -> Result<(), String> {
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
async fn relay_http(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    mut rw: Rewriter,
    conn: &Conn,
) -> Result<u64, End> {
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
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
                return Ok(rw.requests);
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
async fn relay_raw(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
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
