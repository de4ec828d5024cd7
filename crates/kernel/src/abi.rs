//! Map keys, values and the event record, laid out exactly as in
//! `bpf/tether.bpf.c`. Keep the two in step; `tests` below pin the sizes the
//! C side `_Static_assert`s.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::KernelError;

/// Transport protocol of a protected destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    /// TCP (MPTCP is treated as TCP by the hooks).
    Tcp,
    /// UDP (UDP-Lite is treated as UDP by the hooks).
    Udp,
}

impl Proto {
    pub(crate) const fn number(self) -> u8 {
        match self {
            Self::Tcp => libc::IPPROTO_TCP as u8,
            Self::Udp => libc::IPPROTO_UDP as u8,
        }
    }

    pub(crate) const fn from_number(n: u8) -> Option<Self> {
        match n as i32 {
            libc::IPPROTO_TCP => Some(Self::Tcp),
            libc::IPPROTO_UDP => Some(Self::Udp),
            _ => None,
        }
    }
}

/// A protected destination: an address prefix, a port (0 = every port) and
/// a protocol. IPv4 prefixes are stored IPv4-mapped, so an IPv6 socket
/// connecting to `::ffff:a.b.c.d` hits the same entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DstPrefix {
    pub net: IpAddr,
    pub prefix_len: u8,
    /// Host byte order; 0 matches every port. A rule for the exact port
    /// takes precedence over an any-port rule.
    pub port: u16,
    pub proto: Proto,
}

/// Bytes of `dst_key` after `prefixlen`: proto, pad, port (BE), addr[16].
pub(crate) type DstKeyData = [u8; 20];

/// Byte offsets of the fields read by position from records the kernel
/// writes. `abi_btf` checks each against the compiled object's BTF, so a
/// field moved on the C side fails a test instead of misreading records.
pub(crate) mod at {
    /// `struct exec_rec`.
    pub(crate) mod exec_rec {
        pub(crate) const EXEC_ID: usize = 0;
        pub(crate) const START_NS: usize = 8;
        pub(crate) const INO: usize = 24;
        pub(crate) const DEV: usize = 32;
        pub(crate) const FLAGS: usize = 36;
        pub(crate) const TRACER: usize = 40;
        pub(crate) const MNT_NS: usize = 44;
        pub(crate) const NAME: usize = 48;
        pub(crate) const NAME_LEN: usize = 32;
    }
    /// `struct redirect`, which `struct held` starts with.
    pub(crate) mod redirect {
        pub(crate) const ADDR: usize = 0;
        pub(crate) const PORT: usize = 16;
        pub(crate) const FLOW_V6: usize = 18;
        pub(crate) const KIND: usize = 19;
        pub(crate) const TGID: usize = 20;
        pub(crate) const PID: usize = 24;
        pub(crate) const UID: usize = 28;
        pub(crate) const SERVICE_ID: usize = 32;
        pub(crate) const LOCAL_PORT: usize = 36;
        pub(crate) const EXEC_ID: usize = 40;
        pub(crate) const START_NS: usize = 48;
        pub(crate) const NETNS: usize = 72;
    }
    /// `struct held`.
    pub(crate) mod held {
        pub(crate) const COOKIE: usize = 88;
    }
    /// `struct event`.
    pub(crate) mod event {
        pub(crate) const TS_NS: usize = 0;
        pub(crate) const COOKIE: usize = 8;
        pub(crate) const TGID: usize = 16;
        pub(crate) const PID: usize = 20;
        pub(crate) const UID: usize = 24;
        pub(crate) const GID: usize = 28;
        pub(crate) const SUBJECT: usize = 32;
        pub(crate) const SERVICE_ID: usize = 36;
        pub(crate) const RULE: usize = 40;
        pub(crate) const VERDICT: usize = 44;
        pub(crate) const PROTO: usize = 45;
        pub(crate) const PORT: usize = 46;
        pub(crate) const ADDR: usize = 48;
        pub(crate) const HOOK: usize = 64;
        pub(crate) const COMM: usize = 65;
        pub(crate) const COMM_LEN: usize = 16;
        pub(crate) const REASON: usize = 81;
        pub(crate) const AUX: usize = 84;
        pub(crate) const FLAGS: usize = 88;
        pub(crate) const AUX2: usize = 92;
        pub(crate) const EXE: usize = 96;
        pub(crate) const EXE_LEN: usize = 16;
    }
}

/// Bits of proto + pad + port that precede the address in the LPM key.
const KEY_HEADER_BITS: u32 = 32;

impl DstPrefix {
    /// A single address and port.
    pub fn host(addr: IpAddr, port: u16, proto: Proto) -> Self {
        let prefix_len = if addr.is_ipv4() { 32 } else { 128 };
        Self {
            net: addr,
            prefix_len,
            port,
            proto,
        }
    }

