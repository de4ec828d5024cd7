//! Loading, attaching, pinning and adopting the enforcement programs, and
//! the typed view of their maps.
//!
//! # Pinning and adoption
//!
//! With a `pin_dir` (on a bpffs) the state lives in the kernel independently
//! of the agent process:
//!
//! ```text
//! <pin_dir>/maps/{services,procs,execs,policy,events,stats,config,scope,redirects,guards,
//!                 guarded,held,hold_ns,local_ports,local_addrs,scratch}
//! <pin_dir>/links/{connect4,connect6,sendmsg4,sendmsg6,peer4,peer6,sockops,ingress,egress,socket,
//!                  sockopt,exec,fork,exit,sysenter,sysexit}
//! ```
//!
//! The sk_msg program is attached to the pinned `guarded` map itself
//! (BPF_PROG_ATTACH): it stays with the map, and a new agent's attach
//! replaces it.
//!
//! ```text
//! ```
//!
//! Pinned links keep the programs attached when the agent dies, so protected
//! destinations stay closed (fail closed). A starting agent that finds pins:
//!
//! 1. checks every pinned map against what this build's programs expect
//!    (type, key/value size, capacity) and refuses an incompatible one;
//! 2. loads its programs against the *pinned* maps, so processes, verdicts
//!    and services written by the previous agent stay in force;
//! 3. swaps its programs into the pinned cgroup links with BPF_LINK_UPDATE,
//!    which is atomic: the hook always has a program;
//! 4. for the tracepoint links (which cannot be updated) attaches the new
//!    program first, then renames its pin over the old one (bpffs rename is
//!    atomic) and drops the old link, which the kernel releases with its
//!    last fd. For a moment both run; their map updates are idempotent.
//!
//! Dropping an `Enforcer` that pinned leaves everything in force; that is
//! the point. [`Enforcer::detach_all`] removes it. Without a `pin_dir`,
//! everything is owned by the `Enforcer` and detached when it is dropped.
//!
//! # Holding connections of processes not attested yet
//!
//! A TCP connect() to a protected destination by a process the kernel has no
//! identity for is never allowed blind and never refused for being early:
//! while an agent is registered ([`Enforcer::set_agent`],
//! [`Enforcer::set_hold`]) the hook rewrites it to the agent's hold listener
//! on loopback and records the original destination with the socket.
//! sock_ops publishes that record under the client's local port once
//! connect() has chosen it, and the agent claims it on accept
//! ([`Enforcer::take_held`]), attests the process, and completes or refuses
//! the connection. getpeername() keeps reporting the original destination.
//! Without a live agent (its `procs` entry dies with it) the hook refuses
//! with EPERM instead, as it does for UDP, which cannot be held.

use std::{
    fs::{self, File},
    io,
    net::{IpAddr, SocketAddr},
    os::{
        fd::{AsFd as _, BorrowedFd, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard, PoisonError},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, LpmTrie, Map, MapData, MapError, MapInfo, MapType, PerCpuArray,
        lpm_trie::Key,
    },
    programs::{
        CgroupSkb, CgroupSock, CgroupSockAddr, CgroupSockopt, RawTracePoint, SkMsg, SockOps,
    },
};

use crate::{
    KernelError,
    abi::{
        DstKeyData, DstPrefix, ExecRaw, ExecRecord, HOLD_V4, HOLD_V6, HeldConnection, HeldKey,
        HeldRaw, HoldCfg, HoldNs, PROC_AGENT, PolicyKey, ProcState, Proto, STAT_ALLOW, STAT_DENY,
        STAT_DROPPED_EVENTS, STAT_HELD, STAT_INGRESS_DROPPED, STAT_INJECT, STAT_MAX, STAT_MESH,
        STAT_SEND_DENIED, STAT_SOCKET_DENIED, STAT_TAINTED, STAT_UNATTESTED, STAT_UNGUARDED,
        ScopeValue, ServiceFlags, SvcValue, VERDICT_F_ALLOW, VERDICT_F_INJECT, VerdictValue,
    },
    error::{chain, map_err, program_err},
    events::EventReader,
    sys,
};

pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tether.bpf.o"));

/// Where to attach and whether to pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnforcerConfig {
    /// The cgroup v2 directory whose processes (and descendants) are
    /// enforced: the cgroup2 root in production, a test's own cgroup in
    /// tests. None: only the process tracepoints (exec records and marks,
    /// for attestation), no socket hooks.
    pub cgroup: Option<PathBuf>,
    /// A directory on a bpffs for pinned maps and links. With it, the
    /// programs stay attached (fail closed) while the agent is down, and the
    /// next [`Enforcer::load`] adopts them. Without it, dropping the
    /// [`Enforcer`] detaches everything.
    pub pin_dir: Option<PathBuf>,
}

/// Counters summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub allowed: u64,
    pub denied: u64,
    pub unattested: u64,
    /// Connections of unattested processes redirected to the agent.
    pub held: u64,
    /// Allowed connects redirected to the agent's mesh tunnel.
    pub meshed: u64,
    /// Allowed connects redirected to the agent for credential injection.
    pub injected: u64,
    /// Packets from other hosts dropped at a Service agents front.
    pub ingress_dropped: u64,
    /// Processes marked (ptrace, memory written, PR_SET_MM, traced at exec).
    pub tainted: u64,
    /// Sends refused on protected connections (a socket used by a process
    /// that neither made it nor may reach its Service).
    pub sends_denied: u64,
    /// Protected connections the guard map had no room for.
    pub unguarded: u64,
    /// Raw and packet sockets refused.
    pub sockets_denied: u64,
    /// Events lost because the ring buffer was full (the decisions were
    /// still made and counted above).
    pub dropped_events: u64,
}

/// What the kernel knows about a process's last exec, read *before*
/// attesting it and handed back to [`Enforcer::set_process`]. If the process
/// execs in between, the ids differ and the kernel ignores the entry, so a
/// verdict computed for one image can never apply to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExecId(pub u64);

/// A process entry as stored in `procs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessEntry {
    pub subject: u32,
    pub exec_id: ExecId,
    /// Process start (CLOCK_BOOTTIME ns), from its exec record.
    pub start_ns: u64,
}

/// A `policy` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerdictEntry {
    pub subject: u32,
    pub service_id: u32,
    pub allow: bool,
    /// Allowed connects are redirected to the agent for injection.
    pub inject: bool,
    pub rule: u32,
    /// CLOCK_BOOTTIME ns after which it no longer allows; 0: never.
    pub expires_ns: u64,
}

/// What [`Enforcer::detach_all`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DetachReport {
    /// Socket-hook links forced off the cgroup (pinned ones and ones a live
    /// agent holds). Tracepoint links cannot be forced off; once unpinned
    /// they are released with their last fd (they only maintain map
    /// entries, they never block anything).
    pub links_detached: usize,
    /// Pin files removed.
    pub pins_removed: usize,
}

