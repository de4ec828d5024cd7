//! Listeners: the node API over TLS 1.3 on TCP, and the admin API on a
//! root-only Unix socket.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tether_proto::tether::admin_server::AdminServer;
use tether_proto::tether::node_server::NodeServer;
use tether_spiffe::SpiffeId;
use tether_tls::SwappableCert;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use crate::State;
use crate::admin_api::AdminApi;
use crate::node_api::NodeApi;

/// A client that has not finished its TLS handshake by then is dropped, so
/// slow or garbage clients cannot hold resources.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many handshakes in progress at once.
const MAX_HANDSHAKES: usize = 256;

/// Who is on the other end of a node API connection.
#[derive(Clone, Debug)]
pub struct NodePeer {
    pub addr: SocketAddr,
    /// The verified node SVID's ID; None before attestation.
    pub id: Option<SpiffeId>,
    /// Its serial number (lowercase hex): only the node's current SVID is
    /// accepted, so a renewed one (or a copy of an old one) opens nothing.
    pub serial: Option<String>,
}

/// The serial number of a verified peer leaf, as the store keeps it.
fn leaf_serial(certs: Option<&[rustls::pki_types::CertificateDer<'_>]>) -> Option<String> {
    use x509_parser::prelude::FromDer as _;
    let leaf = certs?.first()?;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(leaf).ok()?;
    Some(
        cert.raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

pub type TlsConn = tether_proto::uds::Tagged<tokio_rustls::server::TlsStream<TcpStream>, NodePeer>;

pub async fn serve_node_api(
    state: Arc<State>,
    addr: SocketAddr,
    cert: Arc<SwappableCert>,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding node API on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let td = state.td.clone();
    let verifier = tether_tls::SpiffeClientVerifier::new(
        state.bundle.clone(),
        Arc::new(move |id: &SpiffeId| {
            id.trust_domain() == &td && id.path().starts_with("/tether/node/")
        }),
        true,
    );
    let config = Arc::new(tether_tls::server_config(cert, verifier, &[b"h2"])?);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<TlsConn>>(64);
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let accept_loop = tokio::spawn(async move {
        loop {
            let (tcp, peer_addr) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "node API accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let id = tether_tls::peer_id(tls.get_ref().1.peer_certificates());
                        let serial = leaf_serial(tls.get_ref().1.peer_certificates());
                        let _ = tx
                            .send(Ok(TlsConn::new(
                                tls,
                                NodePeer {
                                    addr: peer_addr,
                                    id,
                                    serial,
                                },
                            )))
                            .await;
                    }
                    Ok(Err(e)) => {
                        tracing::info!(peer = %peer_addr, error = %e, "node API TLS handshake failed")
                    }
                    Err(_) => tracing::info!(peer = %peer_addr, "node API TLS handshake timed out"),
                }
            });
        }
    });
    let svc = NodeServer::new(NodeApi { state });
    let serve = tokio::spawn(async move {
        let res = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(svc)
            .serve_with_incoming(ReceiverStream::new(rx))
            .await;
        accept_loop.abort();
        if let Err(e) = res {
            tracing::error!(error = %e, "node API stopped");
        }
    });
    Ok((bound, serve))
}

/// The admin socket accepts only root (and the server's own user): socket
/// permissions are the first gate, the peer's credentials the second.
pub fn serve_admin_api(state: Arc<State>, path: &Path) -> anyhow::Result<JoinHandle<()>> {
    let listener = tether_proto::uds::bind(path, 0o600)
        .map_err(|e| anyhow::anyhow!("binding admin socket {}: {e}", path.display()))?;
    let me = tether_proto::uds::euid();
    let incoming = async_stream_of(listener, move |s: &tokio::net::UnixStream| {
        s.peer_cred()
            .map(|c| c.uid() == 0 || c.uid() == me)
            .unwrap_or(false)
    });
    let svc = AdminServer::new(AdminApi { state });
    Ok(tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await
        {
            tracing::error!(error = %e, "admin API stopped");
        }
    }))
}

/// Accepted Unix connections that pass `allow`, as a stream for tonic.
pub fn async_stream_of(
    listener: tokio::net::UnixListener,
    allow: impl Fn(&tokio::net::UnixStream) -> bool + Send + 'static,
) -> ReceiverStream<std::io::Result<tokio::net::UnixStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    if allow(&s) {
                        if tx.send(Ok(s)).await.is_err() {
                            return;
                        }
                    } else {
                        tracing::warn!("admin socket: refused a connection from a non-root user");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}
