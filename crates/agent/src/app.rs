//! The app plane: builds every part from the configuration, wires the
//! edges (observers in their fixed order, the hold path's ports, the
//! signer), owns the tasks and stops them. The only module that sees every
//! other one.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::audit::AuditLog;
use crate::clock::{self, Clock};
use crate::deliver::{credfs, fetch, workload_api};
use crate::identity;
use crate::identity::node::NodeConn;
use crate::metrics::{self, Metrics};
use crate::proxy::{hold, inject, mesh, netns};
use crate::state::registry::Registry;
use crate::state::tracker::{self, Tracker};
use crate::{admin, enforce, host_addrs};
use tether_proto::tether::WatchRequest;
use tether_spiffe::{Bundle, TrustDomain};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct AgentConfig {
    /// host:port of the server's node API.
    pub server: String,
    pub trust_domain: TrustDomain,
    /// Trust for the first connection to the server (before attestation).
    pub bootstrap_bundle: Option<Bundle>,
    pub join_token: Option<String>,
    /// x509pop instead of a join token: the node's certificate chain (PEM,
    /// from the operator's node CA) and its key (PEM, ECDSA P-256).
    pub x509pop: Option<(PathBuf, PathBuf)>,
    pub node_name: String,
    pub data_dir: PathBuf,
    pub workload_socket: PathBuf,
    pub admin_socket: PathBuf,
    pub metrics: Option<SocketAddr>,
    pub rescan_interval: Duration,
    /// Kernel enforcement at connect(); None leaves connections untouched
    /// (the process tracepoints that record what each process executed are
    /// loaded either way: attestation rests on them).
    pub enforce: Option<EnforceConfig>,
    /// bpffs directory for pinned programs and maps, so records, verdicts
    /// and closed destinations survive the agent (None: nothing pinned).
    pub bpf_pin_dir: Option<PathBuf>,
    /// Bounds on hashing executables.
    pub hash_limits: tether_attest::HashLimits,
    /// A process in the host's mount namespace whose root is the host's
    /// view, when the agent runs in a container (None: the agent's own).
    pub host_pid: Option<i32>,
    /// Time source for policy conditions (injectable for tests).
    pub clock: Clock,
    /// Audit log file (JSON lines): connection decisions and credential
    /// reads. Records also go to `tether events` either way.
    pub audit_log: Option<PathBuf>,
    /// Mount point of the credential filesystem (None: not mounted).
    pub credentials_dir: Option<PathBuf>,
}

pub struct EnforceConfig {
    /// cgroup v2 directory whose processes are enforced (the root cgroup
    /// in production; a test's own cgroup in tests).
    pub cgroup: PathBuf,
    /// Loopback port where the kernel holds connections of processes not
    /// attested yet (0: any free port).
    pub hold_port: u16,
    /// Mesh port (the same on every node): where this agent accepts
    /// tunnels, and where it opens them at other nodes. None: no mesh.
    pub mesh_port: Option<u16>,
}

impl AgentConfig {
    pub fn new(
        server: String,
        trust_domain: TrustDomain,
        node_name: String,
        data_dir: PathBuf,
    ) -> Self {
        AgentConfig {
            server,
            trust_domain,
            bootstrap_bundle: None,
            join_token: None,
            x509pop: None,
            node_name,
            data_dir,
            workload_socket: PathBuf::from("/run/tether/workload.sock"),
            admin_socket: PathBuf::from("/run/tether/agent.sock"),
            metrics: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            rescan_interval: Duration::from_secs(30),
            enforce: None,
            bpf_pin_dir: Some(PathBuf::from(DEFAULT_PIN_DIR)),
            hash_limits: tether_attest::HashLimits::default(),
            host_pid: None,
            clock: clock::system(),
            audit_log: None,
            credentials_dir: Some(PathBuf::from(credfs::DEFAULT_DIR)),
        }
    }
}