/// Where the agent holds connections of processes not attested yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldConfig {
    /// Port of the agent's hold listeners on 127.0.0.1 and/or [::1].
    pub port: u16,
    /// A listener on 127.0.0.1 exists (IPv4 and IPv4-mapped flows).
    pub v4: bool,
    /// A listener on [::1] exists (IPv6 flows).
    pub v6: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum CgroupProg {
    SockAddr,
    SockOps,
    Skb,
    Sock,
    Sockopt,
}

#[derive(Clone, Copy)]
enum Attach {
    /// `enum bpf_attach_type` value, to recognise our pinned link.
    Cgroup {
        attach_type: u32,
        kind: CgroupProg,
    },
    RawTp(&'static str),
    /// An sk_msg verdict program on the named sockhash.
    SockMap(&'static str),
}

struct ProgSpec {
    /// Function name in bpf/tether.bpf.c (also the kernel's program name).
    func: &'static str,
    /// File name of the pinned link.
    link: &'static str,
    hook: Attach,
}

const fn sock_addr(attach_type: u32) -> Attach {
    Attach::Cgroup {
        attach_type,
        kind: CgroupProg::SockAddr,
    }
}

/// The sk_msg program goes first (sockets added to `guarded` before it is
/// attached would not get it), then sock_ops: once connect4/6 start holding
/// connections, the port record each held connection needs must already be
/// published.
const PROGRAMS: [ProgSpec; 17] = [
    ProgSpec {
        func: "tether_send",
        link: "send",
        hook: Attach::SockMap("guarded"),
    },
    ProgSpec {
        func: "tether_sockops",
        link: "sockops",
        hook: Attach::Cgroup {
            attach_type: 3,
            kind: CgroupProg::SockOps,
        },
    },
    ProgSpec {
        func: "tether_ingress",
        link: "ingress",
        hook: Attach::Cgroup {
            attach_type: 0, // BPF_CGROUP_INET_INGRESS
            kind: CgroupProg::Skb,
        },
    },
    ProgSpec {
        func: "tether_egress",
        link: "egress",
        hook: Attach::Cgroup {
            attach_type: 1, // BPF_CGROUP_INET_EGRESS
            kind: CgroupProg::Skb,
        },
    },
    ProgSpec {
        func: "tether_socket",
        link: "socket",
        hook: Attach::Cgroup {
            attach_type: 2, // BPF_CGROUP_INET_SOCK_CREATE
            kind: CgroupProg::Sock,
        },
    },
    ProgSpec {
        func: "tether_sockopt",
        link: "sockopt",
        hook: Attach::Cgroup {
            attach_type: 22, // BPF_CGROUP_SETSOCKOPT
            kind: CgroupProg::Sockopt,
        },
    },
    ProgSpec {
        func: "tether_peer4",
        link: "peer4",
        hook: sock_addr(29),
    },
    ProgSpec {
        func: "tether_peer6",
        link: "peer6",
        hook: sock_addr(30),
    },
    ProgSpec {
        func: "tether_connect4",
        link: "connect4",
        hook: sock_addr(10),
    },
    ProgSpec {
        func: "tether_connect6",
        link: "connect6",
        hook: sock_addr(11),
    },
    ProgSpec {
        func: "tether_sendmsg4",
        link: "sendmsg4",
        hook: sock_addr(14),
    },
    ProgSpec {
        func: "tether_sendmsg6",
        link: "sendmsg6",
        hook: sock_addr(15),
    },
    ProgSpec {
        func: "tether_exec",
        link: "exec",
        hook: Attach::RawTp("sched_process_exec"),
    },
    ProgSpec {
        func: "tether_fork",
        link: "fork",
        hook: Attach::RawTp("sched_process_fork"),
    },
    ProgSpec {
        func: "tether_exit",
        link: "exit",
        hook: Attach::RawTp("sched_process_exit"),
    },
    ProgSpec {
        func: "tether_sysenter",
        link: "sysenter",
        hook: Attach::RawTp("sys_enter"),
    },
    ProgSpec {
        func: "tether_sysexit",
        link: "sysexit",
        hook: Attach::RawTp("sys_exit"),
    },
];

struct MapSpec {
    name: &'static str,
    kind: MapType,
    key: u32,
    value: u32,
    max_entries: u32,
}

/// Must match the definitions in bpf/tether.bpf.c; checked against pinned
/// maps before adopting them.
const MAPS: [MapSpec; 16] = [
    MapSpec {
        name: "services",
        kind: MapType::LpmTrie,
        key: 24,
        value: 8,
        max_entries: 16384,
    },
    MapSpec {
        name: "procs",
        kind: MapType::Hash,
        key: 4,
        value: 24,
        max_entries: 65536,
    },
    MapSpec {
        name: "execs",
        kind: MapType::Hash,
        key: 4,
        value: 80,
        max_entries: 65536,
    },
    MapSpec {
        name: "policy",
        kind: MapType::Hash,
        key: 8,
        value: 16,
        max_entries: 65536,
    },
    MapSpec {
        name: "events",
        kind: MapType::RingBuf,
        key: 0,
        value: 0,
        max_entries: 256 * 1024,
    },
    MapSpec {
        name: "stats",
        kind: MapType::PerCpuArray,
        key: 4,
        value: 8,
        max_entries: STAT_MAX,
    },
    MapSpec {
        name: "config",
        kind: MapType::Array,
        key: 4,
        value: 16,
        max_entries: 1,
    },
    MapSpec {
        name: "scope",
        kind: MapType::Array,
        key: 4,
        value: 16,
        max_entries: 1,
    },
    MapSpec {
        name: "redirects",
        kind: MapType::SkStorage,
        key: 4,
        value: 88,
        max_entries: 0,
    },
    MapSpec {
        name: "guards",
        kind: MapType::SkStorage,
        key: 4,
        value: 32,
        max_entries: 0,
    },
    MapSpec {
        name: "guarded",
        kind: MapType::SockHash,
        key: 8,
        value: 8,
        max_entries: 262144,
    },
    MapSpec {
        name: "held",
        kind: MapType::LruHash,
        key: 32,
        value: 96,
        max_entries: 16384,
    },
    MapSpec {
        name: "hold_ns",
        kind: MapType::Hash,
        key: 8,
        value: 8,
        max_entries: 4096,
    },
    MapSpec {
        name: "local_ports",
        kind: MapType::Hash,
        key: 4,
        value: 8,
        max_entries: 4096,
    },
    MapSpec {
        name: "local_addrs",
        kind: MapType::Hash,
        key: 16,
        value: 4,
        max_entries: 4096,
    },
    MapSpec {
        name: "scratch",
        kind: MapType::PerCpuArray,
        key: 4,
        value: 256,
        max_entries: 1,
    },
];

/// A link we keep an fd to. Dropping it closes the fd only: a pinned link
/// stays attached, an unpinned one is released.
type HeldLink = OwnedFd;

/// The loaded programs, their links and typed handles to their maps.
pub struct Enforcer {
    /// Owns the programs and, without a pin dir, the links (dropping it
    /// detaches them). Declared first so it is dropped first.
    _bpf: Ebpf,
    _links: Vec<HeldLink>,
    services: Mutex<LpmTrie<MapData, DstKeyData, SvcValue>>,
    procs: Mutex<HashMap<MapData, u32, ProcState>>,
    execs: HashMap<MapData, u32, ExecRaw>,
    policy: Mutex<HashMap<MapData, PolicyKey, VerdictValue>>,
    stats: PerCpuArray<MapData, u64>,
    config: Mutex<Array<MapData, HoldCfg>>,
    scope: Mutex<Array<MapData, ScopeValue>>,
    held: Mutex<HashMap<MapData, HeldKey, HeldRaw>>,
    hold_ns: Mutex<HashMap<MapData, u64, HoldNs>>,
    local_ports: Mutex<HashMap<MapData, u32, SvcValue>>,
    local_addrs: Mutex<HashMap<MapData, [u8; 16], u32>>,
    cgroup_id: u64,
    cgroup_level: u32,
    events_id: u32,
    adopted: bool,
}

impl std::fmt::Debug for Enforcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enforcer")
            .field("events_id", &self.events_id)
            .field("adopted", &self.adopted)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a map half-written (each
    // call is one syscall), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn local_port_key(proto: Proto, port: u16) -> u32 {
    (u32::from(proto.number()) << 16) | u32::from(port)
}

/// An address as the hooks key it: IPv4 as IPv4-mapped IPv6.
fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip.to_canonical() {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> KernelError + 'a {
    move |source| KernelError::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

/// Opens a cgroup v2 directory and returns it with its cgroup id (the
/// directory's inode number on cgroup2).
fn open_cgroup(path: &Path) -> Result<(File, u64), KernelError> {
    let ft = sys::fs_type(path).map_err(io_err(path, "statfs"))?;
    if ft != sys::CGROUP2_SUPER_MAGIC {
        return Err(KernelError::NotCgroup2 {
            path: path.to_owned(),
        });
    }
    let f = File::open(path).map_err(io_err(path, "open"))?;
    let ino = f.metadata().map_err(io_err(path, "stat"))?.ino();
    Ok((f, ino))
}

struct PinDir {
    maps: PathBuf,
    links: PathBuf,
}

impl PinDir {
    fn new(dir: &Path) -> Self {
        Self {
            maps: dir.join("maps"),
            links: dir.join("links"),
        }
    }

    fn prepare(dir: &Path) -> Result<Self, KernelError> {
        fs::create_dir_all(dir).map_err(io_err(dir, "create pin directory"))?;
        if sys::fs_type(dir).map_err(io_err(dir, "statfs"))? != sys::BPF_FS_MAGIC {
            return Err(KernelError::NotBpffs {
                path: dir.to_owned(),
            });
        }
        let p = Self::new(dir);
        fs::create_dir_all(&p.maps).map_err(io_err(&p.maps, "create pin directory"))?;
        fs::create_dir_all(&p.links).map_err(io_err(&p.links, "create pin directory"))?;
        Ok(p)
    }

    /// Refuses a pinned map that this build's programs would misread.
    /// Returns whether the map was pinned.
    fn check_map(&self, spec: &MapSpec) -> Result<bool, KernelError> {
        let path = self.maps.join(spec.name);
        let info = match MapInfo::from_pin(&path) {
            Ok(info) => info,
            Err(MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => {
                return Ok(false);
            }
            Err(e) => return Err(map_err(spec.name, "open pinned map", &e)),
        };
        let kind = info
            .map_type()
            .map_err(|e| map_err(spec.name, "read pinned map type", &e))?;
        let found = (kind, info.key_size(), info.value_size(), info.max_entries());
        let want = (spec.kind, spec.key, spec.value, spec.max_entries);
        if found != want {
            return Err(KernelError::IncompatiblePin {
                map: spec.name,
                path,
                mismatch: format!(
                    "found {:?} key {} value {} entries {}, need {:?} key {} value {} entries {}",
                    found.0, found.1, found.2, found.3, want.0, want.1, want.2, want.3
                ),
            });
        }
        Ok(true)
    }

    fn link_path(&self, spec: &ProgSpec) -> PathBuf {
        self.links.join(spec.link)
    }
}

/// Pins a freshly attached link at `path`, replacing whatever is pinned
/// there without ever leaving the name empty: pin under a temporary name,
/// then rename over.
fn pin_link(link: OwnedFd, spec: &ProgSpec, path: &Path) -> Result<HeldLink, KernelError> {
    // bpffs refuses names with a dot, so no `.new`.
    let tmp = path.with_file_name(format!("{}-new", spec.link));
    let link_err = |op: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| KernelError::Link {
            link: spec.link,
            path,
            op,
            source,
        }
    };
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(link_err("remove stale pin", &tmp)(e)),
    }
    sys::obj_pin(link.as_fd(), &tmp).map_err(link_err("pin", &tmp))?;
    fs::rename(&tmp, path).map_err(link_err("rename pin into place", path))?;
    Ok(link)
}

/// Forces an old link off its hook after its replacement is in place. Raw
/// tracepoint links cannot be detached (EOPNOTSUPP, still on 6.18); they go
/// away when their last fd closes, which, with the pin replaced, is ours.
fn retire_link(spec: &ProgSpec, old: OwnedFd) {
    if let Err(e) = sys::link_detach(old.as_fd()) {
        tracing::debug!(link = spec.link, error = %e, "old link not detachable; released on close");
    }
}

fn open_pinned_link(spec: &ProgSpec, path: &Path) -> Result<Option<OwnedFd>, KernelError> {
    match sys::obj_get(path) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(source) => Err(KernelError::Link {
            link: spec.link,
            path: path.to_owned(),
            op: "open pinned link",
            source,
        }),
    }
}

fn create_cgroup_link(
    spec: &ProgSpec,
    attach_type: u32,
    prog: BorrowedFd<'_>,
    cgroup: &File,
) -> Result<OwnedFd, KernelError> {
    sys::link_create(prog, cgroup.as_fd(), attach_type).map_err(|source| KernelError::Link {
        link: spec.link,
        path: PathBuf::from("bpf(BPF_LINK_CREATE)"),
        op: "attach to the cgroup (needs bpf_link, kernel 5.7+)",
        source,
    })
}

fn install_cgroup(
    spec: &ProgSpec,
    attach_type: u32,
    prog: BorrowedFd<'_>,
    cgroup: &File,
    cgroup_id: u64,
    pins: Option<&PinDir>,
) -> Result<HeldLink, KernelError> {
    let Some(pins) = pins else {
        // Unpinned: detached when the Enforcer drops this fd.
        return create_cgroup_link(spec, attach_type, prog, cgroup);
    };
    let path = pins.link_path(spec);
    let old = open_pinned_link(spec, &path)?;
    if let Some(old) = old {
        let info = sys::link_info(old.as_fd()).map_err(|source| KernelError::Link {
            link: spec.link,
            path: path.clone(),
            op: "read link info",
            source,
        })?;
        if info.link_type == sys::BPF_LINK_TYPE_CGROUP
            && info.cgroup_id == cgroup_id
            && info.attach_type == attach_type
        {
            sys::link_update(old.as_fd(), prog).map_err(|source| KernelError::Link {
                link: spec.link,
                path: path.clone(),
                op: "replace program (BPF_LINK_UPDATE)",
                source,
            })?;
            return Ok(old);
        }
        // Pinned for another cgroup (the configuration changed): attach
        // here first, then retire the old link.
        tracing::info!(
            link = spec.link,
            "pinned link targets another cgroup; replacing it"
        );
        let held = pin_link(
            create_cgroup_link(spec, attach_type, prog, cgroup)?,
            spec,
            &path,
        )?;
        retire_link(spec, old);
        return Ok(held);
    }
    pin_link(
        create_cgroup_link(spec, attach_type, prog, cgroup)?,
        spec,
        &path,
    )
}

fn install_raw_tp(
    spec: &ProgSpec,
    tp: &'static str,
    prog: BorrowedFd<'_>,
    pins: Option<&PinDir>,
) -> Result<HeldLink, KernelError> {
    let link = sys::raw_tracepoint_open(tp, prog).map_err(|source| KernelError::Link {
        link: spec.link,
        path: PathBuf::from(tp),
        op: "attach to the raw tracepoint",
        source,
    })?;
    let Some(pins) = pins else {
        return Ok(link);
    };
    let path = pins.link_path(spec);
    // Tracepoint links cannot swap programs; the new one is already
    // attached, so replacing the pin leaves no moment without a handler.
    let old = open_pinned_link(spec, &path)?;
    let held = pin_link(link, spec, &path)?;
    if let Some(old) = old {
        retire_link(spec, old);
    }
    Ok(held)
}

/// An owned copy of a loaded program's fd (the borrow of the program ends
/// here; the kernel object lives as long as either fd).
fn prog_fd(
    spec: &ProgSpec,
    fd: Result<&aya::programs::ProgramFd, aya::programs::ProgramError>,
) -> Result<OwnedFd, KernelError> {
    let fd = fd.map_err(|e| program_err(spec.func, "get fd", &e))?;
    fd.as_fd()
        .try_clone_to_owned()
        .map_err(|source| KernelError::Io {
            path: PathBuf::from(spec.func),
            op: "duplicate program fd",
            source,
        })
}

fn take_map<T>(bpf: &mut Ebpf, name: &'static str) -> Result<T, KernelError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = bpf.take_map(name).ok_or_else(|| KernelError::Map {
        map: name,
        op: "find in object",
        detail: "not defined in tether.bpf.o".to_owned(),
    })?;
    T::try_from(map).map_err(|e| map_err(name, "open", &e))
}