    /// The LPM key: (prefix length in bits, data). Host bits past the prefix
    /// are cleared so equal prefixes always make equal keys.
    pub(crate) fn to_key(self) -> Result<(u32, DstKeyData), KernelError> {
        let (mut addr, addr_bits) = match self.net {
            IpAddr::V4(v4) => {
                if self.prefix_len > 32 {
                    return Err(KernelError::InvalidPrefix(format!(
                        "{}/{}: an IPv4 prefix is at most 32 bits",
                        self.net, self.prefix_len
                    )));
                }
                (
                    v4.to_ipv6_mapped().octets(),
                    96 + u32::from(self.prefix_len),
                )
            }
            IpAddr::V6(v6) => {
                if self.prefix_len > 128 {
                    return Err(KernelError::InvalidPrefix(format!(
                        "{}/{}: an IPv6 prefix is at most 128 bits",
                        self.net, self.prefix_len
                    )));
                }
                (v6.octets(), u32::from(self.prefix_len))
            }
        };
        let mask = u128::MAX.checked_shl(128 - addr_bits).unwrap_or(0);
        addr = (u128::from_be_bytes(addr) & mask).to_be_bytes();

        let mut data = [0u8; 20];
        data[0] = self.proto.number();
        data[2..4].copy_from_slice(&self.port.to_be_bytes());
        data[4..20].copy_from_slice(&addr);
        Ok((KEY_HEADER_BITS + addr_bits, data))
    }

    /// Inverse of [`to_key`](Self::to_key); IPv4-mapped prefixes of at least
    /// 96 bits come back as IPv4.
    pub(crate) fn from_key(prefixlen: u32, data: &DstKeyData) -> Option<Self> {
        let proto = Proto::from_number(data[0])?;
        let port = u16::from_be_bytes([data[2], data[3]]);
        let addr_bits = prefixlen
            .checked_sub(KEY_HEADER_BITS)
            .filter(|b| *b <= 128)?;
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&data[4..20]);
        let v6 = Ipv6Addr::from(octets);
        let (net, prefix_len) = match v6.to_ipv4_mapped() {
            Some(v4) if addr_bits >= 96 => (IpAddr::V4(v4), addr_bits - 96),
            _ => (IpAddr::V6(v6), addr_bits),
        };
        Some(Self {
            net,
            prefix_len: u8::try_from(prefix_len).ok()?,
            port,
            proto,
        })
    }
}

/// `struct svc`: the value of `services`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SvcValue {
    pub(crate) service_id: u32,
    pub(crate) flags: u32,
}

pub(crate) const SVC_MESH: u32 = 1;
pub(crate) const SVC_PERMISSIVE: u32 = 2;

/// How a protected destination is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServiceFlags {
    /// Agents front it: allowed connects are redirected to the local
    /// agent's tunnel, and on the service's host packets from other hosts
    /// to it are dropped.
    pub mesh: bool,
    /// With `mesh`: plaintext from other hosts is still accepted (and
    /// reported as [`Decision::Plaintext`] events).
    pub permissive: bool,
}

impl ServiceFlags {
    pub(crate) fn from_bits(b: u32) -> Self {
        ServiceFlags {
            mesh: b & SVC_MESH != 0,
            permissive: b & SVC_PERMISSIVE != 0,
        }
    }

    pub(crate) fn bits(self) -> u32 {
        (if self.mesh { SVC_MESH } else { 0 }) | (if self.permissive { SVC_PERMISSIVE } else { 0 })
    }
}

/// `struct proc_state`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcState {
    pub(crate) subject: u32,
    pub(crate) flags: u32,
    pub(crate) exec_id: u64,
    pub(crate) start_ns: u64,
}

/// `struct policy_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct PolicyKey {
    pub(crate) subject: u32,
    pub(crate) service_id: u32,
}

/// `struct verdict`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VerdictValue {
    pub(crate) allow: u32,
    pub(crate) rule: u32,
    /// CLOCK_BOOTTIME ns after which it no longer allows; 0: never.
    pub(crate) expires_ns: u64,
}

/// `struct scope`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScopeValue {
    pub(crate) cgroup_id: u64,
    pub(crate) level: u32,
    pub(crate) agent_tgid: u32,
}

/// `struct exec_rec`, as bytes (parsed field by field).
#[repr(C, align(8))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExecRaw(pub(crate) [u8; 80]);

