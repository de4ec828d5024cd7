//! The node API: what agents call, authenticated by their node SVIDs.

use std::pin::Pin;
use std::sync::Arc;

use tether_manifest::{CredentialSourceSpec, Resource, WorkloadIdentitySpec};
use tether_proto::tether::node_server::Node;
use tether_proto::tether::{
    AttestRequest, FetchSecretRequest, FetchSecretResponse, Identity, MintJwtSvidRequest,
    MintJwtSvidResponse, NodeState, NodeSvid, RenewNodeRequest, SelectorSet, SignX509SvidsRequest,
    SignX509SvidsResponse, SignedSvid, StoredResource, WatchRequest,
};
use tether_spiffe::SpiffeId;
use tether_store::NodeRow;
use tonic::{Request, Response, Status};

use crate::listen::NodePeer;
use crate::{ServerError, State, token_hash};

/// Limits on what one call may ask for.
const MAX_CSRS_PER_CALL: usize = 512;
const MAX_NODE_ADDRESSES: usize = 64;
const MAX_AUDIENCES: usize = 16;
const MAX_AUDIENCE_LEN: usize = 256;

pub struct NodeApi {
    pub state: Arc<State>,
}

/// The addresses a node SVID may vouch for: parsed, and none that many
/// hosts share (loopback, unspecified, link-local, multicast).
fn vouchable(addresses: &[String]) -> Result<Vec<std::net::IpAddr>, Status> {
    if addresses.len() > MAX_NODE_ADDRESSES {
        return Err(Status::invalid_argument(format!(
            "{} addresses; limit {MAX_NODE_ADDRESSES}",
            addresses.len()
        )));
    }
    let mut out = Vec::new();
    for (i, a) in addresses.iter().enumerate() {
        let ip: std::net::IpAddr = a.parse().map_err(|_| {
            Status::invalid_argument(format!("addresses[{i}]: {a:?} is not an IP address"))
        })?;
        let ip = ip.to_canonical();
        let shared = match ip {
            std::net::IpAddr::V4(v) => {
                v.is_loopback()
                    || v.is_unspecified()
                    || v.is_link_local()
                    || v.is_multicast()
                    || v.is_broadcast()
            }
            std::net::IpAddr::V6(v) => {
                v.is_loopback()
                    || v.is_unspecified()
                    || v.is_multicast()
                    || v.is_unicast_link_local()
            }
        };
        if !shared && !out.contains(&ip) {
            out.push(ip);
        }
    }
    out.sort();
    Ok(out)
}

/// Identities (name, spec) that apply to `node`.
pub fn identities_for_node(
    state: &State,
    node: &str,
) -> Result<Vec<(String, WorkloadIdentitySpec)>, ServerError> {
    let mut out = Vec::new();
    for row in state.store.list("WorkloadIdentity")? {
        if let Some(Resource::WorkloadIdentity { name, spec }) =
            Resource::from_stored(&row.kind, &row.name, &row.spec)
            && spec.applies_to_node(node)
        {
            out.push((name, spec));
        }
    }
    Ok(out)
}

