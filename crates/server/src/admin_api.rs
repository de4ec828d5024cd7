//! The admin API: `tether apply/get/delete`, join tokens and CA rotation.

use std::sync::Arc;

use tether_manifest::Resource;
use tether_proto::tether::admin_server::Admin;
use tether_proto::tether::{
    ApplyRequest, ApplyResponse, CreateJoinTokenRequest, CreateJoinTokenResponse, DeleteRequest,
    DeleteResponse, GetRequest, GetResponse, RotateCaRequest, RotateCaResponse,
};
use tether_store::{Change, ChangeOutcome};
use tonic::{Request, Response, Status};

use crate::{ServerError, State};

pub struct AdminApi {
    pub state: Arc<State>,
}

/// Accepts the usual spellings of a kind ("WorkloadIdentity",
/// "workloadidentities", "wi").
fn canonical_kind(kind: &str) -> Option<&'static str> {
    match kind.to_ascii_lowercase().as_str() {
        "workloadidentity" | "workloadidentities" | "wi" | "identity" | "identities" => {
            Some("WorkloadIdentity")
        }
        "service" | "services" | "svc" => Some("Service"),
        "accesspolicy" | "accesspolicies" | "policy" | "policies" | "ap" => Some("AccessPolicy"),
        "credentialsource" | "credentialsources" | "cs" => Some("CredentialSource"),
        "credentialbinding" | "credentialbindings" | "cb" => Some("CredentialBinding"),
        "node" | "nodes" => Some("Node"),
        "bundle" => Some("Bundle"),
        _ => None,
    }
}

const KNOWN: &str = "WorkloadIdentity (wi), Service (svc), AccessPolicy (ap), CredentialSource (cs), CredentialBinding (cb), Node, Bundle";

impl AdminApi {
    /// A binding must name an identity and a source that exist, in this
    /// apply or already stored.
    fn check_bindings(&self, source: &str, resources: &[Resource]) -> Result<(), Status> {
        let exists = |kind: &str, name: &str| -> Result<bool, Status> {
            if resources
                .iter()
                .any(|r| r.kind() == kind && r.name() == name)
            {
                return Ok(true);
            }
            Ok(self
                .state
                .store
                .get(kind, name)
                .map_err(ServerError::from)?
                .is_some())
        };
        for (i, res) in resources.iter().enumerate() {
            let Resource::CredentialBinding { name, spec } = res else {
                continue;
            };
            let service = spec.inject.as_ref().map(|i| i.service.clone());
            for (field, kind, target) in [
                ("spec.identity", "WorkloadIdentity", Some(&spec.identity)),
                ("spec.source", "CredentialSource", Some(&spec.source)),
                ("spec.inject.service", "Service", service.as_ref()),
            ]
            .into_iter()
            .filter_map(|(f, k, t)| Some((f, k, t?)))
            {
                if !exists(kind, target)? {
                    return Err(Status::invalid_argument(format!(
                        "{source}: resource {} (CredentialBinding {name:?}): {field}: {kind} {target:?} does not exist",
                        i + 1
                    )));
                }
            }
        }
        Ok(())
    }