/// What the kernel recorded at a process's last exec, before any of the
/// new image's code ran (see `struct exec_rec` in tether.bpf.c).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRecord {
    /// CLOCK_BOOTTIME ns of the exec; 0 when the process exec'd before the
    /// programs were loaded (nothing is known about what it runs).
    pub exec_id: u64,
    /// Process start, CLOCK_BOOTTIME ns.
    pub start_ns: u64,
    /// The executed file's inode number and device (userspace `st_dev`
    /// encoding, comparable with `stat`).
    pub ino: u64,
    pub dev: u64,
    pub flags: ExecFlags,
    /// Who marked it (tgid), when a taint flag is set.
    pub tracer: u32,
    /// Its mount namespace (inode number) at exec.
    pub mnt_ns: u32,
    /// The executed file's name (its last path component).
    pub name: String,
}

impl ExecRaw {
    pub(crate) fn parse(&self) -> ExecRecord {
        use at::exec_rec as f;
        let b = &self.0;
        ExecRecord {
            exec_id: u64_at(b, f::EXEC_ID),
            start_ns: u64_at(b, f::START_NS),
            ino: u64_at(b, f::INO),
            dev: user_dev(u32_at(b, f::DEV)),
            flags: ExecFlags(u32_at(b, f::FLAGS)),
            tracer: u32_at(b, f::TRACER),
            mnt_ns: u32_at(b, f::MNT_NS),
            name: c_str(&b[f::NAME..f::NAME + f::NAME_LEN]),
        }
    }
}

/// A kernel-internal dev_t (major << 20 | minor) in the encoding `stat`
/// reports (glibc's makedev).
fn user_dev(kdev: u32) -> u64 {
    let major = u64::from(kdev >> 20);
    let minor = u64::from(kdev & 0xf_ffff);
    ((major & 0xffff_f000) << 32)
        | ((major & 0xfff) << 8)
        | ((minor & 0xffff_ff00) << 12)
        | (minor & 0xff)
}

/// `exec_rec.flags`: what was wrong with the exec, and marks since.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct ExecFlags(pub u32);

impl ExecFlags {
    pub const LD_PRELOAD: u32 = 1 << 0;
    pub const LD_AUDIT: u32 = 1 << 1;
    pub const LD_LIBRARY_PATH: u32 = 1 << 2;
    pub const LD_OTHER: u32 = 1 << 3;
    pub const GCONV_PATH: u32 = 1 << 4;
    pub const GLIBC_TUNABLES: u32 = 1 << 5;
    pub const ENV_UNSCANNED: u32 = 1 << 6;
    pub const USERNS_MOUNTS: u32 = 1 << 8;
    pub const CHROOT: u32 = 1 << 9;
    pub const UNTRUSTED_FS: u32 = 1 << 10;
    pub const SECCOMP_NOTIFY: u32 = 1 << 11;
    pub const USER_NS: u32 = 1 << 12;
    pub const RUNTIME_ENV: u32 = 1 << 13;
    pub const TRACED_AT_EXEC: u32 = 1 << 16;
    pub const PTRACE: u32 = 1 << 17;
    pub const MEM_WRITE: u32 = 1 << 18;
    pub const SET_MM: u32 = 1 << 19;
    pub const MEM_READ: u32 = 1 << 20;
    pub const TAINTS: u32 = 0xff << 16;
    /// Every environment flag: what an unscanned environment counts as.
    pub const ENV: u32 = Self::LD_PRELOAD
        | Self::LD_AUDIT
        | Self::LD_LIBRARY_PATH
        | Self::LD_OTHER
        | Self::GCONV_PATH
        | Self::GLIBC_TUNABLES
        | Self::RUNTIME_ENV;

    pub fn has(self, bit: u32) -> bool {
        self.0 & bit != 0
    }

    /// Marked since its exec: no authority until it execs again.
    pub fn tainted(self) -> bool {
        self.0 & Self::TAINTS != 0
    }

    /// Human-readable names of the set flags (for audit and whoami).
    pub fn names(self) -> Vec<&'static str> {
        const NAMES: [(u32, &str); 18] = [
            (ExecFlags::LD_PRELOAD, "LD_PRELOAD"),
            (ExecFlags::LD_AUDIT, "LD_AUDIT"),
            (ExecFlags::LD_LIBRARY_PATH, "LD_LIBRARY_PATH"),
            (ExecFlags::LD_OTHER, "LD_*"),
            (ExecFlags::GCONV_PATH, "GCONV_PATH"),
            (ExecFlags::GLIBC_TUNABLES, "GLIBC_TUNABLES"),
            (ExecFlags::RUNTIME_ENV, "runtime-env"),
            (ExecFlags::ENV_UNSCANNED, "environment too large to scan"),
            (ExecFlags::USERNS_MOUNTS, "mount-namespace"),
            (ExecFlags::CHROOT, "chroot"),
            (ExecFlags::UNTRUSTED_FS, "filesystem"),
            (ExecFlags::SECCOMP_NOTIFY, "seccomp-notify"),
            (ExecFlags::USER_NS, "user-namespace"),
            (ExecFlags::TRACED_AT_EXEC, "traced at exec"),
            (ExecFlags::PTRACE, "ptrace attach"),
            (ExecFlags::MEM_WRITE, "memory written by another process"),
            (ExecFlags::SET_MM, "prctl(PR_SET_MM)"),
            (ExecFlags::MEM_READ, "memory read by another process"),
        ];
        NAMES
            .iter()
            .filter(|(b, _)| self.0 & b != 0)
            .map(|(_, n)| *n)
            .collect()
    }
}