impl NodeApi {
    /// The calling node's name, from its verified node SVID; the node must
    /// still be registered (deleting a node cuts it off).
    fn node<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let peer = req
            .extensions()
            .get::<NodePeer>()
            .ok_or_else(|| Status::unauthenticated("no connection information"))?;
        let id = peer.id.as_ref().ok_or_else(|| {
            Status::unauthenticated("this call needs a node SVID; attest with a join token first")
        })?;
        let name = id
            .path()
            .strip_prefix("/tether/node/")
            .ok_or_else(|| Status::permission_denied(format!("{id} is not a node identity")))?
            .to_string();
        match self.state.store.node(&name).map_err(ServerError::from)? {
            Some(row) if Some(&row.svid_serial) == peer.serial.as_ref() => Ok(name),
            Some(row) => Err(Status::permission_denied(format!(
                "node {name:?} presented an SVID (serial {}) that is not its current one ({}): \
                 renewed since, or copied",
                peer.serial.as_deref().unwrap_or("?"),
                row.svid_serial
            ))),
            None => Err(Status::permission_denied(format!(
                "node {name:?} is not registered (evicted?)"
            ))),
        }
    }

    /// Attestation by the node's operator-issued certificate: its chain
    /// verifies against `--node-ca`, its subject CN is the node name, and its
    /// key signed this request (see `tether_spiffe::x509pop`).
    fn attest_x509pop(&self, r: AttestRequest, peer: &str) -> Result<Response<NodeSvid>, Status> {
        let st = &self.state;
        let Some(anchors) = st.node_ca.as_ref() else {
            return Err(Status::failed_precondition(
                "node attestation refused: x509pop: this server trusts no node CA (--node-ca)",
            ));
        };
        if r.x509pop_chain.iter().any(|c| c.len() > 16 * 1024) || r.x509pop_signature.len() > 1024 {
            return Err(Status::invalid_argument(
                "x509pop: a certificate over 16 KiB or a signature over 1 KiB",
            ));
        }
        tether_ca::parse_csr(&r.csr).map_err(ServerError::from)?;
        let now = st.now();
        if let Err(e) = tether_spiffe::x509pop::verify(
            &r.x509pop_chain,
            anchors,
            &r.node_name,
            &r.csr,
            &r.x509pop_signature,
            now,
        ) {
            tracing::warn!(node = %r.node_name, %peer, reason = %e, "node attestation refused (x509pop)");
            return Err(Status::permission_denied(format!(
                "node attestation refused: x509pop: {e}"
            )));
        }
        let fingerprint = r
            .x509pop_chain
            .first()
            .map(|leaf| hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf)))
            .unwrap_or_default();
        let svid = self.nodes_locked(|| {
            let refuse = |why: String| {
                tracing::warn!(node = %r.node_name, %peer, reason = %why, "node attestation refused (x509pop)");
                Err(Status::permission_denied(format!(
                    "node attestation refused: x509pop: {why}"
                )))
            };
            // Deleting the node cut off every certificate issued until
            // then, whatever its bytes (the leaf was verified above).
            if let Some(cutoff) = st.store.x509pop_cutoff(&r.node_name).map_err(ServerError::from)?
                && not_before(r.x509pop_chain.first().map(Vec::as_slice).unwrap_or_default())
                    .is_none_or(|nb| nb <= cutoff)
            {
                return refuse(
                    "this node was deleted; the operator must issue it a new certificate".into(),
                );
            }
            if let Some(prev) = st.store.node(&r.node_name).map_err(ServerError::from)?
                && !prev.attested_by.starts_with("x509pop:")
            {
                return refuse(format!(
                    "node {:?} attested with a join token; delete it before it attests by certificate",
                    r.node_name
                ));
            }
            self.sign_node_svid_locked(
                &r.node_name,
                &r.csr,
                Some((now, format!("x509pop:{fingerprint}"))),
                &r.addresses,
            )
        })?;
        tracing::info!(node = %r.node_name, %peer, method = "x509pop", "node attested");
        Ok(Response::new(svid))
    }

    /// Runs `f` while no other node SVID is signed on any server of the
    /// database: which addresses one vouches for depends on the others',
    /// and which node holds a name on who attested it first.
    fn nodes_locked<R>(&self, f: impl FnOnce() -> Result<R, Status>) -> Result<R, Status> {
        self.state
            .store
            .exclusive(tether_store::Lock::Nodes, f)
            .map_err(ServerError::from)?
    }

    /// Signs a node SVID (under [`Self::nodes_locked`]). `attested`: when
    /// and how, for an attestation; None for a renewal.
    fn sign_node_svid_locked(
        &self,
        name: &str,
        csr: &[u8],
        attested: Option<(i64, String)>,
        addresses: &[String],
    ) -> Result<NodeSvid, Status> {
        let st = &self.state;
        let now = st.now();
        let id = st.node_id(name)?;
        let mut ips = vouchable(addresses)?;
        // First come, first served: an address another node's current SVID
        // vouches for is not vouched for again (a node that moved gets it
        // once the other's SVID expires or that node is removed).
        let taken: std::collections::HashSet<std::net::IpAddr> = st
            .store
            .nodes()
            .map_err(ServerError::from)?
            .into_iter()
            .filter(|n| n.name != name && n.svid_expires_at > now)
            .flat_map(|n| {
                n.addresses
                    .split(',')
                    .filter_map(|a| a.parse().ok())
                    .collect::<Vec<std::net::IpAddr>>()
            })
            .collect();
        ips.retain(|ip| {
            let free = !taken.contains(ip);
            if !free {
                tracing::warn!(node = %name, address = %ip, "address already vouched for by another node; left out of this node's SVID");
            }
            free
        });
        let extras = tether_ca::SvidExtras {
            ip_addresses: &ips,
            ..tether_ca::SvidExtras::default()
        };
        let cert = st
            .keys()
            .signer
            .sign_svid_with(csr, &id, &extras, st.node_svid_ttl_secs, now)
            .map_err(ServerError::from)?;
        let prev = st.store.node(name).map_err(ServerError::from)?;
        st.store
            .upsert_node(&NodeRow {
                name: name.to_string(),
                spiffe_id: id.to_string(),
                attested_at: attested
                    .as_ref()
                    .map(|a| a.0)
                    .or(prev.as_ref().map(|p| p.attested_at))
                    .unwrap_or(now),
                svid_serial: cert.serial_hex.clone(),
                svid_expires_at: cert.not_after,
                last_seen: now,
                addresses: ips
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                server: st.name().to_owned(),
                offline: prev.as_ref().map_or((0, 0), |p| p.offline),
                attested_by: attested
                    .map(|a| a.1)
                    .or(prev.map(|p| p.attested_by))
                    .unwrap_or_default(),
            })
            .map_err(ServerError::from)?;
        Ok(NodeSvid {
            spiffe_id: id.to_string(),
            node_name: name.to_string(),
            chain: cert.chain,
            bundle_json: st
                .current_bundle()
                .to_json()
                .map_err(|e| Status::internal(e.to_string()))?,
            expires_at: cert.not_after,
        })
    }

    /// The calling node's view of `identity`'s binding to `source`: the
    /// identity must apply to the node and a CredentialBinding must bind
    /// them. Returns the source's spec as stored.
    fn bound_source(
        &self,
        node: &str,
        identity: &str,
        source: &str,
    ) -> Result<CredentialSourceSpec, Status> {
        if !identities_for_node(&self.state, node)?
            .iter()
            .any(|(n, _)| n == identity)
        {
            return Err(Status::permission_denied(format!(
                "identity: node {node:?} is not entitled to WorkloadIdentity {identity:?}"
            )));
        }
        let bound = self
            .state
            .store
            .list("CredentialBinding")
            .map_err(ServerError::from)?
            .iter()
            .filter_map(|r| Resource::from_stored(&r.kind, &r.name, &r.spec))
            .any(|r| {
                matches!(r, Resource::CredentialBinding { spec, .. }
                    if spec.identity == identity && spec.source == source)
            });
        if !bound {
            return Err(Status::permission_denied(format!(
                "source: no CredentialBinding gives {source:?} to {identity:?}"
            )));
        }
        let row = self
            .state
            .store
            .get("CredentialSource", source)
            .map_err(ServerError::from)?
            .ok_or_else(|| Status::not_found(format!("source: no CredentialSource {source:?}")))?;
        match Resource::from_stored(&row.kind, &row.name, &row.spec) {
            Some(Resource::CredentialSource { spec, .. }) => Ok(spec),
            _ => Err(Status::internal(format!(
                "CredentialSource {source:?} is unreadable in the store"
            ))),
        }
    }

    fn entitled(&self, node: &str, id: &SpiffeId) -> Result<Vec<WorkloadIdentitySpec>, Status> {
        let specs: Vec<_> = identities_for_node(&self.state, node)?
            .into_iter()
            .map(|(_, s)| s)
            .filter(|s| s.spiffe_id == id.as_str())
            .collect();
        if specs.is_empty() {
            return Err(Status::permission_denied(format!(
                "node {node:?} is not entitled to {id}: no WorkloadIdentity with that SPIFFE ID applies to it"
            )));
        }
        Ok(specs)
    }
}

