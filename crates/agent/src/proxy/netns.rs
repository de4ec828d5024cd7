//! The network namespaces the agent serves.
//!
//! Every network namespace has its own loopback, so a connection the kernel
//! holds, tunnels or injects in a container's namespace cannot reach the
//! agent's listener on the host's 127.0.0.1. The agent keeps a hold
//! listener in each namespace where a workload process runs, and makes the
//! upstream connection of a held connection from the namespace it came
//! from: `127.0.0.1:6379` in a container is that container's own Redis,
//! never the host's.
//!
//! A socket belongs to the namespace it was created in, whoever uses it
//! later, so only `socket(2)` needs to run inside: one worker thread enters
//! the namespace, creates the socket and returns to the agent's own. Binding,
//! listening, accepting and connecting happen on the async runtime.
//!
//! The kernel learns each listener through `hold_ns` (namespace cookie ->
//! port). A connection from a namespace the agent has not reached yet waits
//! in the kernel (its SYN is dropped and retried) and asks for it with a
//! `HOOK_NETNS` event; processes the tracker attests ask for theirs too, so
//! the listener is usually there before the first connect. A namespace the
//! agent cannot serve (no loopback address, the limit reached) is recorded
//! as refused: its connections fail at connect, audited, rather than wait.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Namespaces served at once besides the agent's own: each costs two
/// listening sockets and keeps its namespace alive while it has processes.
pub const MAX_NAMESPACES: usize = 1024;
/// A namespace that could not be served is tried again after this long
/// (its loopback may have come up since).
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// A namespace is kept at least this long after it was served, so one
/// provisioned for a connection whose process is not tracked yet stays.
const SWEEP_GRACE: Duration = Duration::from_secs(30);
/// How often namespaces without processes are let go.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// Requests waiting for the provisioning task; beyond it they are dropped
/// (the kernel asks again with the next connection).
const QUEUE: usize = 1024;

/// Accepts on a new namespace's listeners (the hold path's accept loop).
pub trait Acceptor: Send + Sync {
    fn accept_on(&self, listener: TcpListener, netns: u64) -> JoinHandle<()>;
}

/// What the agent knows of one served namespace.
struct Served {
    cookie: u64,
    /// The namespace file (keeps its identity while we hold it).
    ns: Arc<OwnedFd>,
    tasks: Vec<JoinHandle<()>>,
    since: Instant,
}

