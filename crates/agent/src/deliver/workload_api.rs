//! The SPIFFE Workload API on a Unix socket.
//!
//! The caller is fixed at accept: a pidfd taken from the socket
//! (SO_PEERPIDFD), never a PID looked up later, and the kernel's exec record
//! of that process then (exec id and start). A call is answered only while
//! that same process runs that same image: after an exec, or from any other
//! process holding the descriptor (every byte's writer is checked, see
//! `sender`), the connection gets nothing. Connections are capped in total
//! and per uid.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use tether_attest::PidFd;
use tether_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use tether_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svid, X509svidRequest, X509svidResponse,
};
use tokio::task::JoinHandle;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::clock::unix_now;
use crate::deliver::sender::{SenderChecked, pass_credentials};
use crate::metrics::Metrics;
use crate::state::tracker::{EnsureError, IssueError, ProcSvid, Tracker};
use tether_attest::{KeyedSlot, KeyedSlots};

/// (exec id, process start) of an image, as the kernel recorded it.
type ExecKey = Option<(u64, u64)>;

/// The caller of one Workload API connection, as it was at accept.
#[derive(Clone)]
pub struct Caller {
    pub pidfd: Option<Arc<PidFd>>,
    /// The kernel's (exec id, process start) for it at accept.
    pub exec: ExecKey,
    /// The connection's slot of its uid's (and of all): held while the
    /// connection (or a request of it) lives.
    _slot: Arc<KeyedSlot<u32>>,
}

type CallerConn =
    tether_proto::uds::Tagged<crate::deliver::h2_authority::Rewritten<SenderChecked>, Caller>;

/// Connections at once, in all and per uid: a flood from one user cannot
/// take the socket from everyone else.
const MAX_CONNECTIONS: usize = 1024;
const MAX_PER_UID: usize = 64;
/// Header list size the HTTP/2 server accepts (the `:authority` shim bounds
/// decoded header blocks the same way).
const MAX_HEADER_LIST: u32 = 16 * 1024;

pub struct WorkloadApi {
    tracker: Arc<Tracker>,
    metrics: Arc<Metrics>,
}

type RpcStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req
        .metadata()
        .get(tether_proto::WORKLOAD_METADATA_KEY)
        .and_then(|v| v.to_str().ok())
    {
        Some("true") => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request: every Workload API call must carry the metadata `workload.spiffe.io: true`",
        )),
    }
}

fn concat(chain: &[Vec<u8>]) -> Vec<u8> {
    chain.iter().flat_map(|c| c.iter().copied()).collect()
}

impl WorkloadApi {
    fn caller<T>(&self, req: &Request<T>) -> Result<(Arc<PidFd>, ExecKey), Status> {
        let c = req.extensions().get::<Caller>().ok_or_else(|| {
            Status::permission_denied("could not identify the calling process (no connection info)")
        })?;
        let pidfd = c.pidfd.clone().ok_or_else(|| {
            Status::permission_denied(
                "could not identify the calling process (no pidfd for the peer)",
            )
        })?;
        still_bound(&self.tracker, &pidfd, c.exec)?;
        Ok((pidfd, c.exec))
    }

    /// The caller's SVIDs that may be delivered through this API: those of
    /// the image that made the connection (`exec`), never of one it exec'd
    /// while the call was being served.
    async fn deliverable(
        &self,
        (pidfd, exec): (Arc<PidFd>, ExecKey),
    ) -> Result<(tether_attest::ProcessInfo, Vec<Arc<ProcSvid>>), Status> {
        let pid = pidfd.pid();
        let (info, svids) = self.tracker.ensure(pidfd).await.map_err(|e| match e {
            EnsureError::Attest(m) => {
                Status::permission_denied(format!("could not attest caller: {m}"))
            }
            EnsureError::Issue(IssueError::Server(m)) => {
                Status::unavailable(format!("could not obtain an SVID: {m}"))
            }
            EnsureError::Issue(IssueError::Internal(m)) | EnsureError::Internal(m) => {
                Status::internal(m)
            }
            EnsureError::Stopped => Status::unavailable("the agent is stopping"),
        })?;
        if exec.is_none() || self.tracker.exec_of(pid) != exec {
            return Err(Status::permission_denied(format!(
                "pid {pid} exec'd while this call was served: a connection serves only the image \
                 that made it; connect again"
            )));
        }
        let ok: Vec<_> = svids.into_iter().filter(|s| s.workload_api).collect();
        if ok.is_empty() {
            tracing::info!(pid, exe = %info.exe_path, uid = info.uid, "Workload API: no identity for caller");
            return Err(Status::permission_denied(format!(
                "no identity issued for this process (pid {pid}, {}, uid {}); see `tether whoami --pid {pid}`",
                info.exe_path, info.uid
            )));
        }
        Ok((info, ok))
    }

