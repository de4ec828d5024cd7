//! The agent's admin API (root-only Unix socket): `tether whoami` and
//! `tether svids`.

use std::path::Path;
use std::sync::Arc;

use tether_proto::tether::agent_admin_server::{AgentAdmin, AgentAdminServer};
use tether_proto::tether::{
    ConnectionsRequest, CredentialsRequest, EventsRequest, JsonResponse, ListSvidsRequest,
    PolicyCheckRequest, WhoAmIRequest,
};
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

use crate::state::tracker::Tracker;

/// A read-only view: it is handed each part it reports on.
pub struct AdminApi {
    pub tracker: Arc<Tracker>,
    pub enforcement: Option<Arc<crate::enforce::Enforcement>>,
    pub mesh: Option<Arc<crate::proxy::mesh::Mesh>>,
    /// Live tunnels and injected connections.
    pub tunnels: Arc<crate::proxy::mesh::Tunnels>,
    pub node: String,
    /// Every audit record of this agent (connections and credentials).
    pub audit: Arc<crate::audit::AuditLog>,
    pub held: Arc<crate::deliver::fetch::Held>,
}

#[tonic::async_trait]
impl AgentAdmin for AdminApi {
    async fn who_am_i(
        &self,
        req: Request<WhoAmIRequest>,
    ) -> Result<Response<JsonResponse>, Status> {
        let pid = req.into_inner().pid;
        if pid <= 0 {
            return Err(Status::invalid_argument(format!(
                "pid {pid} is not a process id"
            )));
        }
        let info = self
            .tracker
            .attest_pid(pid)
            .await
            .map_err(Status::not_found)?;
        let reg = self.tracker.registry.borrow().clone();
        let mut matched = Vec::new();
        let mut unmatched = Vec::new();
        for ident in &reg.identities {
            // For each selector set, which selectors failed: the reason an
            // identity does not apply.
            let sets: Vec<serde_json::Value> = ident
                .sets
                .iter()
                .zip(&ident.raw_sets)
                .map(|(set, raw)| {
                    let failed: Vec<String> = set
                        .iter()
                        .filter(|s| !s.matches(&info))
                        .map(|s| s.to_string())
                        .collect();
                    serde_json::json!({ "selectors": raw, "failed": failed })
                })
                .collect();
            let mut entry = serde_json::json!({ "identity": ident.name, "spiffeId": ident.spiffe_id.to_string(), "selectorSets": sets });
            // The exec checks come before any selector: name them when
            // they are why.
            if let Some(why) = crate::state::verify::refusal(&info.exec, &ident.allow_exec) {
                entry["execChecks"] = serde_json::json!(why);
            }
            if ident.matches(&info) {
                matched.push(entry);
            } else {
                unmatched.push(entry);
            }
        }
        let held: Vec<serde_json::Value> = self
            .tracker
            .svids_of(pid, info.start_time)
            .unwrap_or_default()
            .iter()
            .map(|s| serde_json::json!({ "spiffeId": s.spiffe_id.to_string(), "identity": s.identity, "expiresAt": s.expires_at }))
            .collect();
        let verdict = if matched.is_empty() {
            "no identity matches this process".to_string()
        } else {
            format!(
                "matches {} identit{}",
                matched.len(),
                if matched.len() == 1 { "y" } else { "ies" }
            )
        };
        let out = serde_json::json!({
            "node": self.node,
            "pid": pid,
            "process": info,
            "selectors": info.selectors(),
            "verdict": verdict,
            "matched": matched,
            "notMatched": unmatched,
            "svids": held,
        });
        Ok(Response::new(JsonResponse {
            json: serde_json::to_string_pretty(&out).unwrap_or_default(),
        }))
    }

    async fn credentials(
        &self,
        _req: Request<CredentialsRequest>,
    ) -> Result<Response<JsonResponse>, Status> {
        let mut out = self.held.listing(&self.tracker);
        out["node"] = serde_json::json!(self.node);
        Ok(Response::new(JsonResponse {
            json: serde_json::to_string_pretty(&out).unwrap_or_default(),
        }))
    }

    async fn connections(
        &self,
        _req: Request<ConnectionsRequest>,
    ) -> Result<Response<JsonResponse>, Status> {
        if self.enforcement.is_none() {
            return Err(Status::failed_precondition(
                "this agent does not enforce (--enforce-cgroup): it carries no connections",
            ));
        }
        let out = serde_json::json!({
            "node": self.node, "meshPort": self.mesh.as_ref().map(|m| m.port()),
            "connections": self.tunnels.list(),
        });
        Ok(Response::new(JsonResponse {
            json: serde_json::to_string_pretty(&out).unwrap_or_default(),
        }))
    }