pub struct RunningAgent {
    /// The credential filesystem's session; unmounted first on drop.
    credentials: Option<fuser::BackgroundSession>,
    credentials_dir: Option<PathBuf>,
    pub tracker: Arc<Tracker>,
    enforcement: Option<Arc<enforce::Enforcement>>,
    pub metrics: Arc<Metrics>,
    pub metrics_addr: Option<SocketAddr>,
    pub node: Arc<NodeConn>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        // Nothing readable under the mount point from here on: detached
        // first (a plain unmount fails while a workload holds a descriptor
        // or its cwd there), then the session ends.
        if let Some(dir) = &self.credentials_dir {
            credfs::detach(dir);
        }
        drop(self.credentials.take());
        for t in &self.tasks {
            t.abort();
        }
        // Keys go now, not when the last per-connection task lets go.
        self.tracker.shutdown();
        // The hold listener is gone with the tasks: stop sending held
        // connections to a port anyone could now bind. (A crash needs no
        // such step: the exit tracepoint frees the agent's entry.)
        if let Some(e) = &self.enforcement {
            let _ = e.kernel().clear_hold();
            let _ = e.kernel().remove_process(std::process::id());
        }
    }
}

/// Where programs and maps are pinned unless configured otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/tether";

/// Loads the kernel half: always the process tracepoints (exec records and
/// marks), and the socket hooks on the enforced cgroup when there is one.
fn load_kernel(cfg: &AgentConfig) -> anyhow::Result<Arc<tether_kernel::Enforcer>> {
    if let Some(dir) = &cfg.bpf_pin_dir {
        ensure_bpffs(dir)?;
    }
    let kcfg = tether_kernel::EnforcerConfig {
        cgroup: cfg.enforce.as_ref().map(|e| e.cgroup.clone()),
        pin_dir: cfg.bpf_pin_dir.clone(),
    };
    let what = match &kcfg.cgroup {
        Some(cg) => format!("kernel enforcement for {}", cg.display()),
        None => "the kernel's process tracking (attestation needs what each process really \
                 executed; the agent must run as root)"
            .to_string(),
    };
    tether_kernel::Enforcer::load(&kcfg)
        .map(Arc::new)
        .map_err(|e| anyhow::anyhow!("loading {what}: {e}"))
}

/// The default pin directory lives on /sys/fs/bpf, which some hosts do
/// not mount: mount a bpffs there (as systemd does) when it is missing.
fn ensure_bpffs(dir: &std::path::Path) -> anyhow::Result<()> {
    let root = std::path::Path::new("/sys/fs/bpf");
    if !dir.starts_with(root) {
        return Ok(()); // the kernel crate checks other directories
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, at, fs) = (f.next(), f.next(), f.next());
        at == Some("/sys/fs/bpf") && fs == Some("bpf")
    });
    if mounted {
        return Ok(());
    }
    std::fs::create_dir_all(root)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", root.display()))?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let r = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        anyhow::bail!(
            "mounting a bpffs at /sys/fs/bpf for {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
    tracing::info!("mounted a bpffs at /sys/fs/bpf");
    Ok(())
}

/// Makes the agent process non-dumpable: no core dumps with keys in them,
/// and other same-uid processes cannot ptrace it or read its memory.
pub fn harden_process() {
    // SAFETY: prctl(PR_SET_DUMPABLE) takes integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if rc != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "could not make the agent non-dumpable");
    }
}