    fn x509_response(&self, svids: &[Arc<ProcSvid>]) -> Result<X509svidResponse, Status> {
        let bundle = self.tracker.registry.borrow().bundle.clone();
        let roots = bundle.x509_authorities_der_concat();
        let mut out = Vec::with_capacity(svids.len());
        for s in svids {
            out.push(X509svid {
                spiffe_id: s.spiffe_id.to_string(),
                x509_svid: concat(&s.chain),
                x509_svid_key: s.key.pkcs8_der().to_vec(),
                bundle: roots.clone(),
                hint: s.identity.clone(),
            });
        }
        Ok(X509svidResponse {
            svids: out,
            crl: vec![],
            federated_bundles: HashMap::new(),
        })
    }

    fn count(&self, method: &str, result: &Result<(), &Status>) {
        let code = match result {
            Ok(()) => "ok".to_string(),
            Err(s) => format!("{:?}", s.code()).to_lowercase(),
        };
        self.metrics.workload_api_requests(method, &code);
    }
}

/// The connection still belongs to the process and image that made it:
/// alive, same exec record (no exec since, same process), not marked.
fn still_bound(tracker: &Tracker, pidfd: &PidFd, exec: ExecKey) -> Result<(), Status> {
    let pid = pidfd.pid();
    if !pidfd.is_alive() {
        return Err(Status::permission_denied(format!(
            "pid {pid}, which made this connection, has exited"
        )));
    }
    let now = tracker.exec_record(pid);
    if now.as_ref().map(|r| (r.exec_id, r.start_ns)) != exec || exec.is_none() {
        return Err(Status::permission_denied(format!(
            "pid {pid} has exec'd since it connected (or was never recorded): a connection serves \
             only the image that made it; connect again"
        )));
    }
    if now.is_some_and(|r| r.flags.tainted()) {
        return Err(Status::permission_denied(format!(
            "pid {pid} was traced or had its memory or exe changed since its exec"
        )));
    }
    Ok(())
}