/// `proc_state.flags`: the entry is the agent itself.
pub(crate) const PROC_AGENT: u32 = 1;

/// `struct hold_cfg`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HoldCfg {
    pub(crate) agent_tgid: u32,
    /// Network byte order.
    pub(crate) port: u16,
    pub(crate) flags: u8,
    pub(crate) pad: u8,
    pub(crate) netns: u64,
}

/// `redirect.kind`: an allowed connect to a meshed Service (the other
/// kind, 0, is a connection held for attestation).
pub(crate) const REDIRECT_MESH: u8 = 1;
/// `redirect.kind`: an allowed connect whose credential the agent injects.
pub(crate) const REDIRECT_INJECT: u8 = 2;

/// `verdict.allow` bits (`enum verdict_flag`).
pub(crate) const VERDICT_F_ALLOW: u32 = 1;
pub(crate) const VERDICT_F_INJECT: u32 = 2;

pub(crate) const HOLD_V4: u8 = 1;
pub(crate) const HOLD_V6: u8 = 2;

/// `struct held_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct HeldKey {
    /// Client address, IPv4-mapped for IPv4 flows.
    pub(crate) addr: [u8; 16],
    pub(crate) port: u16,
    pub(crate) v6: u8,
    pub(crate) pad: u8,
    pub(crate) pad2: u32,
    /// The client socket's network namespace cookie.
    pub(crate) netns: u64,
}

/// `struct hold_ns`: the agent's listener in one network namespace.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HoldNs {
    /// Network byte order; 0: the agent cannot serve the namespace.
    pub(crate) port: u16,
    pub(crate) flags: u8,
    pub(crate) pad: u8,
    pub(crate) pad2: u32,
}

/// `struct held` (a `struct redirect` plus the socket cookie), as bytes:
/// parsed field by field so no layout assumption hides in a transmute.
#[repr(C, align(8))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeldRaw(pub(crate) [u8; 96]);

/// A connection the kernel redirected to the agent's hold listener because
/// its process was not attested yet, as published by sock_ops under the
/// client's local port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldConnection {
    /// Where the process was connecting (IPv4-mapped shown as IPv4).
    pub original_dst: SocketAddr,
    pub tgid: u32,
    /// Thread that called connect().
    pub pid: u32,
    pub uid: u32,
    pub service_id: u32,
    /// The client's local port (what the agent sees as the peer port).
    pub local_port: u16,
    /// Redirected over IPv6 loopback rather than IPv4.
    pub flow_v6: bool,
    /// An allowed connect to a meshed Service (the agent tunnels it), not a
    /// process waiting to be attested.
    pub mesh: bool,
    /// An allowed connect whose credential the agent injects (the kernel
    /// found the inject flag on the process's verdict).
    pub inject: bool,
    /// `execs[tgid]` at connect(): the image that made the connection.
    pub exec_id: u64,
    /// Process start time, CLOCK_BOOTTIME ns (what /proc/<pid>/stat's
    /// starttime counts in clock ticks).
    pub start_boottime_ns: u64,
    pub socket_cookie: u64,
    /// The network namespace (cookie) the connection was made in: its
    /// destination means what it means there.
    pub netns: u64,
}

impl HeldRaw {
    pub(crate) fn parse(&self) -> HeldConnection {
        use at::redirect as f;
        let b = &self.0;
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&b[f::ADDR..f::ADDR + 16]);
        HeldConnection {
            original_dst: SocketAddr::new(
                Ipv6Addr::from(octets).to_canonical(),
                u16::from_be_bytes([b[f::PORT], b[f::PORT + 1]]),
            ),
            flow_v6: b[f::FLOW_V6] != 0,
            mesh: b[f::KIND] == REDIRECT_MESH,
            inject: b[f::KIND] == REDIRECT_INJECT,
            tgid: u32_at(b, f::TGID),
            pid: u32_at(b, f::PID),
            uid: u32_at(b, f::UID),
            service_id: u32_at(b, f::SERVICE_ID),
            local_port: u16::from_ne_bytes([b[f::LOCAL_PORT], b[f::LOCAL_PORT + 1]]),
            exec_id: u64_at(b, f::EXEC_ID),
            start_boottime_ns: u64_at(b, f::START_NS),
            socket_cookie: u64_at(b, at::held::COOKIE),
            netns: u64_at(b, f::NETNS),
        }
    }
}

