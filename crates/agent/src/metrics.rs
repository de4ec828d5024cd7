//! Prometheus metrics, served over HTTP at /metrics.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    verdict: String,
    identity: String,
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TunnelLabels {
    pub direction: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InjectLabels {
    protocol: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FetchLabels {
    source_kind: String,
    outcome: String,
}

pub struct Metrics {
    registry: Registry,
    pub tracked_processes: Gauge,
    pub process_svids: Gauge,
    pub svids_issued: Counter,
    pub svids_rotated: Counter,
    pub svids_destroyed: Counter,
    pub attestation_errors: Counter,
    api: Family<ApiLabels, Counter>,
    decisions: Family<DecisionLabels, Counter>,
    held: Family<OutcomeLabels, Counter>,
    tunnels: Family<TunnelLabels, Counter>,
    injected: Family<InjectLabels, Counter>,
    credential_reads: Family<OutcomeLabels, Counter>,
    credential_fetches: Family<FetchLabels, Counter>,
    pub credential_fetch_seconds: Histogram,
    /// 1 while the registry watch is connected to a server, else 0.
    pub server_connected: Gauge,
    /// When the agent lost its server (Unix seconds), 0 while connected.
    pub server_unreachable_since: Gauge,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("tether_agent");
        let m = Metrics {
            tracked_processes: Gauge::default(),
            process_svids: Gauge::default(),
            svids_issued: Counter::default(),
            svids_rotated: Counter::default(),
            svids_destroyed: Counter::default(),
            attestation_errors: Counter::default(),
            api: Family::default(),
            decisions: Family::default(),
            held: Family::default(),
            tunnels: Family::default(),
            injected: Family::default(),
            credential_reads: Family::default(),
            credential_fetches: Family::default(),
            // 1 ms to about 8 s.
            credential_fetch_seconds: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 14),
            ),
            server_connected: Gauge::default(),
            server_unreachable_since: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "server_connected",
            "1 while a server streams this node's registry; 0 while none answers (enforcement and held SVIDs go on)",
            m.server_connected.clone(),
        );
        registry.register(
            "server_unreachable_since_seconds",
            "Unix time the agent lost every server, 0 while connected",
            m.server_unreachable_since.clone(),
        );
        registry.register(
            "tracked_processes",
            "Live processes the agent has attested",
            m.tracked_processes.clone(),
        );
        registry.register(
            "process_svids",
            "X.509-SVIDs currently held for live processes",
            m.process_svids.clone(),
        );
        registry.register(
            "svids_issued",
            "Per-process X.509-SVIDs issued",
            m.svids_issued.clone(),
        );
        registry.register(
            "svids_rotated",
            "Per-process X.509-SVIDs replaced at half-life",
            m.svids_rotated.clone(),
        );
        registry.register(
            "svids_destroyed",
            "Per-process SVIDs and keys destroyed (process exit or identity removed)",
            m.svids_destroyed.clone(),
        );
        registry.register(
            "attestation_errors",
            "Processes that could not be attested",
            m.attestation_errors.clone(),
        );
        registry.register(
            "workload_api_requests",
            "SPIFFE Workload API calls by method and result",
            m.api.clone(),
        );
        registry.register(
            "connect_decisions",
            "Kernel decisions on protected destinations by verdict, identity and service",
            m.decisions.clone(),
        );
        registry.register(
            "held_connections",
            "Connections of processes not attested yet, held by the kernel for the agent, by outcome",
            m.held.clone(),
        );
        registry.register(
            "mesh_tunnels",
            "Mesh tunnels by direction (outbound, inbound) and outcome",
            m.tunnels.clone(),
        );
        registry.register(
            "injected_connections",
            "Connections the agent carried to add a credential, by protocol and outcome",
            m.injected.clone(),
        );
        registry.register(
            "credential_reads",
            "Credential filesystem requests by outcome (allowed, denied, error)",
            m.credential_reads.clone(),
        );
        registry.register(
            "credential_fetches",
            "Credentials fetched or exchanged for a process, by source kind and outcome",
            m.credential_fetches.clone(),
        );
        registry.register(
            "credential_fetch_seconds",
            "Time to fetch or refresh one credential",
            m.credential_fetch_seconds.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    pub fn workload_api_requests(&self, method: &str, code: &str) {
        self.api
            .get_or_create(&ApiLabels {
                method: method.to_string(),
                code: code.to_string(),
            })
            .inc();
    }

    pub fn mesh_connection(&self, direction: &str, outcome: &str) {
        self.tunnels
            .get_or_create(&TunnelLabels {
                direction: direction.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn injected_connection(&self, protocol: &str, outcome: &str) {
        self.injected
            .get_or_create(&InjectLabels {
                protocol: protocol.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn credential_read(&self, outcome: &str) {
        self.credential_reads
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn credential_fetch(&self, source_kind: &str, outcome: &str) {
        self.credential_fetches
            .get_or_create(&FetchLabels {
                source_kind: source_kind.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn held_connection(&self, outcome: &str) {
        self.held
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn connect_decision(&self, verdict: &str, identity: &str, service: &str) {
        self.decisions
            .get_or_create(&DecisionLabels {
                verdict: verdict.into(),
                identity: identity.into(),
                service: service.into(),
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves GET /metrics. Anything else gets 404; malformed requests are
/// dropped by hyper without affecting other connections.
pub async fn serve(
    metrics: Arc<Metrics>,
    addr: SocketAddr,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding metrics on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    Ok((
        bound,
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                };
                let m = metrics.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: Request<hyper::body::Incoming>| {
                            let m = m.clone();
                            async move {
                                let resp = if req.uri().path() == "/metrics" {
                                    Response::builder()
                                    .header("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")
                                    .body(Full::new(Bytes::from(m.encode())))
                                } else {
                                    Response::builder()
                                        .status(404)
                                        .body(Full::new(Bytes::from_static(b"not found\n")))
                                };
                                Ok::<_, std::convert::Infallible>(resp.unwrap_or_default())
                            }
                        },
                    );
                    let io = hyper_util::rt::TokioIo::new(tcp);
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(30),
                        hyper::server::conn::http1::Builder::new().serve_connection(io, svc),
                    )
                    .await;
                });
            }
        }),
    ))
}