/// The CredentialBindings of the identities that apply to a node, and the
/// sources they name, as the node sees them: a static source's sealed value
/// is left out (the node asks for it with `FetchSecret` when a process
/// there first reads it).
fn credentials_for(
    state: &State,
    applying: &[(String, WorkloadIdentitySpec)],
) -> Result<Vec<StoredResource>, ServerError> {
    let mut out = Vec::new();
    let mut sources = std::collections::BTreeSet::new();
    for row in state.store.list("CredentialBinding")? {
        if let Some(Resource::CredentialBinding { spec, .. }) =
            Resource::from_stored(&row.kind, &row.name, &row.spec)
            && applying.iter().any(|(n, _)| *n == spec.identity)
        {
            sources.insert(spec.source.clone());
            out.push(StoredResource {
                kind: row.kind,
                name: row.name,
                spec_json: row.spec,
            });
        }
    }
    for name in sources {
        let Some(row) = state.store.get("CredentialSource", &name)? else {
            continue;
        };
        let Some(Resource::CredentialSource { mut spec, .. }) =
            Resource::from_stored(&row.kind, &row.name, &row.spec)
        else {
            continue;
        };
        if let CredentialSourceSpec::Static { value } = &mut spec {
            value.clear();
        }
        out.push(StoredResource {
            kind: row.kind,
            name: row.name,
            spec_json: serde_json::to_string(&spec)
                .map_err(|e| ServerError::Internal(format!("CredentialSource {name}: {e}")))?,
        });
    }
    Ok(out)
}