/// Attests the node (or reuses its persisted SVID), waits for the first
/// registry snapshot, and starts every agent service.
pub async fn start(cfg: AgentConfig) -> anyhow::Result<RunningAgent> {
    let servers = crate::identity::node::Servers::parse(&cfg.server)
        .map_err(|e| anyhow::anyhow!("--server: {e}"))?;
    let pop = match &cfg.x509pop {
        Some((cert, key)) => Some(crate::identity::node::X509Pop::load(cert, key)?),
        None => None,
    };
    let node = NodeConn::establish(
        &servers,
        &cfg.trust_domain,
        cfg.bootstrap_bundle.clone(),
        cfg.join_token.as_deref(),
        pop.as_ref(),
        &cfg.node_name,
        &cfg.data_dir,
    )
    .await?;
    let metrics = Metrics::new();

    // First snapshot before serving, so the first Workload API caller is
    // judged against the real registry rather than an empty one.
    let mut stream = node
        .client()
        .watch(WatchRequest::default())
        .await
        .map_err(|s| anyhow::anyhow!("watching the registry: {}", s.message()))?
        .into_inner();
    let first = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("watching the registry: {}", s.message()))?
        .context("server closed the watch stream")?;
    let reg = Registry::from_state(&cfg.trust_domain, &first)?;
    node.set_bundle(reg.bundle.clone())?;
    let (reg_tx, reg_rx) = watch::channel(Arc::new(reg));
    let kernel = load_kernel(&cfg)?;
    let audit = Arc::new(AuditLog::open(
        cfg.audit_log.as_deref(),
        cfg.node_name.clone(),
        cfg.clock.clone(),
    )?);

    // Built in dependency order, each part handed what it uses: the
    // process table (tracker) tells enforcement and the tunnel table about
    // processes; hold, mesh, Workload API and admin read the table. Nothing
    // points back, so dropping the agent frees everything.
    let enforcement = match &cfg.enforce {
        Some(_) => {
            let e = enforce::Enforcement::new(
                kernel.clone(),
                cfg.node_name.clone(),
                cfg.clock.clone(),
                audit.clone(),
                metrics.clone(),
                reg_rx.borrow().clone(),
            )?;
            e.spawn_event_pump();
            // On a change, the kernel's local addresses are rewritten and the
            // node SVID is renewed to vouch for the new set.
            let (enf, node2, rt) = (e.clone(), node.clone(), tokio::runtime::Handle::current());
            let mut first = true;
            host_addrs::follow(move |addrs| {
                enf.set_host_addrs(addrs);
                if !std::mem::take(&mut first) {
                    let node = node2.clone();
                    rt.spawn(async move { node.follow_addresses().await });
                }
            });
            // A node SVID persisted before an address change vouches for
            // the old set.
            node.follow_addresses().await;
            Some(e)
        }
        None => None,
    };
    let tunnels = mesh::Tunnels::new();
    // Verdicts first: they must be in place before a process's SVIDs exist.
    let mut observers: Vec<Arc<dyn tracker::ProcessObserver>> = Vec::new();
    if let Some(e) = &enforcement {
        observers.push(e.clone());
    }
    observers.push(tunnels.clone());
    // Fetched credentials go when their process does.
    let held = Arc::new(fetch::Held::default());
    observers.push(held.clone());
    // Hold listeners in the network namespaces of workload processes.
    let namespaces = match (&cfg.enforce, &enforcement) {
        (Some(ec), Some(e)) => {
            let ns = netns::Namespaces::new(ec.hold_port)?;
            let asked = ns.clone();
            e.on_netns_request(move |pid, netns| asked.request(pid, Some(netns)));
            let scope = tether_kernel::cgroup2_mount().and_then(|m| {
                ec.cgroup
                    .strip_prefix(&m)
                    .ok()
                    .map(|rel| format!("/{}", rel.display()).replace("//", "/"))
            });
            observers.push(Arc::new(netns::NetnsObserver {
                namespaces: ns.clone(),
                scope,
            }));
            Some(ns)
        }
        _ => None,
    };
    let tracker = Tracker::new(
        reg_rx,
        Arc::new(identity::NodeSigner(node.clone())),
        metrics.clone(),
        Some(kernel.clone()),
        cfg.hash_limits,
        cfg.host_pid,
        observers,
    );
    // The node's intercepting CA (HTTPS injection): its bundle is a file of
    // bound processes, its leaves what the injector presents to them.
    let interceptor = identity::intercept::Interceptor::new(&cfg.node_name);
    // One fetcher (and cache) for files and injected connections alike.
    let fetcher = Arc::new(fetch::Fetcher::new(
        tracker.clone(),
        held.clone(),
        node.clone(),
        audit.clone(),
        metrics.clone(),
    ));

    let mut tasks = Vec::new();
    let mut mesh = None;
    if let (Some(ec), Some(e)) = (&cfg.enforce, &enforcement) {
        // Listen before telling the kernel where to send held connections.
        let hold = hold::HoldListeners::bind(ec.hold_port).await?;
        let me = std::process::id();
        let hcfg = tether_kernel::HoldConfig {
            port: hold.port,
            v4: true,
            v6: hold.has_v6(),
        };
        // Without holding (an old kernel, say), unattested processes are
        // refused instead: safe, but their first connection can fail.
        let registered = e
            .kernel()
            .set_agent(me)
            .and_then(|()| e.kernel().set_hold(me, hcfg));
        match registered {
            Ok(()) => {
                tracing::info!(cgroup = %ec.cgroup.display(), hold_port = hold.port, "kernel enforcement active")
            }
            Err(err) => tracing::warn!(
                cgroup = %ec.cgroup.display(), error = %err,
                "kernel enforcement active, but connections of processes not attested yet cannot be held; they are refused"
            ),
        }
        if let Some(port) = ec.mesh_port {
            // Without the mesh port, meshed Services are unreachable from
            // here (their connections are reset): closed, not open.
            match mesh::Mesh::bind(port).await {
                Ok(listeners) => {
                    let m = mesh::Mesh::new(
                        port,
                        node.clone(),
                        tracker.clone(),
                        e.clone(),
                        metrics.clone(),
                        tunnels.clone(),
                    )?;
                    tasks.extend(m.serve(listeners));
                    tracing::info!(mesh_port = port, "mesh active");
                    mesh = Some(m);
                }
                Err(err) => tracing::error!(
                    error = %err,
                    "mesh disabled: connections to meshed Services are refused, and this node's meshed Services take no tunnels"
                ),
            }
        }
        let ports = Arc::new(hold::AgentPorts {
            tracker: tracker.clone(),
            enf: e.clone(),
        });
        let Some(namespaces) = namespaces.clone() else {
            anyhow::bail!("enforcement without its namespace table");
        };
        let injector = inject::Injector::new(
            tracker.clone(),
            fetcher.clone(),
            audit.clone(),
            metrics.clone(),
            tunnels.clone(),
            interceptor.clone(),
            namespaces.clone(),
        );
        let hold_port = hold.port;
        let (hold_tasks, server) = hold.serve(
            ports,
            mesh.clone(),
            Some(injector),
            metrics.clone(),
            namespaces.clone(),
        );
        tasks.extend(hold_tasks);
        let kernel_side: Arc<dyn netns::NetnsKernel> = e.clone();
        tasks.extend(namespaces.run(hold_port, kernel_side, server));
    }
    tasks.push(tokio::spawn(watch_registry(
        node.clone(),
        cfg.trust_domain.clone(),
        reg_tx,
        Some(stream),
        metrics.clone(),
    )));
    tasks.push(tokio::spawn(renew_node_svid(node.clone())));

    let (ev_tx, ev_rx) = tokio::sync::mpsc::channel(4096);
    // With enforcement, the kernel's tracepoints report workload
    // processes in every namespace too (the proc connector answers only in
    // the initial network namespace); duplicates only re-check.
    if let Some(e) = &enforcement {
        let tx = ev_tx.clone();
        e.on_proc_event(move |ev| {
            if let Err(tokio::sync::mpsc::error::TrySendError::Full(_)) = tx.try_send(ev) {
                let _ = tx.try_send(tether_attest::ProcEvent::Overrun);
            }
        });
    }
    tracker::spawn_event_reader(ev_tx)?;
    tracker.rescan().await;
    if let Some(e) = &enforcement
        && e.kernel().adopted()
    {
        e.collect_adopted();
    }
    tasks.push(tokio::spawn(tracker::run(
        tracker.clone(),
        ev_rx,
        cfg.rescan_interval,
    )));

    tasks.push(workload_api::serve(
        tracker.clone(),
        metrics.clone(),
        &cfg.workload_socket,
    )?);
    let credentials = match &cfg.credentials_dir {
        Some(dir) => {
            let fs = credfs::CredFs::new(
                tracker.clone(),
                fetcher.clone(),
                interceptor.clone(),
                audit.clone(),
                metrics.clone(),
                tokio::runtime::Handle::current(),
            );
            // Without it no credential is delivered (closed); the rest of
            // the agent still serves.
            match credfs::mount(fs, dir) {
                Ok(session) => {
                    tracing::info!(dir = %dir.display(), "credential filesystem mounted");
                    Some(session)
                }
                Err(e) => {
                    tracing::error!(error = %e, "credential filesystem not mounted; no credential files are delivered");
                    None
                }
            }
        }
        None => None,
    };
    tasks.push(admin::serve(
        admin::AdminApi {
            tracker: tracker.clone(),
            enforcement: enforcement.clone(),
            mesh,
            tunnels: tunnels.clone(),
            node: cfg.node_name.clone(),
            audit: audit.clone(),
            held: held.clone(),
        },
        &cfg.admin_socket,
    )?);
    let metrics_addr = match cfg.metrics {
        Some(addr) => {
            let (bound, t) = metrics::serve(metrics.clone(), addr).await?;
            tasks.push(t);
            Some(bound)
        }
        None => None,
    };
    tracing::info!(
        node = %cfg.node_name,
        workload_api = %cfg.workload_socket.display(),
        admin = %cfg.admin_socket.display(),
        metrics = %metrics_addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        "agent started"
    );
    Ok(RunningAgent {
        credentials_dir: credentials.as_ref().and(cfg.credentials_dir.clone()),
        credentials,
        tracker,
        enforcement,
        metrics,
        metrics_addr,
        node,
        tasks,
    })
}