/// Depth of a cgroup below the cgroup2 root it is mounted from: what
/// `bpf_get_current_ancestor_cgroup_id` takes to name it.
fn cgroup_level(path: &Path) -> u32 {
    let root = crate::cgroup2_mount();
    let rel = match &root {
        Some(r) => path.strip_prefix(r).unwrap_or(path),
        None => path,
    };
    rel.components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .count() as u32
}

/// Attaches an sk_msg program to one of the object's sockhash maps.
fn attach_to_map(
    bpf: &Ebpf,
    spec: &ProgSpec,
    map: &'static str,
    prog: BorrowedFd<'_>,
) -> Result<(), KernelError> {
    let data = match bpf.map(map) {
        Some(Map::SockHash(d)) => d,
        _ => {
            return Err(KernelError::Map {
                map,
                op: "find in object",
                detail: "missing or not a sockhash".to_owned(),
            });
        }
    };
    // BPF_SK_MSG_VERDICT
    sys::prog_attach(data.fd().as_fd(), prog, 7).map_err(|source| KernelError::Link {
        link: spec.link,
        path: PathBuf::from(map),
        op: "attach the sk_msg program to its sockhash",
        source,
    })
}

impl Enforcer {
    /// Loads the programs, attaches the socket programs (decision,
    /// getpeername, sock_ops, ingress, socket creation and option hooks, and
    /// the sk_msg program) to `cfg.cgroup` when there is one, and the five
    /// process and syscall tracepoints, and (with `cfg.pin_dir`) pins or
    /// adopts them; see the module docs.
    pub fn load(cfg: &EnforcerConfig) -> Result<Self, KernelError> {
        let cgroup = cfg.cgroup.as_deref().map(open_cgroup).transpose()?;
        let pins = cfg.pin_dir.as_deref().map(PinDir::prepare).transpose()?;

        let mut loader = EbpfLoader::new();
        let mut adopted = false;
        if let Some(pins) = &pins {
            for spec in &MAPS {
                adopted |= pins.check_map(spec)?;
                // aya opens the pinned map if there is one, else creates
                // and pins it.
                loader.map_pin_path(spec.name, pins.maps.join(spec.name));
            }
        }
        let mut bpf = loader
            .load(OBJECT)
            .map_err(|e| KernelError::Load { detail: chain(&e) })?;

        let mut links = Vec::new();
        for spec in &PROGRAMS {
            let cgroup = match (spec.hook, &cgroup) {
                (Attach::Cgroup { .. } | Attach::SockMap(_), None) => continue,
                (_, c) => c.as_ref(),
            };
            let prog = bpf
                .program_mut(spec.func)
                .ok_or_else(|| KernelError::Program {
                    program: spec.func,
                    action: "find in object",
                    detail: "not defined in tether.bpf.o".to_owned(),
                })?;
            let held = match spec.hook {
                Attach::Cgroup { attach_type, kind } => {
                    let fd = match kind {
                        CgroupProg::SockOps => {
                            let p: &mut SockOps = prog
                                .try_into()
                                .map_err(|e| program_err(spec.func, "type check", &e))?;
                            p.load().map_err(|e| program_err(spec.func, "load", &e))?;
                            prog_fd(spec, p.fd())?
                        }
                        CgroupProg::SockAddr => {
                            let p: &mut CgroupSockAddr = prog
                                .try_into()
                                .map_err(|e| program_err(spec.func, "type check", &e))?;
                            p.load().map_err(|e| program_err(spec.func, "load", &e))?;
                            prog_fd(spec, p.fd())?
                        }
                        CgroupProg::Skb => {
                            let p: &mut CgroupSkb = prog
                                .try_into()
                                .map_err(|e| program_err(spec.func, "type check", &e))?;
                            p.load().map_err(|e| program_err(spec.func, "load", &e))?;
                            prog_fd(spec, p.fd())?
                        }
                        CgroupProg::Sock => {
                            let p: &mut CgroupSock = prog
                                .try_into()
                                .map_err(|e| program_err(spec.func, "type check", &e))?;
                            p.load().map_err(|e| program_err(spec.func, "load", &e))?;
                            prog_fd(spec, p.fd())?
                        }
                        CgroupProg::Sockopt => {
                            let p: &mut CgroupSockopt = prog
                                .try_into()
                                .map_err(|e| program_err(spec.func, "type check", &e))?;
                            p.load().map_err(|e| program_err(spec.func, "load", &e))?;
                            prog_fd(spec, p.fd())?
                        }
                    };
                    let Some((cgroup, cgroup_id)) = cgroup else {
                        continue;
                    };
                    install_cgroup(
                        spec,
                        attach_type,
                        fd.as_fd(),
                        cgroup,
                        *cgroup_id,
                        pins.as_ref(),
                    )?
                }
                Attach::RawTp(tp) => {
                    let p: &mut RawTracePoint = prog
                        .try_into()
                        .map_err(|e| program_err(spec.func, "type check", &e))?;
                    p.load().map_err(|e| program_err(spec.func, "load", &e))?;
                    let fd = prog_fd(spec, p.fd())?;
                    install_raw_tp(spec, tp, fd.as_fd(), pins.as_ref())?
                }
                Attach::SockMap(map) => {
                    let p: &mut SkMsg = prog
                        .try_into()
                        .map_err(|e| program_err(spec.func, "type check", &e))?;
                    p.load().map_err(|e| program_err(spec.func, "load", &e))?;
                    let fd = prog_fd(spec, p.fd())?;
                    attach_to_map(&bpf, spec, map, fd.as_fd())?;
                    // The map holds the attachment; keep the program's fd
                    // with the others for the Enforcer's lifetime.
                    fd
                }
            };
            links.push(held);
        }

        let events: MapData = match bpf.take_map("events") {
            Some(Map::RingBuf(data)) => data,
            _ => {
                return Err(KernelError::Map {
                    map: "events",
                    op: "find in object",
                    detail: "missing or not a ring buffer".to_owned(),
                });
            }
        };
        let events_id = events
            .info()
            .map_err(|e| map_err("events", "read info", &e))?
            .id();

        let enforcer = Self {
            services: Mutex::new(take_map(&mut bpf, "services")?),
            procs: Mutex::new(take_map(&mut bpf, "procs")?),
            execs: take_map(&mut bpf, "execs")?,
            policy: Mutex::new(take_map(&mut bpf, "policy")?),
            stats: take_map(&mut bpf, "stats")?,
            config: Mutex::new(take_map(&mut bpf, "config")?),
            scope: Mutex::new(take_map(&mut bpf, "scope")?),
            held: Mutex::new(take_map(&mut bpf, "held")?),
            hold_ns: Mutex::new(take_map(&mut bpf, "hold_ns")?),
            local_ports: Mutex::new(take_map(&mut bpf, "local_ports")?),
            local_addrs: Mutex::new(take_map(&mut bpf, "local_addrs")?),
            cgroup_id: cgroup.as_ref().map_or(0, |(_, id)| *id),
            cgroup_level: cfg.cgroup.as_deref().map_or(0, cgroup_level),
            events_id,
            adopted,
            _links: links,
            _bpf: bpf,
        };
        // The syscall hooks see every process; they act on the workload
        // (the enforced cgroup) only. Set before anything can be held.
        enforcer.set_scope(0)?;
        Ok(enforcer)
    }