fn to_proto(name: String, s: WorkloadIdentitySpec) -> Identity {
    Identity {
        name,
        spiffe_id: s.spiffe_id,
        selector_sets: s
            .selectors
            .into_iter()
            .map(|selectors| SelectorSet { selectors })
            .collect(),
        x509_ttl_secs: s.x509_ttl_secs,
        jwt_ttl_secs: s.jwt_ttl_secs,
        dns_names: s.dns_names,
        workload_api: s.workload_api,
        allow_exec: s.allow_exec,
    }
}

#[tonic::async_trait]
impl Node for NodeApi {
    async fn attest(&self, req: Request<AttestRequest>) -> Result<Response<NodeSvid>, Status> {
        let peer = req
            .extensions()
            .get::<NodePeer>()
            .map(|p| p.addr.to_string())
            .unwrap_or_default();
        let r = req.into_inner();
        tether_manifest::validate_name(&r.node_name)
            .map_err(|m| Status::invalid_argument(format!("node_name: {m}")))?;
        if !r.x509pop_chain.is_empty() {
            return self.attest_x509pop(r, &peer);
        }
        if r.join_token.is_empty() || r.join_token.len() > 256 {
            return Err(Status::invalid_argument("join_token: missing or too long"));
        }
        // Check the CSR before burning the token, so a client bug does not
        // cost the operator a token.
        tether_ca::parse_csr(&r.csr).map_err(ServerError::from)?;
        let now = self.state.now();
        // Consumed and signed under one lock: "a node already holds this
        // name" stays true between the check and the signature on every
        // server.
        let svid = self.nodes_locked(|| {
            if let Err(why) = self
                .state
                .store
                .consume_join_token(&token_hash(&r.join_token), &r.node_name, now)
                .map_err(ServerError::from)?
            {
                tracing::warn!(node = %r.node_name, %peer, reason = why, "node attestation refused");
                return Err(Status::permission_denied(format!(
                    "node attestation refused: {why}"
                )));
            }
            self.sign_node_svid_locked(
                &r.node_name,
                &r.csr,
                Some((now, "join-token".into())),
                &r.addresses,
            )
        })?;
        tracing::info!(node = %r.node_name, %peer, "node attested");
        Ok(Response::new(svid))
    }

    async fn renew_node(
        &self,
        req: Request<RenewNodeRequest>,
    ) -> Result<Response<NodeSvid>, Status> {
        let node = self.node(&req)?;
        let r = req.into_inner();
        let svid =
            self.nodes_locked(|| self.sign_node_svid_locked(&node, &r.csr, None, &r.addresses))?;
        tracing::info!(%node, "node SVID renewed");
        Ok(Response::new(svid))
    }