impl Drop for Served {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[derive(Default)]
struct State {
    /// By namespace inode (what /proc/PID/ns/net names).
    served: HashMap<u64, Served>,
    /// Namespace inode -> cookie, for socket creation by cookie.
    by_cookie: HashMap<u64, u64>,
    /// Inodes that could not be served: when, and the cookie the kernel
    /// has a refusal under (None: the kernel refuses them by itself, a
    /// namespace of another user namespace), to forget once they are gone.
    refused: HashMap<u64, (Instant, Option<u64>)>,
}

/// A request to create a socket inside a namespace.
struct Job {
    ns: Arc<OwnedFd>,
    domain: libc::c_int,
    reply: oneshot::Sender<io::Result<OwnedFd>>,
}

pub struct Namespaces {
    /// The agent's own namespace: cookie and inode.
    home: u64,
    home_ino: u64,
    /// The port tried first in every namespace (the agent's own hold port).
    port: std::sync::atomic::AtomicU16,
    state: Mutex<State>,
    worker: std::sync::mpsc::SyncSender<Job>,
    requests: mpsc::Sender<(i32, Option<u64>)>,
    rx: Mutex<Option<mpsc::Receiver<(i32, Option<u64>)>>>,
}

/// What the kernel side needs: record a listener, a refusal, a removal.
pub trait NetnsKernel: Send + Sync {
    fn serve(&self, netns: u64, port: u16, v6: bool) -> Result<(), String>;
    fn refuse(&self, netns: u64) -> Result<(), String>;
    fn forget(&self, netns: u64) -> Result<(), String>;
}

impl Namespaces {
    /// `port`: the agent's hold port, tried first everywhere (set again by
    /// [`run`](Self::run)).
    pub fn new(port: u16) -> io::Result<Arc<Self>> {
        let home = tether_kernel::netns_cookie()?;
        let home_ino = std::fs::metadata("/proc/thread-self/ns/net")?.ino();
        let home_fd: OwnedFd = std::fs::File::open("/proc/thread-self/ns/net")?.into();
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(QUEUE);
        std::thread::Builder::new()
            .name("netns".into())
            .spawn(move || worker(home_fd, rx))?;
        let (requests, req_rx) = mpsc::channel(QUEUE);
        Ok(Arc::new(Namespaces {
            home,
            home_ino,
            port: port.into(),
            state: Mutex::new(State::default()),
            worker: tx,
            requests,
            rx: Mutex::new(Some(req_rx)),
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The agent's own namespace cookie.
    pub fn home(&self) -> u64 {
        self.home
    }

    /// Asks for a listener in `pid`'s namespace (non-blocking; a full queue
    /// drops the request, and the kernel asks again). With `netns`, only if
    /// that is still the namespace `pid` is in (the kernel's request names
    /// the socket's namespace; the pid may have moved or been reused).
    pub fn request(&self, pid: i32, netns: Option<u64>) {
        let _ = self.requests.try_send((pid, netns));
    }

    /// A TCP socket in the namespace with this cookie, connected to `dst`:
    /// the upstream of a connection made there.
    pub async fn connect(&self, netns: u64, dst: SocketAddr) -> io::Result<TcpStream> {
        let socket = self.socket(netns, dst.is_ipv6()).await?;
        socket.connect(dst).await
    }

    async fn socket(&self, netns: u64, v6: bool) -> io::Result<TcpSocket> {
        if netns == self.home {
            return if v6 {
                TcpSocket::new_v6()
            } else {
                TcpSocket::new_v4()
            };
        }
        let ns = {
            let st = self.state();
            st.by_cookie
                .get(&netns)
                .and_then(|ino| st.served.get(ino))
                .map(|s| s.ns.clone())
        };
        let Some(ns) = ns else {
            return Err(io::Error::other(format!(
                "network namespace {netns} is not served by this agent"
            )));
        };
        let fd = self.in_namespace(ns, v6).await?;
        // SAFETY: a TCP socket fd we own, handed over whole.
        Ok(unsafe { TcpSocket::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) })
    }

    async fn in_namespace(&self, ns: Arc<OwnedFd>, v6: bool) -> io::Result<OwnedFd> {
        let (reply, rx) = oneshot::channel();
        let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
        self.worker
            .try_send(Job { ns, domain, reply })
            .map_err(|_| io::Error::other("the namespace worker is busy or gone"))?;
        rx.await
            .map_err(|_| io::Error::other("the namespace worker is gone"))?
    }

    /// Serves requests until the agent stops: provisions namespaces as they
    /// are asked for. Call once.
    pub fn run(
        self: &Arc<Self>,
        port: u16,
        kernel: Arc<dyn NetnsKernel>,
        acceptor: Arc<dyn Acceptor>,
    ) -> Option<JoinHandle<()>> {
        let mut rx = self.rx.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        self.port.store(port, std::sync::atomic::Ordering::Relaxed);
        // (An earlier agent's namespaces were forgotten by set_hold.)
        let me = self.clone();
        Some(tokio::spawn(async move {
            let mut sweep = tokio::time::interval(SWEEP_EVERY);
            loop {
                tokio::select! {
                    req = rx.recv() => match req {
                        Some((pid, netns)) => me.provision(pid, netns, &*kernel, &*acceptor).await,
                        None => return,
                    },
                    _ = sweep.tick() => {
                        let live = tokio::task::spawn_blocking(live_inodes)
                            .await
                            .unwrap_or_default();
                        me.sweep(&live, &*kernel);
                    }
                }
            }
        }))
    }

    async fn provision(
        &self,
        pid: i32,
        expect: Option<u64>,
        kernel: &dyn NetnsKernel,
        acceptor: &dyn Acceptor,
    ) {
        let path = format!("/proc/{pid}/ns/net");
        let Ok(file) = std::fs::File::open(&path) else {
            return; // gone: nothing to serve
        };
        let Ok(ino) = file.metadata().map(|m| m.ino()) else {
            return;
        };
        {
            let st = self.state();
            if ino == self.home_ino || st.served.contains_key(&ino) {
                return;
            }
            if st
                .refused
                .get(&ino)
                .is_some_and(|(t, _)| t.elapsed() < RETRY_AFTER)
            {
                return;
            }
        }
        let ns = Arc::new(OwnedFd::from(file));
        // A namespace some user made in a user namespace of their own is
        // theirs to rewire (routes, netfilter): the agent does not work
        // there, and connections from it that need the agent are refused.
        // Containers of a root engine have namespaces the host's user
        // namespace owns.
        if !owned_by_host_userns(&ns) {
            tracing::warn!(
                pid,
                "a network namespace owned by another user namespace; connections there that need the agent are refused"
            );
            // The kernel refuses these itself (to_agent): no map entry, so
            // they cannot fill it.
            self.state().refused.insert(ino, (Instant::now(), None));
            return;
        }
        match self.listen_in(ns.clone()).await {
            Ok((cookie, v4, v6)) => {
                if cookie == self.home {
                    return;
                }
                if expect.is_some_and(|c| c != cookie) {
                    tracing::debug!(pid, "the process is no longer in the namespace that asked");
                    return;
                }
                let full = self.state().served.len() >= MAX_NAMESPACES;
                if full {
                    tracing::error!(
                        pid,
                        netns = cookie,
                        limit = MAX_NAMESPACES,
                        "too many network namespaces to serve; connections there that need the agent are refused"
                    );
                    self.refused(ino, cookie, kernel);
                    return;
                }
                let port = match v4.local_addr() {
                    Ok(a) => a.port(),
                    Err(_) => return self.refused(ino, cookie, kernel),
                };
                let mut tasks = vec![acceptor.accept_on(v4, cookie)];
                let has_v6 = v6.is_some();
                if let Some(v6) = v6 {
                    tasks.push(acceptor.accept_on(v6, cookie));
                }
                {
                    let mut st = self.state();
                    st.served.insert(
                        ino,
                        Served {
                            cookie,
                            ns,
                            tasks,
                            since: Instant::now(),
                        },
                    );
                    st.by_cookie.insert(cookie, ino);
                    st.refused.remove(&ino);
                }
                match kernel.serve(cookie, port, has_v6) {
                    Ok(()) => {
                        tracing::info!(pid, netns = cookie, port, "serving a network namespace")
                    }
                    Err(e) => {
                        tracing::error!(pid, netns = cookie, error = %e, "cannot record the namespace's listener; its connections wait");
                    }
                }
            }
            Err((cookie, e)) => {
                tracing::warn!(pid, error = %e, "cannot listen in the process's network namespace; connections there that need the agent are refused");
                if let Some(cookie) = cookie {
                    self.refused(ino, cookie, kernel);
                }
            }
        }
    }

    fn refused(&self, ino: u64, cookie: u64, kernel: &dyn NetnsKernel) {
        self.state()
            .refused
            .insert(ino, (Instant::now(), Some(cookie)));
        if let Err(e) = kernel.refuse(cookie) {
            tracing::error!(netns = cookie, error = %e, "cannot record the refusal");
        }
    }

    /// Binds the hold listeners inside the namespace: the agent's own port
    /// if free there, else any. Returns the namespace cookie.
    #[allow(clippy::type_complexity)]
    async fn listen_in(
        &self,
        ns: Arc<OwnedFd>,
    ) -> Result<(u64, TcpListener, Option<TcpListener>), (Option<u64>, io::Error)> {
        let s4 = self
            .in_namespace(ns.clone(), false)
            .await
            .map_err(|e| (None, e))?;
        let cookie = tether_kernel::socket_netns_cookie(s4.as_fd()).map_err(|e| (None, e))?;
        let e = |e: io::Error| (Some(cookie), e);
        // SAFETY: a TCP socket fd we own.
        let s4 = unsafe { TcpSocket::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(s4)) };
        let want = self.port.load(std::sync::atomic::Ordering::Relaxed);
        let port = match s4.bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), want)) {
            Ok(()) => want,
            Err(err) if err.kind() == io::ErrorKind::AddrInUse => {
                s4.bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0))
                    .map_err(e)?;
                s4.local_addr().map_err(e)?.port()
            }
            Err(err) => return Err(e(err)),
        };
        let v4 = s4.listen(1024).map_err(e)?;
        let v6 = match self.in_namespace(ns, true).await {
            Ok(fd) => {
                // SAFETY: as above.
                let s6 = unsafe { TcpSocket::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) };
                // Without [::1] there, IPv6 connects that need the agent
                // are refused (the kernel sees no HOLD_V6).
                s6.bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port))
                    .and_then(|()| s6.listen(1024))
                    .ok()
            }
            Err(_) => None,
        };
        Ok((cookie, v4, v6))
    }

    /// Drops namespaces none of `live` (inodes of namespaces with
    /// processes) names any more: their listeners would keep them alive.
    pub fn sweep(&self, live: &HashSet<u64>, kernel: &dyn NetnsKernel) {
        let mut forget_refused = Vec::new();
        let gone: Vec<Served> = {
            let mut st = self.state();
            let dead: Vec<u64> = st
                .served
                .iter()
                .filter(|(ino, s)| !live.contains(ino) && s.since.elapsed() >= SWEEP_GRACE)
                .map(|(ino, _)| *ino)
                .collect();
            let mut out = Vec::new();
            for ino in dead {
                if let Some(s) = st.served.remove(&ino) {
                    st.by_cookie.remove(&s.cookie);
                    out.push(s);
                }
            }
            // Refusals of namespaces that are gone: their kernel entries
            // too (cookies are never reused, so each would stay forever).
            st.refused.retain(|ino, (t, cookie)| {
                let keep = live.contains(ino) || t.elapsed() < RETRY_AFTER;
                if !keep {
                    forget_refused.extend(cookie.take());
                }
                keep
            });
            out
        };
        for cookie in forget_refused {
            let _ = kernel.forget(cookie);
        }
        for s in gone {
            let _ = kernel.forget(s.cookie);
            tracing::debug!(netns = s.cookie, "no longer serving a network namespace");
        }
    }
}