/// A stream that sends a message now and again after every change, until
/// the caller goes away or loses its identity.
fn follow<T: Send + 'static>(
    tracker: Arc<Tracker>,
    mut next: impl FnMut() -> Option<Result<T, Status>> + Send + 'static,
) -> RpcStream<T> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let mut changes = tracker.changes.subscribe();
    let mut stopped = tracker.stopped();
    tokio::spawn(async move {
        loop {
            changes.mark_unchanged();
            if let Some(item) = next() {
                let last = item.is_err();
                // An error ends the stream after it is delivered.
                if tx.send(item).await.is_err() || last {
                    return;
                }
            }
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = tx.closed() => return,
                _ = stopped.wait_for(|s| *s) => return,
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = RpcStream<X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let r = (|| {
            check_header(&req)?;
            self.caller(&req)
        })();
        let (pidfd, exec) = match r {
            Ok(p) => p,
            Err(s) => {
                self.count("FetchX509SVID", &Err(&s));
                return Err(s);
            }
        };
        let first = self.deliverable((pidfd.clone(), exec)).await;
        self.count("FetchX509SVID", &first.as_ref().map(|_| ()));
        let (info, svids) = first?;
        let tracker = self.tracker.clone();
        let me = WorkloadApi {
            tracker: tracker.clone(),
            metrics: self.metrics.clone(),
        };
        let mut last: Vec<(String, i64)> = Vec::new();
        let mut initial = Some(svids);
        let pid = pidfd.pid();
        let start_time = info.start_time;
        Ok(Response::new(follow(tracker.clone(), move || {
            let svids = match initial.take() {
                Some(s) => s,
                None => {
                    if !pidfd.is_alive() {
                        return Some(Err(Status::cancelled("caller exited")));
                    }
                    if let Err(s) = still_bound(&tracker, &pidfd, exec) {
                        return Some(Err(s));
                    }
                    if tracker.exec_of(pid) != exec {
                        // Re-attested as another image: not this connection's.
                        return Some(Err(Status::permission_denied(
                            "the caller exec'd since it connected",
                        )));
                    }
                    let s: Vec<_> = tracker
                        .svids_of(pid, start_time)?
                        .into_iter()
                        .filter(|s| s.workload_api)
                        .collect();
                    if s.is_empty() {
                        return Some(Err(Status::permission_denied(
                            "the caller no longer has an identity",
                        )));
                    }
                    s
                }
            };
            // Send only when something the caller sees changed: an SVID
            // (identified by its certificate) or the bundle.
            let mut key: Vec<(String, i64)> = svids
                .iter()
                .map(|s| (s.spiffe_id.to_string(), Arc::as_ptr(s) as i64))
                .collect();
            key.push((
                String::new(),
                tracker.registry.borrow().bundle.sequence as i64,
            ));
            if key == last {
                return None;
            }
            last = key;
            Some(me.x509_response(&svids))
        })))
    }

    type FetchX509BundlesStream = RpcStream<X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        req: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.bundle_stream(req, "FetchX509Bundles", |b| {
            let mut bundles = HashMap::new();
            bundles.insert(b.trust_domain.id_string(), b.x509_authorities_der_concat());
            Ok(X509BundlesResponse {
                crl: vec![],
                bundles,
            })
        })
        .await
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let res = self.fetch_jwt_inner(req).await;
        self.count("FetchJWTSVID", &res.as_ref().map(|_| ()));
        res
    }

    type FetchJWTBundlesStream = RpcStream<JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        req: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.bundle_stream(req, "FetchJWTBundles", |b| {
            let jwks = b.jwks_json().map_err(|e| Status::internal(e.to_string()))?;
            let mut bundles = HashMap::new();
            bundles.insert(b.trust_domain.id_string(), jwks);
            Ok(JwtBundlesResponse { bundles })
        })
        .await
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        let res = (|| {
            check_header(&req)?;
            let r = req.get_ref();
            if r.audience.is_empty() {
                return Err(Status::invalid_argument("audience must be specified"));
            }
            if r.svid.is_empty() {
                return Err(Status::invalid_argument("svid must be specified"));
            }
            let bundle = self.tracker.registry.borrow().bundle.clone();
            let (id, claims) =
                tether_spiffe::jwt::validate(&r.svid, &r.audience, &bundle, unix_now())
                    .map_err(|e| Status::invalid_argument(format!("invalid JWT-SVID: {e}")))?;
            let value =
                serde_json::to_value(&claims).map_err(|e| Status::internal(e.to_string()))?;
            Ok(ValidateJwtsvidResponse {
                spiffe_id: id.to_string(),
                claims: Some(to_struct(value)),
            })
        })();
        self.count("ValidateJWTSVID", &res.as_ref().map(|_| ()));
        res.map(Response::new)
    }
}