    /// Whether [`load`](Self::load) found pinned maps from a previous agent
    /// and reused them. The agent should then reconcile: list what is in
    /// the maps and remove what its current state no longer contains.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Marks a destination as protected by `service_id`, reached directly.
    pub fn set_service(&self, dst: DstPrefix, service_id: u32) -> Result<(), KernelError> {
        self.set_service_flags(dst, service_id, ServiceFlags::default())
    }

    /// Marks a destination as protected by `service_id`, reached as `flags`
    /// say.
    pub fn set_service_flags(
        &self,
        dst: DstPrefix,
        service_id: u32,
        flags: ServiceFlags,
    ) -> Result<(), KernelError> {
        let (len, data) = dst.to_key()?;
        let v = SvcValue {
            service_id,
            flags: flags.bits(),
        };
        lock(&self.services)
            .insert(&Key::new(len, data), v, 0)
            .map_err(|e| map_err("services", "insert", &e))
    }

    /// Unprotects a destination. Removing an absent one is not an error.
    pub fn remove_service(&self, dst: DstPrefix) -> Result<(), KernelError> {
        let (len, data) = dst.to_key()?;
        match lock(&self.services).remove(&Key::new(len, data)) {
            Err(e) if !is_not_found(&e) => Err(map_err("services", "remove", &e)),
            _ => Ok(()),
        }
    }