// SAFETY: plain `repr(C)` integers without padding (4 + 4 + 8 + 8 bytes), so
// every bit pattern is valid and no uninitialised bytes reach the kernel.
unsafe impl aya::Pod for ProcState {}
// SAFETY: as above (8 + 4 + 4 bytes).
unsafe impl aya::Pod for ScopeValue {}
// SAFETY: a byte array.
unsafe impl aya::Pod for ExecRaw {}
// SAFETY: as above (4 + 2 + 1 + 1 + 8 = 16 bytes, no padding).
unsafe impl aya::Pod for HoldCfg {}
// SAFETY: as above (16 + 2 + 1 + 1 + 4 + 8 bytes, no padding).
unsafe impl aya::Pod for HeldKey {}
// SAFETY: as above (2 + 1 + 1 + 4 bytes).
unsafe impl aya::Pod for HoldNs {}
// SAFETY: a byte array.
unsafe impl aya::Pod for HeldRaw {}
// SAFETY: as above.
unsafe impl aya::Pod for PolicyKey {}
// SAFETY: as above (two u32).
unsafe impl aya::Pod for SvcValue {}
// SAFETY: as above (4 + 4 + 8 bytes).
unsafe impl aya::Pod for VerdictValue {}

/// Indexes of the `stats` per-CPU array.
pub(crate) const STAT_ALLOW: u32 = 0;
pub(crate) const STAT_DENY: u32 = 1;
pub(crate) const STAT_UNATTESTED: u32 = 2;
pub(crate) const STAT_DROPPED_EVENTS: u32 = 3;
pub(crate) const STAT_HELD: u32 = 4;
pub(crate) const STAT_MESH: u32 = 5;
pub(crate) const STAT_INGRESS_DROPPED: u32 = 6;
pub(crate) const STAT_TAINTED: u32 = 7;
pub(crate) const STAT_SEND_DENIED: u32 = 8;
pub(crate) const STAT_UNGUARDED: u32 = 9;
pub(crate) const STAT_SOCKET_DENIED: u32 = 10;
pub(crate) const STAT_INJECT: u32 = 11;
/// Entries of the `stats` array.
pub(crate) const STAT_MAX: u32 = 16;

/// The kernel's records decoded from raw bytes: what the agent reads
/// through the held and exec maps and the event ring, exposed for the
/// fuzz targets (tether-fuzz-bodies) and their seed corpora.
pub mod decode {
    use super::{Event, EventError, ExecRaw, ExecRecord, HeldConnection, HeldRaw};

    /// A `struct held` value; None unless it is exactly that size.
    pub fn held(b: &[u8]) -> Option<HeldConnection> {
        Some(HeldRaw(b.try_into().ok()?).parse())
    }

    /// A `struct exec_rec` value; None unless it is exactly that size.
    pub fn exec(b: &[u8]) -> Option<ExecRecord> {
        Some(ExecRaw(b.try_into().ok()?).parse())
    }

    /// One ring buffer record (`struct event`).
    pub fn event(b: &[u8]) -> Result<Event, EventError> {
        Event::parse(b)
    }
}

/// The decision recorded in an [`Event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Policy denied (explicitly, or no rule: protected means deny).
    Deny,
    Allow,
    /// The process had no identity in the kernel (never attested, or it
    /// exec'd since) and could not be held (UDP, MPTCP, or no live agent):
    /// refused.
    Unattested,
    /// The process had no identity yet; the connection was redirected to
    /// the agent, which attests the process and completes or refuses it.
    Held,
    /// Allowed to a meshed Service: redirected to the agent's tunnel.
    Mesh,
    /// Allowed to a meshed Service, but no agent was there to tunnel it:
    /// refused rather than sent in plaintext.
    MeshDown,
    /// Allowed, and the agent injects a credential: redirected to it.
    Inject,
    /// Allowed with injection, but no agent was there to inject: refused.
    InjectDown,
    /// A permissive Service on this host accepted a plaintext connection
    /// from another host ([`Hook::Ingress`]; `addr`/`port` are the peer's).
    Plaintext,
    /// A process was marked ([`Hook::Taint`]): `tgid` did it to `aux`.
    Taint,
}

impl Decision {
    /// The decision with this number in the kernel's events (`VERDICT_*`).
    pub fn from_code(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Deny,
            1 => Self::Allow,
            2 => Self::Unattested,
            3 => Self::Held,
            4 => Self::Mesh,
            5 => Self::MeshDown,
            6 => Self::Plaintext,
            7 => Self::Taint,
            8 => Self::Inject,
            9 => Self::InjectDown,
            _ => return None,
        })
    }
}

