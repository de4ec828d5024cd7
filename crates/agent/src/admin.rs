//! The agent's admin API (root-only Unix socket): `tether whoami` and
//! `tether svids`.

use std::path::Path;
use std::sync::Arc;

use tether_proto::tether::agent_admin_server::{AgentAdmin, AgentAdminServer};
use tether_proto::tether::{JsonResponse, ListSvidsRequest, WhoAmIRequest};
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

use crate::tracker::Tracker;

pub struct AdminApi {
    tracker: Arc<Tracker>,
    node: String,
}

#[tonic::async_trait]
impl AgentAdmin for AdminApi {
    async fn who_am_i(&self, req: Request<WhoAmIRequest>) -> Result<Response<JsonResponse>, Status> {
        let pid = req.into_inner().pid;
        if pid <= 0 {
            return Err(Status::invalid_argument(format!("pid {pid} is not a process id")));
        }
        let fd = tether_attest::PidFd::open(pid).map_err(|e| Status::not_found(format!("pid {pid}: {e}")))?;
        let t = self.tracker.clone();
        let info = tokio::task::spawn_blocking(move || t.attestor.attest(&fd))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::not_found(e.to_string()))?;
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
                    let failed: Vec<String> = set.iter().filter(|s| !s.matches(&info)).map(|s| s.to_string()).collect();
                    serde_json::json!({ "selectors": raw, "failed": failed })
                })
                .collect();
            let entry = serde_json::json!({ "identity": ident.name, "spiffeId": ident.spiffe_id.to_string(), "selectorSets": sets });
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
            format!("matches {} identit{}", matched.len(), if matched.len() == 1 { "y" } else { "ies" })
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
        Ok(Response::new(JsonResponse { json: serde_json::to_string_pretty(&out).unwrap_or_default() }))
    }

    async fn list_svids(&self, _req: Request<ListSvidsRequest>) -> Result<Response<JsonResponse>, Status> {
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
        Ok(Response::new(JsonResponse { json: serde_json::to_string_pretty(&rows).unwrap_or_default() }))
    }
}

pub fn serve(tracker: Arc<Tracker>, node: String, path: &Path) -> anyhow::Result<JoinHandle<()>> {
    let listener = tether_proto::uds::bind(path, 0o600)
        .map_err(|e| anyhow::anyhow!("binding agent admin socket {}: {e}", path.display()))?;
    let me = tether_proto::uds::euid();
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let svc = AgentAdminServer::new(AdminApi { tracker, node });
    Ok(tokio::spawn(async move {
        use tokio_stream::StreamExt as _;
        // Socket permissions are the first gate, peer credentials the second.
        let incoming = incoming.filter(move |c| match c {
            Ok(s) => s.peer_cred().map(|c| c.uid() == 0 || c.uid() == me).unwrap_or(false),
            Err(_) => true,
        });
        if let Err(e) = tonic::transport::Server::builder().add_service(svc).serve_with_incoming(incoming).await {
            tracing::error!(error = %e, "agent admin API stopped");
        }
    }))
}