    /// Marks (proto, `port`) as a Service of this host (`port` 0: every
    /// port): connects and datagrams to it at any local destination
    /// (loopback, unspecified, multicast, broadcast, any address in
    /// [`set_local_addrs`](Self::set_local_addrs)) are judged as reaching
    /// `service_id`, and for a meshed one packets from other hosts to the
    /// port are dropped (unless permissive).
    pub fn set_local_port(
        &self,
        proto: Proto,
        port: u16,
        service_id: u32,
        flags: ServiceFlags,
    ) -> Result<(), KernelError> {
        let v = SvcValue {
            service_id,
            flags: flags.bits(),
        };
        lock(&self.local_ports)
            .insert(local_port_key(proto, port), v, 0)
            .map_err(|e| map_err("local_ports", "insert", &e))
    }

    /// Removing an absent port is not an error.
    pub fn remove_local_port(&self, proto: Proto, port: u16) -> Result<(), KernelError> {
        match lock(&self.local_ports).remove(&local_port_key(proto, port)) {
            Err(e) if !is_not_found(&e) => Err(map_err("local_ports", "remove", &e)),
            _ => Ok(()),
        }
    }

    /// Ports currently marked with [`set_local_port`](Self::set_local_port).
    pub fn local_ports(&self) -> Result<Vec<(Proto, u16)>, KernelError> {
        let map = lock(&self.local_ports);
        let mut out = Vec::new();
        for k in map.keys() {
            let k = k.map_err(|e| map_err("local_ports", "iterate", &e))?;
            if let Some(proto) = Proto::from_number((k >> 16) as u8) {
                out.push((proto, (k & 0xffff) as u16));
            }
        }
        Ok(out)
    }