/// Why, beyond the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    None,
    /// Marked earlier (ptrace, memory written, PR_SET_MM, traced at exec);
    /// `aux` names who did it.
    Tainted,
    /// The calling thread is being traced now; `aux` is the tracer.
    Traced,
    /// Its exe link no longer names the file it executed.
    ExeChanged,
    /// [`Hook::Taint`]: a ptrace attach.
    Ptrace,
    /// [`Hook::Taint`]: process_vm_writev.
    MemWrite,
    /// [`Hook::Taint`]: /proc/PID/mem opened (to read or write).
    ProcMem,
    /// [`Hook::Taint`]: prctl(PR_SET_MM).
    SetMm,
    /// [`Hook::Send`]: a send on a protected connection by a process that
    /// neither made it nor may reach its Service; `aux` is the owner.
    Borrowed,
    /// [`Hook::Socket`]: a raw or packet socket.
    RawSocket,
    /// A conditional verdict the agent did not refresh in time.
    Expired,
    /// [`Hook::Taint`]: the caller was killed; `aux2` holds the reason.
    Killed,
    /// [`Hook::Taint`]: a watched syscall made through the 32-bit entry.
    Compat,
    /// [`Hook::Taint`]: pidfd_getfd took a descriptor from another process.
    Getfd,
    /// No room to record who made the connection: not made.
    Unguarded,
    /// [`Hook::Taint`]: process_vm_readv.
    MemRead,
    /// [`Hook::Taint`]: /proc/PID/environ opened.
    ProcEnviron,
}

impl Reason {
    /// The reason with this number in the kernel's events (`REASON_*`): a
    /// [`Reason::Killed`] event carries the original one in `aux2`.
    pub fn from_code(v: u32) -> Option<Self> {
        Some(match v {
            0 => Self::None,
            1 => Self::Tainted,
            2 => Self::Traced,
            3 => Self::ExeChanged,
            4 => Self::Ptrace,
            5 => Self::MemWrite,
            6 => Self::ProcMem,
            7 => Self::SetMm,
            8 => Self::Borrowed,
            9 => Self::RawSocket,
            10 => Self::Expired,
            11 => Self::Killed,
            12 => Self::Compat,
            13 => Self::Getfd,
            14 => Self::Unguarded,
            15 => Self::MemRead,
            16 => Self::ProcEnviron,
            _ => return None,
        })
    }
}

/// Which hook made the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    Connect4,
    Connect6,
    Sendmsg4,
    Sendmsg6,
    /// A connection accepted on this host (sock_ops), not a connect().
    Ingress,
    /// A process was marked (syscall and exec tracepoints).
    Taint,
    /// A send on a protected connection (sk_msg).
    Send,
    /// Socket creation or a socket option (raw and packet sockets).
    Socket,
    /// A connection waits for the agent to listen in its network
    /// namespace; the event's socket cookie is that namespace's cookie.
    Netns,
    /// A workload process exec'd, forked or exited: `aux` is one of
    /// [`PROC_EV_EXEC`], [`PROC_EV_FORK`], [`PROC_EV_EXIT`], `tgid` the
    /// process, `aux2` a fork's parent.
    Proc,
}

/// `enum proc_event`: what a [`Hook::Proc`] event reports.
pub const PROC_EV_EXEC: u32 = 1;
pub const PROC_EV_FORK: u32 = 2;
pub const PROC_EV_EXIT: u32 = 3;

impl Hook {
    /// The hook with this number in the kernel's events (`HOOK_*`).
    pub fn from_code(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Connect4,
            1 => Self::Connect6,
            2 => Self::Sendmsg4,
            3 => Self::Sendmsg6,
            4 => Self::Ingress,
            5 => Self::Taint,
            6 => Self::Send,
            7 => Self::Socket,
            8 => Self::Netns,
            9 => Self::Proc,
            _ => return None,
        })
    }

    /// Hooks whose events carry no transport (or a raw protocol number).
    fn without_transport(self) -> bool {
        matches!(self, Self::Taint | Self::Send | Self::Socket | Self::Proc)
    }
}

/// One decision on a protected destination, as read from the ring buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// CLOCK_BOOTTIME nanoseconds at the decision.
    pub ts_boot_ns: u64,
    /// Socket cookie (stable per socket; joins with later socket events).
    pub socket_cookie: u64,
    pub tgid: u32,
    /// Thread id of the caller.
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Subject id from `procs`, 0 when unattested.
    pub subject: u32,
    pub service_id: u32,
    /// Rule id from `policy`, 0 when no rule matched.
    pub rule: u32,
    pub decision: Decision,
    pub proto: Proto,
    /// IPv4-mapped destinations are shown as IPv4.
    pub addr: IpAddr,
    /// Host byte order.
    pub port: u16,
    pub hook: Hook,
    /// The task's comm (untrusted: set by the process itself).
    pub comm: String,
    pub reason: Reason,
    /// The tracer, the target of a taint, or a connection's owner.
    pub aux: u32,
    /// The caller's exec record flags at the decision.
    pub flags: ExecFlags,
    /// [`Hook::Socket`]: family << 16 | type; [`Hook::Taint`]: the reason
    /// code of a kill; [`Hook::Send`]: the connection's owner.
    pub aux2: u32,
    /// The start of the name of the file the caller executed, from its
    /// exec record (empty when it has none): the truth even when the
    /// caller is gone, or its /proc exe link was re-pointed, by the time
    /// the event is read.
    pub executed: String,
}