/// Follows the server's watch stream, reconnecting with backoff. While the
/// server is unreachable the agent keeps its last registry and SVIDs.
async fn watch_registry(
    node: Arc<NodeConn>,
    td: TrustDomain,
    tx: watch::Sender<Arc<Registry>>,
    mut stream: Option<tonic::Streaming<tether_proto::tether::NodeState>>,
    metrics: Arc<Metrics>,
) {
    let mut backoff = Duration::from_millis(200);
    // Set when the stream breaks; sent with every watch until a server
    // answers, so the outage is recorded where operators look.
    let mut unreachable_since: Option<i64> = None;
    metrics.server_connected.set(1);
    loop {
        let mut s = match stream.take() {
            Some(s) => s,
            None => match node
                .client()
                .watch(WatchRequest {
                    unreachable_since: unreachable_since.unwrap_or(0),
                })
                .await
            {
                Ok(r) => r.into_inner(),
                Err(e) => {
                    tracing::warn!(error = %e.message(), "registry watch failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            },
        };
        loop {
            match s.message().await {
                Ok(Some(state)) => {
                    backoff = Duration::from_millis(200);
                    if let Some(t) = unreachable_since.take() {
                        tracing::info!(
                            server = node.servers.current(),
                            offline_secs = clock::unix_now() - t,
                            "a server answers again"
                        );
                    }
                    metrics.server_connected.set(1);
                    metrics.server_unreachable_since.set(0);
                    match Registry::from_state(&td, &state) {
                        Ok(reg) => {
                            let bundle_changed = tx.borrow().bundle != reg.bundle;
                            if bundle_changed && let Err(e) = node.set_bundle(reg.bundle.clone()) {
                                tracing::warn!(error = %e, "could not persist bundle");
                            }
                            tracing::info!(
                                revision = reg.revision,
                                identities = reg.identities.len(),
                                "registry updated"
                            );
                            tx.send_replace(Arc::new(reg));
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "bad registry snapshot from server; keeping the previous one")
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e.message(), "registry watch interrupted");
                    break;
                }
            }
        }
        if unreachable_since.is_none() {
            let now = clock::unix_now();
            unreachable_since = Some(now);
            metrics.server_connected.set(0);
            metrics.server_unreachable_since.set(now);
            tracing::warn!(
                "lost the server; enforcing with the last registry and keeping SVIDs until they expire"
            );
        }
        tokio::time::sleep(backoff).await;
    }
}

/// Renews the node SVID at half its lifetime, retrying on failure.
async fn renew_node_svid(node: Arc<NodeConn>) {
    loop {
        let id = node.identity();
        let now = clock::unix_now();
        let at = id.issued_at + (id.expires_at - id.issued_at) / 2;
        let wait = (at - now).max(1) as u64;
        tokio::time::sleep(Duration::from_secs(wait)).await;
        if let Err(e) = node.renew().await {
            tracing::warn!(error = %e, "node SVID renewal failed; retrying in 5s");
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }
}