    /// Replaces the set of this host's addresses (interface and broadcast
    /// addresses) the hooks treat as local destinations. New ones are added
    /// before old ones go, so no address is ever briefly unprotected.
    pub fn set_local_addrs(&self, addrs: &[IpAddr]) -> Result<(), KernelError> {
        let want: std::collections::HashSet<[u8; 16]> = addrs.iter().map(|a| mapped(*a)).collect();
        let mut map = lock(&self.local_addrs);
        for a in &want {
            map.insert(*a, 1, 0)
                .map_err(|e| map_err("local_addrs", "insert", &e))?;
        }
        let mut stale = Vec::new();
        for k in map.keys() {
            let k = k.map_err(|e| map_err("local_addrs", "iterate", &e))?;
            if !want.contains(&k) {
                stale.push(k);
            }
        }
        for k in stale {
            match map.remove(&k) {
                Err(e) if !is_not_found(&e) => return Err(map_err("local_addrs", "remove", &e)),
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether the hooks treat `ip` as a destination on this host.
    pub fn is_local_destination(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        always_local(ip) || lock(&self.local_addrs).get(&mapped(ip), 0).is_ok()
    }

    /// The Service the connect hook finds for `dst`, in the hook's order:
    /// a port of this host's Service at a local destination first (decided
    /// locally, so without the mesh flag), then what
    /// [`Self::remote_service_for`] finds. Unlike the hook it cannot see sockets of
    /// other network namespaces bound to exactly `dst`; such a destination
    /// is judged as remote here. (tether-agent's `decide::hook_model`
    /// models the hook in full.)
    pub fn service_for(
        &self,
        dst: SocketAddr,
        proto: Proto,
    ) -> Result<Option<(u32, ServiceFlags)>, KernelError> {
        if self.is_local_destination(dst.ip()) {
            let ports = lock(&self.local_ports);
            for port in [dst.port(), 0] {
                match ports.get(&local_port_key(proto, port), 0) {
                    Ok(v) => return Ok(Some((v.service_id, ServiceFlags::default()))),
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(map_err("local_ports", "lookup", &e)),
                }
            }
        }
        self.remote_service_for(dst, proto)
    }

    /// The Service a connect hook on another host finds for `dst` (the
    /// Services map alone: exact port before any port, longest prefix),
    /// with its flags: what a tunnel from that host was allowed to name.
    pub fn remote_service_for(
        &self,
        dst: SocketAddr,
        proto: Proto,
    ) -> Result<Option<(u32, ServiceFlags)>, KernelError> {
        let services = lock(&self.services);
        for port in [dst.port(), 0] {
            let key = DstPrefix {
                net: dst.ip(),
                prefix_len: if dst.is_ipv4() { 32 } else { 128 },
                port,
                proto,
            };
            let (len, data) = key.to_key()?;
            match services.get(&Key::new(len, data), 0) {
                Ok(v) => return Ok(Some((v.service_id, ServiceFlags::from_bits(v.flags)))),
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(map_err("services", "lookup", &e)),
            }
        }
        Ok(None)
    }

    /// All protected destinations.
    pub fn services(&self) -> Result<Vec<(DstPrefix, u32)>, KernelError> {
        let map = lock(&self.services);
        let mut out = Vec::new();
        for item in map.iter() {
            let (key, v) = item.map_err(|e| map_err("services", "iterate", &e))?;
            // Entries we could not have written (another writer) are skipped.
            if let Some(dst) = DstPrefix::from_key(key.prefix_len(), &key.data()) {
                out.push((dst, v.service_id));
            }
        }
        Ok(out)
    }

    /// The kernel's exec id for `tgid` (0 when it has no record).
    pub fn exec_id(&self, tgid: u32) -> Result<ExecId, KernelError> {
        Ok(ExecId(self.exec_record(tgid)?.map_or(0, |r| r.exec_id)))
    }

    /// What the kernel recorded at `tgid`'s last exec (and marks since).
    /// Read it *before* attesting the process and pass its exec id and
    /// start to [`set_process`](Self::set_process).
    pub fn exec_record(&self, tgid: u32) -> Result<Option<ExecRecord>, KernelError> {
        match self.execs.get(&tgid, 0) {
            Ok(v) => Ok(Some(v.parse())),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(map_err("execs", "lookup", &e)),
        }
    }

    /// Records an attested process. `exec_id` and `start_ns` must come
    /// from the [`exec_record`](Self::exec_record) read before the
    /// attestation; if the process has exec'd since (or the pid is another
    /// process's now), the kernel treats it as unattested.
    pub fn set_process(
        &self,
        tgid: u32,
        subject: u32,
        exec_id: ExecId,
        start_ns: u64,
    ) -> Result<(), KernelError> {
        let v = ProcState {
            subject,
            flags: 0,
            exec_id: exec_id.0,
            start_ns,
        };
        lock(&self.procs)
            .insert(tgid, v, 0)
            .map_err(|e| map_err("procs", "insert", &e))
    }

    /// Forgets a process. Removing an absent one is not an error.
    pub fn remove_process(&self, tgid: u32) -> Result<(), KernelError> {
        match lock(&self.procs).remove(&tgid) {
            Err(e) if !is_not_found(&e) => Err(map_err("procs", "remove", &e)),
            _ => Ok(()),
        }
    }

    /// The entry for `tgid`, if any (including ones inherited by fork).
    pub fn process(&self, tgid: u32) -> Result<Option<ProcessEntry>, KernelError> {
        match lock(&self.procs).get(&tgid, 0) {
            Ok(v) => Ok(Some(ProcessEntry {
                subject: v.subject,
                exec_id: ExecId(v.exec_id),
                start_ns: v.start_ns,
            })),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(map_err("procs", "lookup", &e)),
        }
    }

    /// All process entries.
    pub fn processes(&self) -> Result<Vec<(u32, ProcessEntry)>, KernelError> {
        let map = lock(&self.procs);
        let mut out = Vec::new();
        for item in map.iter() {
            let (tgid, v) = item.map_err(|e| map_err("procs", "iterate", &e))?;
            out.push((
                tgid,
                ProcessEntry {
                    subject: v.subject,
                    exec_id: ExecId(v.exec_id),
                    start_ns: v.start_ns,
                },
            ));
        }
        Ok(out)
    }

    /// Registers `tgid` as the agent: its own connections pass every hook
    /// (it completes held connections), and connections are held for it
    /// only while this entry lives. The exit tracepoint removes the entry
    /// when the process dies, so a dead agent's hold port is never used
    /// (nobody else could be listening there).
    pub fn set_agent(&self, tgid: u32) -> Result<(), KernelError> {
        let rec = self.exec_record(tgid)?;
        let v = ProcState {
            subject: 0,
            flags: PROC_AGENT,
            exec_id: rec.as_ref().map_or(0, |r| r.exec_id),
            start_ns: rec.as_ref().map_or(0, |r| r.start_ns),
        };
        lock(&self.procs)
            .insert(tgid, v, 0)
            .map_err(|e| map_err("procs", "insert", &e))?;
        self.set_scope(tgid)
    }

    /// Tells the syscall hooks which cgroup is the workload (and who the
    /// agent is: its own calls are never marked).
    fn set_scope(&self, agent_tgid: u32) -> Result<(), KernelError> {
        let v = ScopeValue {
            cgroup_id: self.cgroup_id,
            level: self.cgroup_level,
            agent_tgid,
        };
        lock(&self.scope)
            .set(0, v, 0)
            .map_err(|e| map_err("scope", "update", &e))
    }

    /// Starts holding connections of unattested processes for the agent
    /// registered with [`set_agent`](Self::set_agent), at `cfg.port` on
    /// loopback, for sockets in the caller's network namespace.
    pub fn set_hold(&self, agent_tgid: u32, cfg: HoldConfig) -> Result<(), KernelError> {
        let netns = sys::netns_cookie().map_err(|source| KernelError::Io {
            path: PathBuf::from("getsockopt(SO_NETNS_COOKIE)"),
            op: "read the network namespace cookie",
            source,
        })?;
        // An earlier agent's listeners died with it: forget every namespace
        // but this one before connections are redirected again, so none is
        // sent to a port someone else may hold by now (they wait for this
        // agent's listeners instead).
        let stale: Vec<u64> = lock(&self.hold_ns)
            .keys()
            .filter_map(Result::ok)
            .filter(|k| *k != netns)
            .collect();
        for k in stale {
            self.forget_netns(k)?;
        }
        self.serve_netns(netns, cfg)?;
        let v = HoldCfg {
            agent_tgid,
            port: cfg.port.to_be(),
            flags: if cfg.v4 { HOLD_V4 } else { 0 } | if cfg.v6 { HOLD_V6 } else { 0 },
            pad: 0,
            netns,
        };
        lock(&self.config)
            .set(0, v, 0)
            .map_err(|e| map_err("config", "update", &e))
    }

    /// The agent listens at `cfg` in the network namespace with this
    /// cookie: connections held there go to it (and those already waiting
    /// for it go on).
    pub fn serve_netns(&self, netns: u64, cfg: HoldConfig) -> Result<(), KernelError> {
        let v = HoldNs {
            port: cfg.port.to_be(),
            flags: if cfg.v4 { HOLD_V4 } else { 0 } | if cfg.v6 { HOLD_V6 } else { 0 },
            pad: 0,
            pad2: 0,
        };
        lock(&self.hold_ns)
            .insert(netns, v, 0)
            .map_err(|e| map_err("hold_ns", "update", &e))
    }

    /// The agent cannot serve this network namespace: connections there
    /// that it would have held, tunnelled or injected are refused.
    pub fn refuse_netns(&self, netns: u64) -> Result<(), KernelError> {
        let v = HoldNs {
            port: 0,
            flags: 0,
            pad: 0,
            pad2: 0,
        };
        lock(&self.hold_ns)
            .insert(netns, v, 0)
            .map_err(|e| map_err("hold_ns", "update", &e))
    }

    /// Forgets a network namespace (gone, or no longer served): the next
    /// connection there waits for a listener again.
    pub fn forget_netns(&self, netns: u64) -> Result<(), KernelError> {
        match lock(&self.hold_ns).remove(&netns) {
            Err(e) if !is_not_found(&e) => Err(map_err("hold_ns", "remove", &e)),
            _ => Ok(()),
        }
    }

    /// The network namespaces the kernel knows a listener for, with their
    /// ports (0: refused), for adoption after a restart.
    pub fn netns_listeners(&self) -> Vec<(u64, u16)> {
        lock(&self.hold_ns)
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k, u16::from_be(v.port)))
            .collect()
    }

    /// Stops holding: unattested processes are refused (EPERM) again.
    pub fn clear_hold(&self) -> Result<(), KernelError> {
        let v = HoldCfg {
            agent_tgid: 0,
            port: 0,
            flags: 0,
            pad: 0,
            netns: 0,
        };
        lock(&self.config)
            .set(0, v, 0)
            .map_err(|e| map_err("config", "update", &e))
    }

    /// Claims the held connection whose client is `peer` (the peer address
    /// of a connection accepted on the hold listener: an IPv6 peer means
    /// the [::1] listener) in the network namespace `netns` (the
    /// listener's). Each record can be claimed once; a connection
    /// to the hold port that the kernel did not redirect has none.
    pub fn take_held(
        &self,
        peer: SocketAddr,
        netns: u64,
    ) -> Result<Option<HeldConnection>, KernelError> {
        let (addr, v6) = match peer.ip() {
            IpAddr::V4(a) => (a.to_ipv6_mapped().octets(), 0),
            IpAddr::V6(a) => (a.octets(), 1),
        };
        let key = HeldKey {
            addr,
            port: peer.port(),
            v6,
            pad: 0,
            pad2: 0,
            netns,
        };
        let mut map = lock(&self.held);
        let raw = match map.get(&key, 0) {
            Ok(v) => v,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(map_err("held", "lookup", &e)),
        };
        match map.remove(&key) {
            Err(e) if !is_not_found(&e) => return Err(map_err("held", "remove", &e)),
            _ => {}
        }
        Ok(Some(raw.parse()))
    }

    /// Sets the verdict for (subject, service). `rule` names the policy
    /// rule that decided, for audit.
    /// `expires_ns` (CLOCK_BOOTTIME, 0: never) makes the verdict lapse
    /// unless it is written again before then: for verdicts that depend on
    /// a condition such as a time window.
    pub fn set_verdict(
        &self,
        subject: u32,
        service_id: u32,
        allow: bool,
        rule: u32,
        expires_ns: u64,
    ) -> Result<(), KernelError> {
        self.set_verdict_with(subject, service_id, allow, false, rule, expires_ns)
    }

    /// As [`Enforcer::set_verdict`]; `inject`: an allowed connect is
    /// redirected to the agent, which adds a credential to it.
    pub fn set_verdict_with(
        &self,
        subject: u32,
        service_id: u32,
        allow: bool,
        inject: bool,
        rule: u32,
        expires_ns: u64,
    ) -> Result<(), KernelError> {
        let k = PolicyKey {
            subject,
            service_id,
        };
        let flags = if allow {
            VERDICT_F_ALLOW | if inject { VERDICT_F_INJECT } else { 0 }
        } else {
            0
        };
        let v = VerdictValue {
            allow: flags,
            rule,
            expires_ns,
        };
        lock(&self.policy)
            .insert(k, v, 0)
            .map_err(|e| map_err("policy", "insert", &e))
    }

    /// Removes a verdict (the pair falls back to deny). Removing an absent
    /// one is not an error.
    pub fn remove_verdict(&self, subject: u32, service_id: u32) -> Result<(), KernelError> {
        match lock(&self.policy).remove(&PolicyKey {
            subject,
            service_id,
        }) {
            Err(e) if !is_not_found(&e) => Err(map_err("policy", "remove", &e)),
            _ => Ok(()),
        }
    }

    /// All verdicts.
    pub fn verdicts(&self) -> Result<Vec<VerdictEntry>, KernelError> {
        let map = lock(&self.policy);
        let mut out = Vec::new();
        for item in map.iter() {
            let (k, v) = item.map_err(|e| map_err("policy", "iterate", &e))?;
            out.push(VerdictEntry {
                subject: k.subject,
                service_id: k.service_id,
                allow: v.allow & VERDICT_F_ALLOW != 0,
                inject: v.allow & VERDICT_F_INJECT != 0,
                rule: v.rule,
                expires_ns: v.expires_ns,
            });
        }
        Ok(out)
    }

    /// A reader of the decision events. Use one at a time.
    pub fn events(&self) -> Result<EventReader, KernelError> {
        EventReader::open(self.events_id)
    }

    /// Cumulative run time (ns) and run count of each of this enforcer's
    /// programs, by function name. Zero unless run-time accounting is on
    /// ([`enable_run_stats`]); for benchmarks.
    pub fn program_run_stats(&self) -> Vec<(String, u64, u64)> {
        let mut out: Vec<(String, u64, u64)> = self
            ._bpf
            .programs()
            .filter_map(|(name, p)| {
                let fd = p.fd().ok()?;
                let (ns, n) = crate::sys::prog_run_stats(fd.as_fd()).ok()?;
                Some((name.to_owned(), ns, n))
            })
            .collect();
        out.sort();
        out
    }

    /// Decision counters, summed over CPUs.
    pub fn stats(&self) -> Result<Stats, KernelError> {
        let get = |idx: u32| -> Result<u64, KernelError> {
            let per_cpu = self
                .stats
                .get(&idx, 0)
                .map_err(|e| map_err("stats", "lookup", &e))?;
            Ok(per_cpu.iter().fold(0u64, |a, v| a.wrapping_add(*v)))
        };
        Ok(Stats {
            allowed: get(STAT_ALLOW)?,
            denied: get(STAT_DENY)?,
            unattested: get(STAT_UNATTESTED)?,
            held: get(STAT_HELD)?,
            meshed: get(STAT_MESH)?,
            injected: get(STAT_INJECT)?,
            ingress_dropped: get(STAT_INGRESS_DROPPED)?,
            tainted: get(STAT_TAINTED)?,
            sends_denied: get(STAT_SEND_DENIED)?,
            unguarded: get(STAT_UNGUARDED)?,
            sockets_denied: get(STAT_SOCKET_DENIED)?,
            dropped_events: get(STAT_DROPPED_EVENTS)?,
        })
    }

    /// Removes everything an agent attached: detaches and unpins the links
    /// under `pin_dir`, detaches any of our socket programs still linked to
    /// `cgroup` (pinned elsewhere or held by a live agent), and unpins the
    /// maps. Safe to run repeatedly; missing pieces are skipped. Backend of
    /// the documented "remove everything" command.
    pub fn detach_all(pin_dir: &Path, cgroup: Option<&Path>) -> Result<DetachReport, KernelError> {
        let mut report = DetachReport::default();
        let pins = PinDir::new(pin_dir);

        for entry in read_dir_if_exists(&pins.links)? {
            let path = entry;
            match sys::obj_get(&path) {
                Ok(fd) => {
                    if sys::link_detach(fd.as_fd()).is_ok() {
                        report.links_detached += 1;
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "not a BPF link; removing the pin")
                }
            }
            remove_pin(&path, &mut report)?;
        }

        match cgroup.map(open_cgroup) {
            None => {}
            Some(Ok((_, cgroup_id))) => report.links_detached += detach_cgroup_links(cgroup_id)?,
            // A removed cgroup has nothing attached.
            Some(Err(KernelError::Io { source, .. }))
                if source.kind() == io::ErrorKind::NotFound => {}
            Some(Err(e)) => return Err(e),
        }

        for path in read_dir_if_exists(&pins.maps)? {
            remove_pin(&path, &mut report)?;
        }
        for dir in [&pins.links, &pins.maps, &pin_dir.to_path_buf()] {
            // Not empty (someone else's pins) or a mount point: leave it.
            let _ = fs::remove_dir(dir);
        }
        Ok(report)
    }
}

fn read_dir_if_exists(dir: &Path) -> Result<Vec<PathBuf>, KernelError> {
    match fs::read_dir(dir) {
        Ok(rd) => {
            let mut out = Vec::new();
            for e in rd {
                out.push(e.map_err(io_err(dir, "read directory"))?.path());
            }
            Ok(out)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_err(dir, "read directory")(e)),
    }
}

fn remove_pin(path: &Path, report: &mut DetachReport) -> Result<(), KernelError> {
    match fs::remove_file(path) {
        Ok(()) => {
            report.pins_removed += 1;
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path, "remove pin")(e)),
    }
}