/// `sizeof(struct event)`.
pub(crate) const EVENT_LEN: usize = 112;

/// Why a ring buffer record could not be parsed. Records come from our own
/// program, so any of these means a version mismatch or memory corruption.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("event record is {0} bytes, expected at least {EVENT_LEN}")]
    Short(usize),
    #[error("event has unknown verdict {0}")]
    Verdict(u8),
    #[error("event has unknown protocol {0}")]
    Proto(u8),
    #[error("event has unknown hook {0}")]
    Hook(u8),
    #[error("event has unknown reason {0}")]
    Reason(u8),
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_ne_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_ne_bytes(a)
}

impl Event {
    /// Parses one ring buffer record (`struct event`).
    pub fn parse(b: &[u8]) -> Result<Self, EventError> {
        use at::event as f;
        if b.len() < EVENT_LEN {
            return Err(EventError::Short(b.len()));
        }
        let decision =
            Decision::from_code(b[f::VERDICT]).ok_or(EventError::Verdict(b[f::VERDICT]))?;
        let hook = Hook::from_code(b[f::HOOK]).ok_or(EventError::Hook(b[f::HOOK]))?;
        let proto = match Proto::from_number(b[f::PROTO]) {
            Some(p) => p,
            None if hook.without_transport() => Proto::Tcp,
            None => return Err(EventError::Proto(b[f::PROTO])),
        };
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&b[f::ADDR..f::ADDR + 16]);
        Ok(Self {
            ts_boot_ns: u64_at(b, f::TS_NS),
            socket_cookie: u64_at(b, f::COOKIE),
            tgid: u32_at(b, f::TGID),
            pid: u32_at(b, f::PID),
            uid: u32_at(b, f::UID),
            gid: u32_at(b, f::GID),
            subject: u32_at(b, f::SUBJECT),
            service_id: u32_at(b, f::SERVICE_ID),
            rule: u32_at(b, f::RULE),
            decision,
            proto,
            addr: Ipv6Addr::from(octets).to_canonical(),
            port: u16::from_be_bytes([b[f::PORT], b[f::PORT + 1]]),
            hook,
            comm: c_str(&b[f::COMM..f::COMM + f::COMM_LEN]),
            reason: Reason::from_code(u32::from(b[f::REASON]))
                .ok_or(EventError::Reason(b[f::REASON]))?,
            aux: u32_at(b, f::AUX),
            flags: ExecFlags(u32_at(b, f::FLAGS)),
            aux2: u32_at(b, f::AUX2),
            executed: c_str(&b[f::EXE..f::EXE + f::EXE_LEN]),
        })
    }
}