    async fn policy_check(
        &self,
        req: Request<PolicyCheckRequest>,
    ) -> Result<Response<JsonResponse>, Status> {
        let r = req.into_inner();
        let e = self.enforcement.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "kernel enforcement is not enabled on this agent (--enforce-cgroup)",
            )
        })?;
        let dst = resolve(&r.destination)?;
        let proto = match r.protocol.as_str() {
            "" | "tcp" => tether_kernel::Proto::Tcp,
            "udp" => tether_kernel::Proto::Udp,
            other => {
                return Err(Status::invalid_argument(format!(
                    "protocol {other:?}: use tcp or udp"
                )));
            }
        };
        let reg = self.tracker.registry.borrow().clone();
        let out = if r.pid > 0 {
            let info = self
                .tracker
                .attest_pid(r.pid)
                .await
                .map_err(Status::not_found)?;
            let m = reg.matching(&info);
            let names: Vec<String> = m.iter().map(|i| i.name.clone()).collect();
            let ids: Vec<String> = m.iter().map(|i| i.spiffe_id.to_string()).collect();
            let mut v = e.check(Some(&info), &names, &ids, dst, proto);
            v["pid"] = serde_json::json!(r.pid);
            v["exe"] = serde_json::json!(info.exe_path);
            // What the kernel will do with this process's next connect:
            // decide from its entry, or hold it (not attested yet).
            v["kernel"] = e.kernel_state(r.pid as u32);
            v
        } else if !r.identity.is_empty() {
            let ident = reg
                .identities
                .iter()
                .find(|i| i.name == r.identity)
                .ok_or_else(|| {
                    Status::not_found(format!(
                        "WorkloadIdentity {:?} not known to this agent",
                        r.identity
                    ))
                })?;
            e.check(
                None,
                std::slice::from_ref(&ident.name),
                &[ident.spiffe_id.to_string()],
                dst,
                proto,
            )
        } else {
            return Err(Status::invalid_argument("give a pid or an identity"));
        };
        let mut out = out;
        out["destination"] = serde_json::json!(dst.to_string());
        Ok(Response::new(JsonResponse {
            json: serde_json::to_string_pretty(&out).unwrap_or_default(),
        }))
    }

    type EventsStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<JsonResponse, Status>> + Send + 'static>,
    >;

    async fn events(
        &self,
        req: Request<EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let follow = req.into_inner().follow;
        // Subscribe before reading the backlog so nothing falls in between.
        let mut live = self.audit.subscribe();
        let backlog = self.audit.recent();
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            for json in backlog {
                if tx.send(Ok(JsonResponse { json })).await.is_err() {
                    return;
                }
            }
            if !follow {
                return;
            }
            loop {
                match live.recv().await {
                    Ok(json) => {
                        if tx.send(Ok(JsonResponse { json })).await.is_err() {
                            return;
                        }
                    }
                    // A slow reader misses events rather than slowing the
                    // agent; it is told how many.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let json = serde_json::json!({ "lagged": n }).to_string();
                        if tx.send(Ok(JsonResponse { json })).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_svids(
        &self,
        _req: Request<ListSvidsRequest>,
    ) -> Result<Response<JsonResponse>, Status> {
        let rows: Vec<serde_json::Value> = self
            .tracker
            .snapshot()
            .into_iter()
            .flat_map(|(info, svids)| {
                svids.into_iter().map(move |s| {
                    serde_json::json!({
                        "pid": info.pid, "exe": info.exe_path, "uid": info.uid,
                        "spiffeId": s.spiffe_id.to_string(), "identity": s.identity,
                        "issuedAt": s.issued_at, "expiresAt": s.expires_at,
                    })
                })
            })
            .collect();
        Ok(Response::new(JsonResponse {
            json: serde_json::to_string_pretty(&rows).unwrap_or_default(),
        }))
    }
}

pub fn serve(api: AdminApi, path: &Path) -> anyhow::Result<JoinHandle<()>> {
    let listener = tether_proto::uds::bind(path, 0o600)
        .map_err(|e| anyhow::anyhow!("binding agent admin socket {}: {e}", path.display()))?;
    let me = tether_proto::uds::euid();
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let svc = AgentAdminServer::new(api);
    Ok(tokio::spawn(async move {
        use tokio_stream::StreamExt as _;
        // Socket permissions are the first gate, peer credentials the second.
        let incoming = incoming.filter(move |c| match c {
            Ok(s) => s
                .peer_cred()
                .map(|c| c.uid() == 0 || c.uid() == me)
                .unwrap_or(false),
            Err(_) => true,
        });
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await
        {
            tracing::error!(error = %e, "agent admin API stopped");
        }
    }))
}

fn resolve(dst: &str) -> Result<std::net::SocketAddr, Status> {
    use std::net::ToSocketAddrs as _;
    dst.to_socket_addrs()
        .map_err(|e| Status::invalid_argument(format!("destination {dst:?}: {e} (use host:port)")))?
        .next()
        .ok_or_else(|| Status::invalid_argument(format!("destination {dst:?} resolves to nothing")))
}