/// Detaches every cgroup link on `cgroup_id` whose program is one of ours.
fn detach_cgroup_links(cgroup_id: u64) -> Result<usize, KernelError> {
    let ours: Vec<&str> = PROGRAMS
        .iter()
        .filter(|p| matches!(p.hook, Attach::Cgroup { .. }))
        .map(|p| p.func)
        .collect();
    let ids = sys::link_ids().map_err(|source| KernelError::Io {
        path: PathBuf::from("bpf(BPF_LINK_GET_NEXT_ID)"),
        op: "list links",
        source,
    })?;
    let mut n = 0;
    for id in ids {
        // Links come and go while we walk; a vanished one is fine.
        let Ok(fd) = sys::link_fd_by_id(id) else {
            continue;
        };
        let Ok(info) = sys::link_info(fd.as_fd()) else {
            continue;
        };
        if info.link_type != sys::BPF_LINK_TYPE_CGROUP || info.cgroup_id != cgroup_id {
            continue;
        }
        let Ok(name) = sys::prog_name(info.prog_id) else {
            continue;
        };
        if ours.contains(&name.as_str()) && sys::link_detach(fd.as_fd()).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

/// Turns on the kernel's per-program run-time accounting (for
/// [`Enforcer::program_run_stats`]) until the returned fd is closed. It
/// adds a clock read around every program run: for benchmarks only.
pub fn enable_run_stats() -> Result<OwnedFd, KernelError> {
    crate::sys::enable_run_stats().map_err(|source| KernelError::Io {
        path: PathBuf::from("bpf(BPF_ENABLE_STATS)"),
        op: "enable run-time stats",
        source,
    })
}

/// The destinations the hooks' `is_local_dst` treats as this host's
/// whatever its addresses: loopback, unspecified (connect() to 0.0.0.0 or
/// :: means this host), multicast and IPv4 broadcast (looped back to local
/// wildcard sockets). IPv4-mapped addresses count as IPv4.
pub fn always_local(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(a) => {
            a.is_loopback() || a.octets()[0] == 0 || a.is_multicast() || a.is_broadcast()
        }
        IpAddr::V6(a) => a.is_loopback() || a.is_unspecified() || a.is_multicast(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enforcer_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Enforcer>();
    }

    #[test]
    fn program_names_fit_the_kernel_limit() {
        // The kernel truncates names to 15 bytes; detach_all matches on them.
        for p in &PROGRAMS {
            assert!(p.func.len() <= 15, "{}", p.func);
        }
    }

    #[test]
    fn object_is_embedded() {
        assert!(OBJECT.starts_with(b"\x7fELF"));
    }
}