/// A NUL-terminated (or full-width) C string, lossily as UTF-8.
fn c_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn layouts_match_the_c_side() {
        assert_eq!(size_of::<ProcState>(), 24);
        assert_eq!(size_of::<SvcValue>(), 8);
        assert_eq!(size_of::<PolicyKey>(), 8);
        assert_eq!(size_of::<VerdictValue>(), 16);
        assert_eq!(size_of::<ScopeValue>(), 16);
        assert_eq!(size_of::<ExecRaw>(), 80);
        assert_eq!(size_of::<HoldCfg>(), 16);
        assert_eq!(size_of::<HeldKey>(), 32);
        assert_eq!(size_of::<HeldRaw>(), 96);
        assert_eq!(size_of::<HoldNs>(), 8);
        assert_eq!(size_of::<aya::maps::lpm_trie::Key<DstKeyData>>(), 24);
    }

    #[test]
    fn ipv4_keys_are_mapped_and_masked() {
        let p = DstPrefix {
            net: "10.1.2.3".parse().unwrap(),
            prefix_len: 8,
            port: 5432,
            proto: Proto::Tcp,
        };
        let (len, data) = p.to_key().unwrap();
        assert_eq!(len, 32 + 96 + 8);
        assert_eq!(data[0], 6);
        assert_eq!(&data[2..4], &5432u16.to_be_bytes());
        assert_eq!(
            &data[4..20],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 0]
        );
        let back = DstPrefix::from_key(len, &data).unwrap();
        assert_eq!(back.net, "10.0.0.0".parse::<IpAddr>().unwrap());
        assert_eq!(back.prefix_len, 8);
    }

    #[test]
    fn ipv6_keys_and_limits() {
        let p = DstPrefix::host("::1".parse().unwrap(), 0, Proto::Udp);
        let (len, data) = p.to_key().unwrap();
        assert_eq!(len, 160);
        assert_eq!(data[19], 1);
        assert_eq!(DstPrefix::from_key(len, &data), Some(p));
        let bad = DstPrefix {
            prefix_len: 33,
            ..DstPrefix::host("1.2.3.4".parse().unwrap(), 1, Proto::Tcp)
        };
        assert!(bad.to_key().is_err());
        let zero = DstPrefix {
            net: "::".parse().unwrap(),
            prefix_len: 0,
            port: 0,
            proto: Proto::Tcp,
        };
        assert_eq!(zero.to_key().unwrap().0, 32);
    }

    #[test]
    fn held_record_fields() {
        let mut b = [0u8; 96];
        b[0..16].copy_from_slice(&Ipv4Addr::new(10, 0, 0, 7).to_ipv6_mapped().octets());
        b[16..18].copy_from_slice(&6379u16.to_be_bytes());
        b[18] = 0;
        b[20..24].copy_from_slice(&1234u32.to_ne_bytes());
        b[32..36].copy_from_slice(&9u32.to_ne_bytes());
        b[36..38].copy_from_slice(&40000u16.to_ne_bytes());
        b[40..48].copy_from_slice(&77u64.to_ne_bytes());
        b[24..28].copy_from_slice(&1235u32.to_ne_bytes());
        b[28..32].copy_from_slice(&1000u32.to_ne_bytes());
        b[48..56].copy_from_slice(&42u64.to_ne_bytes());
        b[72..80].copy_from_slice(&4026532000u64.to_ne_bytes());
        b[88..96].copy_from_slice(&5u64.to_ne_bytes());
        let h = HeldRaw(b).parse();
        assert_eq!(h.netns, 4026532000);
        assert_eq!(h.original_dst, "10.0.0.7:6379".parse().unwrap());
        assert_eq!((h.tgid, h.service_id, h.local_port), (1234, 9, 40000));
        assert_eq!((h.exec_id, h.socket_cookie, h.flow_v6), (77, 5, false));
        assert_eq!((h.pid, h.uid, h.start_boottime_ns), (1235, 1000, 42));
    }

    #[test]
    fn exec_record_fields() {
        let mut b = [0u8; 80];
        b[0..8].copy_from_slice(&7u64.to_ne_bytes());
        b[8..16].copy_from_slice(&9u64.to_ne_bytes());
        b[24..32].copy_from_slice(&1234u64.to_ne_bytes());
        b[32..36].copy_from_slice(&(254u32 << 20).to_ne_bytes());
        b[36..40].copy_from_slice(&(ExecFlags::LD_PRELOAD | ExecFlags::PTRACE).to_ne_bytes());
        b[40..44].copy_from_slice(&77u32.to_ne_bytes());
        b[44..48].copy_from_slice(&4026531841u32.to_ne_bytes());
        b[48..53].copy_from_slice(b"forge");
        let r = ExecRaw(b).parse();
        assert_eq!((r.exec_id, r.start_ns, r.ino, r.tracer), (7, 9, 1234, 77));
        // 254:0 as stat(2) encodes it.
        assert_eq!(r.dev, 0xfe00);
        assert_eq!(r.name, "forge");
        assert_eq!(r.mnt_ns, 4026531841);
        assert!(r.flags.tainted() && r.flags.has(ExecFlags::LD_PRELOAD));
        assert_eq!(r.flags.names(), vec!["LD_PRELOAD", "ptrace attach"]);
        // Large minors and majors use the split encoding.
        assert_eq!(user_dev((259 << 20) | 0x12345), libc::makedev(259, 0x12345));
    }

    #[test]
    fn event_parse_rejects_garbage() {
        assert_eq!(Event::parse(&[0; 10]), Err(EventError::Short(10)));
        let mut b = [0u8; EVENT_LEN];
        b[44] = 200;
        assert_eq!(Event::parse(&b), Err(EventError::Verdict(200)));
        b[44] = 1;
        b[45] = 17;
        b[46..48].copy_from_slice(&53u16.to_be_bytes());
        b[48..64].copy_from_slice(&Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped().octets());
        b[64] = 2;
        b[65..69].copy_from_slice(b"dig\0");
        let e = Event::parse(&b).unwrap();
        assert_eq!(e.decision, Decision::Allow);
        assert_eq!(e.proto, Proto::Udp);
        assert_eq!(e.port, 53);
        assert_eq!(e.addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(e.hook, Hook::Sendmsg4);
        assert_eq!(e.comm, "dig");
    }
}