/// Whether the namespace's owning user namespace is the agent's own (the
/// host's), by NS_GET_USERNS.
fn owned_by_host_userns(ns: &OwnedFd) -> bool {
    const NS_GET_USERNS: libc::c_ulong = 0xb701;
    let Ok(mine) = std::fs::metadata("/proc/self/ns/user") else {
        return false;
    };
    // SAFETY: ioctl(2) on a namespace fd we hold; it returns a new fd.
    let fd = unsafe { libc::ioctl(ns.as_raw_fd(), NS_GET_USERNS) };
    if fd < 0 {
        return false;
    }
    // SAFETY: a new fd nobody else owns.
    let owner = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    owner
        .metadata()
        .is_ok_and(|m| (m.dev(), m.ino()) == (mine.dev(), mine.ino()))
}

/// Inodes of the network namespaces of every process on the host.
fn live_inodes() -> HashSet<u64> {
    tether_attest::list_pids()
        .into_iter()
        .filter_map(netns_inode)
        .collect()
}

/// The namespace inode of a process, if it is still there.
pub fn netns_inode(pid: i32) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

/// Creates sockets inside namespaces. setns(2) affects only this thread;
/// if it cannot return home, it stops taking work rather than create
/// sockets in the wrong place.
fn worker(home: OwnedFd, rx: std::sync::mpsc::Receiver<Job>) {
    while let Ok(job) = rx.recv() {
        // SAFETY: setns on an fd we hold open, for this thread only.
        if unsafe { libc::setns(job.ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            let _ = job.reply.send(Err(io::Error::last_os_error()));
            continue;
        }
        // SAFETY: plain socket(2); ownership is taken below.
        let fd = unsafe {
            libc::socket(
                job.domain,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        let made = if fd < 0 {
            Err(io::Error::last_os_error())
        } else {
            // SAFETY: just created, owned by nobody else.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        };
        // SAFETY: as above, back to the agent's own namespace.
        if unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            tracing::error!(error = %io::Error::last_os_error(),
                "the namespace worker cannot return to the agent's network namespace; no more namespaces are served");
            let _ = job
                .reply
                .send(Err(io::Error::other("namespace worker stuck")));
            return;
        }
        let _ = job.reply.send(made);
    }
}

/// Asks for a listener in the namespace of every attested process inside
/// the enforced cgroup, so it is usually there before its first connect.
pub struct NetnsObserver {
    pub namespaces: Arc<Namespaces>,
    /// The enforced cgroup as /proc/PID/cgroup names it (None: every
    /// process).
    pub scope: Option<String>,
}

impl crate::state::tracker::ProcessObserver for NetnsObserver {
    fn process_updated(
        &self,
        info: &tether_attest::ProcessInfo,
        _exec: (tether_kernel::ExecId, u64),
        _identities: Vec<String>,
        _spiffe_ids: Vec<String>,
    ) {
        if let Some(scope) = &self.scope {
            let inside = info
                .cgroup
                .strip_prefix(scope.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
            if !inside {
                return;
            }
        }
        let Some(ino) = netns_inode(info.pid) else {
            return;
        };
        let ns = &self.namespaces;
        let known = ino == ns.home_ino || {
            let st = ns.state();
            st.served.contains_key(&ino)
                || st
                    .refused
                    .get(&ino)
                    .is_some_and(|(t, _)| t.elapsed() < RETRY_AFTER)
        };
        if !known {
            ns.request(info.pid, None);
        }
    }
}

impl NetnsKernel for crate::enforce::Enforcement {
    fn serve(&self, netns: u64, port: u16, v6: bool) -> Result<(), String> {
        let cfg = tether_kernel::HoldConfig { port, v4: true, v6 };
        self.kernel()
            .serve_netns(netns, cfg)
            .map_err(|e| e.to_string())
    }
    fn refuse(&self, netns: u64) -> Result<(), String> {
        self.kernel().refuse_netns(netns).map_err(|e| e.to_string())
    }
    fn forget(&self, netns: u64) -> Result<(), String> {
        self.kernel().forget_netns(netns).map_err(|e| e.to_string())
    }
}