impl WorkloadApi {
    /// A bundle stream for a caller that holds an identity: one message now
    /// and one per bundle change.
    async fn bundle_stream<R: Send + 'static, T>(
        &self,
        req: Request<R>,
        method: &str,
        make: impl Fn(&tether_spiffe::Bundle) -> Result<T, Status> + Send + 'static,
    ) -> Result<Response<RpcStream<T>>, Status>
    where
        T: Send + 'static,
    {
        check_header(&req).inspect_err(|s| self.count(method, &Err(s)))?;
        let caller = self.caller(&req)?;
        let r = self.deliverable(caller).await.map(|_| ());
        self.count(method, &r.as_ref().map(|_| ()));
        r?;
        let tracker = self.tracker.clone();
        let mut last_seq = None;
        Ok(Response::new(follow(tracker.clone(), move || {
            let b = tracker.registry.borrow().bundle.clone();
            if last_seq == Some(b.sequence) {
                return None;
            }
            last_seq = Some(b.sequence);
            Some(make(&b))
        })))
    }

    async fn fetch_jwt_inner(
        &self,
        req: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        check_header(&req)?;
        let caller = self.caller(&req)?;
        let r = req.get_ref().clone();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        let (_, svids) = self.deliverable(caller).await?;
        let mut ids: Vec<&ProcSvid> = svids.iter().map(|s| s.as_ref()).collect();
        if !r.spiffe_id.is_empty() {
            ids.retain(|s| s.spiffe_id.as_str() == r.spiffe_id);
            if ids.is_empty() {
                return Err(Status::permission_denied(format!(
                    "this process is not entitled to {}",
                    r.spiffe_id
                )));
            }
        }
        ids.dedup_by(|a, b| a.spiffe_id == b.spiffe_id);
        let mut out = Vec::new();
        for s in ids {
            let minted = self
                .tracker
                .mint_jwt(&s.spiffe_id, &r.audience)
                .await
                .map_err(|m| Status::unavailable(format!("could not mint JWT-SVID: {m}")))?;
            out.push(Jwtsvid {
                spiffe_id: s.spiffe_id.to_string(),
                svid: minted,
                hint: s.identity.clone(),
            });
        }
        Ok(Response::new(JwtsvidResponse { svids: out }))
    }
}

/// JSON claims to the protobuf Struct the API returns.
fn to_struct(v: serde_json::Value) -> prost_types::Struct {
    match to_value(v).kind {
        Some(prost_types::value::Kind::StructValue(s)) => s,
        _ => prost_types::Struct::default(),
    }
}

fn to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// Serves the Workload API on `path` (world-connectable: every workload
/// may ask; what it gets depends on who it is).
pub fn serve(
    tracker: Arc<Tracker>,
    metrics: Arc<Metrics>,
    path: &Path,
) -> anyhow::Result<JoinHandle<()>> {
    let listener = tether_proto::uds::bind(path, 0o777)
        .map_err(|e| anyhow::anyhow!("binding Workload API socket {}: {e}", path.display()))?;
    pass_credentials(listener.as_fd()).map_err(|e| {
        anyhow::anyhow!(
            "SO_PASSCRED on the Workload API socket {}: {e}",
            path.display()
        )
    })?;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<CallerConn>>(64);
    let slots = KeyedSlots::new(MAX_PER_UID, MAX_CONNECTIONS);
    let t = tracker.clone();
    let m = metrics.clone();
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    let uid = s.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX);
                    let Some(slot) = slots.take(uid) else {
                        tracing::warn!(uid, "Workload API: too many connections; closing one");
                        m.workload_api_requests("connect", "resource_exhausted");
                        continue;
                    };
                    let pidfd = match tether_attest::peer_pidfd(s.as_fd()) {
                        Ok(p) => Some(Arc::new(p)),
                        Err(e) => {
                            tracing::warn!(error = %e, "Workload API: no pidfd for peer");
                            None
                        }
                    };
                    let pid = pidfd.as_ref().map_or(0, |p| p.pid());
                    // The image that made the connection: read now, checked
                    // on every call.
                    let exec = t.exec_record(pid).map(|r| (r.exec_id, r.start_ns));
                    let conn = CallerConn::new(
                        crate::deliver::h2_authority::Rewritten::new(SenderChecked::new(s, pid)),
                        Caller {
                            pidfd,
                            exec,
                            _slot: Arc::new(slot),
                        },
                    );
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Workload API accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    });
    let svc = SpiffeWorkloadApiServer::new(WorkloadApi { tracker, metrics });
    Ok(tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .http2_max_header_list_size(MAX_HEADER_LIST)
            .concurrency_limit_per_connection(16)
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        {
            tracing::error!(error = %e, "Workload API stopped");
        }
    }))
}