    /// Static secrets are stored sealed (see `secrets`); applying the same
    /// secret again keeps the stored value, so it reads as unchanged.
    fn seal_secrets(&self, resources: Vec<Resource>) -> Result<Vec<Resource>, Status> {
        use tether_manifest::CredentialSourceSpec;
        resources
            .into_iter()
            .map(|r| match r {
                Resource::CredentialSource {
                    name,
                    spec: CredentialSourceSpec::Static { value },
                } => {
                    let stored = self
                        .state
                        .store
                        .get("CredentialSource", &name)
                        .map_err(ServerError::from)?
                        .and_then(|row| Resource::from_stored(&row.kind, &row.name, &row.spec));
                    let stored = match &stored {
                        Some(Resource::CredentialSource {
                            spec: CredentialSourceSpec::Static { value },
                            ..
                        }) => Some(value.as_str()),
                        _ => None,
                    };
                    let sealed = self
                        .state
                        .sealer
                        .seal(&value, stored)
                        .map_err(|e| Status::internal(e.to_string()))?;
                    Ok(Resource::CredentialSource {
                        name,
                        spec: CredentialSourceSpec::Static { value: sealed },
                    })
                }
                other => Ok(other),
            })
            .collect()
    }
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn apply(&self, req: Request<ApplyRequest>) -> Result<Response<ApplyResponse>, Status> {
        let r = req.into_inner();
        let source = if r.source.is_empty() {
            "<stdin>".to_string()
        } else {
            r.source
        };
        let resources = tether_manifest::parse(&source, &r.manifest)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Identities outside this server's trust domain could never be issued.
        for (i, res) in resources.iter().enumerate() {
            let Resource::WorkloadIdentity { name, spec } = res else {
                continue;
            };
            let id = spec
                .spiffe_id()
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            if id.trust_domain() != &self.state.td {
                return Err(Status::invalid_argument(format!(
                    "{source}: resource {} (WorkloadIdentity {name:?}): spec.spiffeId: {id} is not in this server's trust domain {}",
                    i + 1,
                    self.state.td
                )));
            }
        }
        self.check_bindings(&source, &resources)?;
        let resources = self.seal_secrets(resources)?;
        let changes: Vec<Change> = resources
            .iter()
            .map(|r| Change::Upsert {
                kind: r.kind().to_string(),
                name: r.name().to_string(),
                spec: r.spec_json(),
            })
            .collect();
        let outcomes = self
            .state
            .store
            .apply(&changes, self.state.now())
            .map_err(ServerError::from)?;
        let mut lines = Vec::new();
        for (r, o) in resources.iter().zip(&outcomes) {
            let word = match o {
                ChangeOutcome::Created => "created",
                ChangeOutcome::Configured => "configured",
                _ => "unchanged",
            };
            lines.push(format!("{}/{} {word}", r.kind(), r.name()));
        }
        if outcomes
            .iter()
            .any(|o| matches!(o, ChangeOutcome::Created | ChangeOutcome::Configured))
        {
            self.state.notify();
        }
        tracing::info!(%source, changes = ?lines, "apply");
        Ok(Response::new(ApplyResponse { changes: lines }))
    }

    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let r = req.into_inner();
        let kind = canonical_kind(&r.kind).ok_or_else(|| {
            Status::invalid_argument(format!("unknown kind {:?}; known: {KNOWN}", r.kind))
        })?;
        let st = &self.state;
        let text = match kind {
            "Bundle" => st
                .current_bundle()
                .to_json()
                .map_err(|e| Status::internal(e.to_string()))?,
            "Node" => {
                let nodes: Vec<_> = st
                    .store
                    .nodes()
                    .map_err(ServerError::from)?
                    .into_iter()
                    .filter(|n| r.name.is_empty() || n.name == r.name)
                    .map(|n| {
                        serde_json::json!({
                            "name": n.name, "spiffeId": n.spiffe_id, "attestedAt": n.attested_at,
                            "svidSerial": n.svid_serial, "svidExpiresAt": n.svid_expires_at, "lastSeen": n.last_seen,
                            "server": n.server,
                            "lastOffline": (n.offline.0 > 0).then(|| serde_json::json!({
                                "from": n.offline.0, "until": n.offline.1,
                                "seconds": n.offline.1 - n.offline.0,
                            })),
                        })
                    })
                    .collect();
                if !r.name.is_empty() && nodes.is_empty() {
                    return Err(Status::not_found(format!("Node {:?} not found", r.name)));
                }
                serde_json::to_string_pretty(&nodes).unwrap_or_default()
            }
            _ => {
                let rows = if r.name.is_empty() {
                    st.store.list(kind).map_err(ServerError::from)?
                } else {
                    st.store
                        .get(kind, &r.name)
                        .map_err(ServerError::from)?
                        .map(|x| vec![x])
                        .ok_or_else(|| {
                            Status::not_found(format!("{kind} {:?} not found", r.name))
                        })?
                };
                rows.iter()
                    .filter_map(|row| Resource::from_stored(&row.kind, &row.name, &row.spec))
                    .map(|res| res.to_yaml())
                    .collect::<Vec<_>>()
                    .join("---\n")
            }
        };
        Ok(Response::new(GetResponse { text }))
    }

    async fn delete(
        &self,
        req: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let r = req.into_inner();
        let kind = canonical_kind(&r.kind).ok_or_else(|| {
            Status::invalid_argument(format!("unknown kind {:?}; known: {KNOWN}", r.kind))
        })?;
        if r.name.is_empty() {
            return Err(Status::invalid_argument("name: required"));
        }
        let existed = match kind {
            "Node" => self
                .state
                .store
                .delete_node(&r.name, self.state.now())
                .map_err(ServerError::from)?,
            "Bundle" => return Err(Status::invalid_argument("the bundle cannot be deleted")),
            _ => {
                let o = self
                    .state
                    .store
                    .apply(
                        &[Change::Delete {
                            kind: kind.to_string(),
                            name: r.name.clone(),
                        }],
                        self.state.now(),
                    )
                    .map_err(ServerError::from)?;
                o.first() == Some(&ChangeOutcome::Deleted)
            }
        };
        if existed {
            self.state.notify();
        }
        Ok(Response::new(DeleteResponse { existed }))
    }

    async fn create_join_token(
        &self,
        req: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<CreateJoinTokenResponse>, Status> {
        let r = req.into_inner();
        let ttl = if r.ttl_secs == 0 { 600 } else { r.ttl_secs };
        let node = (!r.node_name.is_empty()).then_some(r.node_name.as_str());
        let (token, expires_at) = self.state.create_join_token(ttl, node)?;
        Ok(Response::new(CreateJoinTokenResponse { token, expires_at }))
    }

    async fn rotate_ca(
        &self,
        req: Request<RotateCaRequest>,
    ) -> Result<Response<RotateCaResponse>, Status> {
        let step = req.into_inner().step;
        if step != "prepare" && step != "activate" {
            return Err(Status::invalid_argument(format!(
                "step {step:?}: use \"prepare\" or \"activate\""
            )));
        }
        self.state.reconcile_keys(Some(&step))?;
        let b = self.state.current_bundle();
        Ok(Response::new(RotateCaResponse {
            text: format!(
                "{step} done: bundle sequence {}, {} X.509 authorities, {} JWT authorities",
                b.sequence,
                b.x509_authorities.len(),
                b.jwt_authorities.len()
            ),
        }))
    }
}