    async fn sign_x509_svids(
        &self,
        req: Request<SignX509SvidsRequest>,
    ) -> Result<Response<SignX509SvidsResponse>, Status> {
        let node = self.node(&req)?;
        let r = req.into_inner();
        if r.csrs.len() > MAX_CSRS_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "{} CSRs in one call; limit {MAX_CSRS_PER_CALL}",
                r.csrs.len()
            )));
        }
        let keys = self.state.keys();
        let now = self.state.now();
        let mut out = Vec::with_capacity(r.csrs.len());
        for c in r.csrs {
            let result: Result<SignedSvid, Status> = (|| {
                let id = SpiffeId::parse(&c.spiffe_id)
                    .map_err(|e| Status::invalid_argument(format!("spiffe_id: {e}")))?;
                let specs = self.entitled(&node, &id)?;
                let max_ttl = specs.iter().map(|s| s.x509_ttl_secs).min().unwrap_or(0);
                let ttl = if c.ttl_secs > 0 {
                    c.ttl_secs.min(max_ttl)
                } else {
                    max_ttl
                };
                let mut dns: Vec<String> = specs
                    .iter()
                    .flat_map(|s| s.dns_names.iter().cloned())
                    .collect();
                dns.sort();
                dns.dedup();
                let extras = tether_ca::SvidExtras {
                    dns_names: if c.mesh { &[] } else { &dns },
                    mesh_node: c.mesh.then_some(node.as_str()),
                    ..tether_ca::SvidExtras::default()
                };
                let cert = keys
                    .signer
                    .sign_svid_with(&c.csr, &id, &extras, ttl, now)
                    .map_err(ServerError::from)?;
                Ok(SignedSvid {
                    spiffe_id: id.to_string(),
                    chain: cert.chain,
                    expires_at: cert.not_after,
                    error: String::new(),
                })
            })();
            out.push(result.unwrap_or_else(|status| {
                tracing::warn!(%node, spiffe_id = %c.spiffe_id, error = %status.message(), "workload CSR refused");
                SignedSvid { spiffe_id: c.spiffe_id, chain: vec![], expires_at: 0, error: status.message().to_string() }
            }));
        }
        Ok(Response::new(SignX509SvidsResponse { svids: out }))
    }

    async fn mint_jwt_svid(
        &self,
        req: Request<MintJwtSvidRequest>,
    ) -> Result<Response<MintJwtSvidResponse>, Status> {
        let node = self.node(&req)?;
        let r = req.into_inner();
        let id = SpiffeId::parse(&r.spiffe_id)
            .map_err(|e| Status::invalid_argument(format!("spiffe_id: {e}")))?;
        if r.audience.is_empty() || r.audience.len() > MAX_AUDIENCES {
            return Err(Status::invalid_argument(format!(
                "audience: give 1 to {MAX_AUDIENCES} values"
            )));
        }
        if r.audience
            .iter()
            .any(|a| a.is_empty() || a.len() > MAX_AUDIENCE_LEN)
        {
            return Err(Status::invalid_argument(format!(
                "audience: each value must be 1 to {MAX_AUDIENCE_LEN} bytes"
            )));
        }
        let specs = self.entitled(&node, &id)?;
        let ttl = specs.iter().map(|s| s.jwt_ttl_secs).min().unwrap_or(300);
        let (token, expires_at) = self.state.mint_jwt(&id, &r.audience, ttl)?;
        Ok(Response::new(MintJwtSvidResponse { token, expires_at }))
    }

    async fn fetch_secret(
        &self,
        req: Request<FetchSecretRequest>,
    ) -> Result<Response<FetchSecretResponse>, Status> {
        let node = self.node(&req)?;
        let r = req.into_inner();
        for (field, v) in [("identity", &r.identity), ("source", &r.source)] {
            tether_manifest::validate_name(v)
                .map_err(|m| Status::invalid_argument(format!("{field}: {m}")))?;
        }
        let CredentialSourceSpec::Static { value: sealed } =
            self.bound_source(&node, &r.identity, &r.source)?
        else {
            return Err(Status::failed_precondition(format!(
                "source: {:?} is not a static source; it is not fetched from the server",
                r.source
            )));
        };
        let value = self
            .state
            .sealer
            .open(&sealed)
            .map_err(|e| Status::internal(format!("source {:?}: {e}", r.source)))?;
        tracing::info!(node = %node, identity = %r.identity, source = %r.source, "static credential released to node");
        Ok(Response::new(FetchSecretResponse {
            value: value.into_bytes(),
        }))
    }

    async fn mint_client_assertion(
        &self,
        req: Request<FetchSecretRequest>,
    ) -> Result<Response<MintJwtSvidResponse>, Status> {
        let node = self.node(&req)?;
        let r = req.into_inner();
        for (field, v) in [("identity", &r.identity), ("source", &r.source)] {
            tether_manifest::validate_name(v)
                .map_err(|m| Status::invalid_argument(format!("{field}: {m}")))?;
        }
        // Only for a source the identity is bound to, and only for the
        // client and endpoint the source names: an agent cannot ask for an
        // assertion as any other client.
        let CredentialSourceSpec::OAuth2 {
            client_id,
            token_endpoint,
            ..
        } = self.bound_source(&node, &r.identity, &r.source)?
        else {
            return Err(Status::failed_precondition(format!(
                "source: {:?} is not an oauth2 source",
                r.source
            )));
        };
        if client_id.is_empty() {
            return Err(Status::failed_precondition(format!(
                "source: {:?} names no clientId to assert",
                r.source
            )));
        }
        // Checked again here: a store written before the check existed, or
        // by another writer, must not turn an assertion into a JWT-SVID.
        tether_manifest::client_id_allowed(&client_id).map_err(|m| {
            Status::failed_precondition(format!("source {:?}: clientId: {m}", r.source))
        })?;
        let (token, expires_at) = self
            .state
            .mint_client_assertion(&client_id, &token_endpoint)?;
        tracing::info!(node = %node, identity = %r.identity, source = %r.source, client_id = %client_id, "client assertion issued");
        Ok(Response::new(MintJwtSvidResponse { token, expires_at }))
    }

    type WatchStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<NodeState, Status>> + Send + 'static>>;

    async fn watch(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let node = self.node(&req)?;
        let state = self.state.clone();
        let now = state.now();
        // An outage the agent reports, bounded to the past.
        let offline = Some(req.get_ref().unreachable_since).filter(|t| (1..=now).contains(t));
        if let Some(t) = offline {
            tracing::warn!(%node, offline_secs = now - t, "node was without any server");
        }
        state
            .store
            .node_seen(&node, state.name(), now, offline)
            .map_err(ServerError::from)?;
        let mut updates = state.updates.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                updates.mark_unchanged();
                let snapshot = (|| -> Result<NodeState, Status> {
                    let applying = identities_for_node(&state, &node)?;
                    let mut resources = credentials_for(&state, &applying)?;
                    let identities = applying.into_iter().map(|(n, s)| to_proto(n, s)).collect();
                    for kind in ["Service", "AccessPolicy"] {
                        for row in state.store.list(kind).map_err(ServerError::from)? {
                            resources.push(StoredResource {
                                kind: row.kind,
                                name: row.name,
                                spec_json: row.spec,
                            });
                        }
                    }
                    Ok(NodeState {
                        revision: state.store.revision().map_err(ServerError::from)?,
                        identities,
                        bundle_json: state
                            .current_bundle()
                            .to_json()
                            .map_err(|e| Status::internal(e.to_string()))?,
                        resources,
                    })
                })();
                if tx.send(snapshot).await.is_err() {
                    return; // agent went away
                }
                if updates.changed().await.is_err() {
                    return; // server shutting down
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// A certificate's notBefore (Unix seconds).
fn not_before(der: &[u8]) -> Option<i64> {
    x509_parser::parse_x509_certificate(der)
        .ok()
        .map(|(_, c)| c.validity().not_before.timestamp())
}
