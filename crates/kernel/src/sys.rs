//! The few bpf(2) commands we issue ourselves: creating and pinning links
//! (aya 0.14 cannot turn a sock_ops link into a pinnable fd link, so every
//! link is made here the same way), replacing the program of a live link
//! (BPF_LINK_UPDATE), forcing a link off its hook (BPF_LINK_DETACH), reading
//! a cgroup link's target, and walking all links. Also statfs checks for
//! bpffs and cgroup2, the network namespace cookie, and attaching the sk_msg
//! program to its sockhash.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_ENABLE_STATS: libc::c_long = 32;

pub(crate) const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// asm-generic value (x86, arm64, riscv); not exported by every libc release.
const SO_NETNS_COOKIE: libc::c_int = 71;

pub(crate) const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
pub(crate) const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// `union bpf_attr` is 144 bytes on current kernels; the kernel accepts a
/// shorter attr and zero-fills the rest, and every command here fits in 24.
#[repr(C, align(8))]
#[derive(Default)]
struct Attr([u32; 8]);

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, writable, 8-aligned buffer of the size we
    // pass; the kernel reads/writes at most that many bytes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<Attr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn fd_result(r: libc::c_long) -> io::Result<OwnedFd> {
    let fd = i32::try_from(r).map_err(|_| io::Error::other("bpf returned an out-of-range fd"))?;
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn raw(fd: BorrowedFd<'_>) -> u32 {
    // fds are non-negative.
    fd.as_raw_fd() as u32
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn put_ptr(attr: &mut Attr, at: usize, ptr: u64) {
    attr.0[at] = ptr as u32;
    attr.0[at + 1] = (ptr >> 32) as u32;
}

/// Pins a BPF object (here: a link) at `path` on a bpffs.
pub(crate) fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    let mut attr = Attr::default();
    put_ptr(&mut attr, 0, c.as_ptr() as u64);
    attr.0[2] = raw(fd);
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// Attaches `prog` to the cgroup `target` as a bpf_link (kernel 5.7+).
/// Closing the last fd (and pin) of the link detaches it.
pub(crate) fn link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = Attr::default();
    attr.0[0] = raw(prog);
    attr.0[1] = raw(target);
    attr.0[2] = attach_type;
    fd_result(bpf(BPF_LINK_CREATE, &mut attr)?)
}

/// Attaches `prog` to a map (an sk_msg program to a sockhash) the old way,
/// BPF_PROG_ATTACH: the attachment lives as long as the map, so a pinned
/// map keeps it while the agent is down, and attaching again replaces the
/// program.
pub(crate) fn prog_attach(
    target: BorrowedFd<'_>,
    prog: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<()> {
    let mut attr = Attr::default();
    attr.0[0] = raw(target);
    attr.0[1] = raw(prog);
    attr.0[2] = attach_type;
    bpf(BPF_PROG_ATTACH, &mut attr).map(drop)
}

/// Attaches `prog` to the raw tracepoint `name`; the fd is a bpf_link.
pub(crate) fn raw_tracepoint_open(name: &str, prog: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let c = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains a NUL byte"))?;
    let mut attr = Attr::default();
    put_ptr(&mut attr, 0, c.as_ptr() as u64);
    attr.0[2] = raw(prog);
    fd_result(bpf(BPF_RAW_TRACEPOINT_OPEN, &mut attr)?)
}

/// The cookie of the calling thread's network namespace, as
/// `bpf_get_netns_cookie` reports it to programs (SO_NETNS_COOKIE, 5.14+).
pub fn netns_cookie() -> io::Result<u64> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd was just created and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    socket_netns_cookie(fd.as_fd())
}

/// The cookie of the network namespace a socket belongs to (the one it was
/// created in).
pub fn socket_netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` is a writable u64 and `len` says so.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &raw mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Opens a pinned BPF object (map, program or link).
pub(crate) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = c_path(path)?;
    let mut attr = Attr::default();
    put_ptr(&mut attr, 0, c.as_ptr() as u64);
    fd_result(bpf(BPF_OBJ_GET, &mut attr)?)
}

/// Atomically replaces the program behind a link: the hook is never empty.
pub(crate) fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::default();
    attr.0[0] = raw(link);
    attr.0[1] = raw(new_prog);
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// Detaches a link from its hook even if other fds or pins still hold it.
pub(crate) fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::default();
    attr.0[0] = raw(link);
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

/// What we need from `struct bpf_link_info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LinkInfo {
    pub(crate) link_type: u32,
    pub(crate) prog_id: u32,
    /// Only meaningful for cgroup links.
    pub(crate) cgroup_id: u64,
    pub(crate) attach_type: u32,
}

fn obj_info(fd: BorrowedFd<'_>, buf: &mut [u64]) -> io::Result<()> {
    let mut attr = Attr::default();
    attr.0[0] = raw(fd);
    attr.0[1] = u32::try_from(size_of_val(buf)).unwrap_or(u32::MAX);
    let ptr = buf.as_mut_ptr() as u64;
    attr.0[2] = ptr as u32;
    attr.0[3] = (ptr >> 32) as u32;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
}

pub(crate) fn link_info(fd: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    // struct bpf_link_info: type u32 @0, id u32 @4, prog_id u32 @8, then a
    // union at 16; for cgroup links: cgroup_id u64 @16, attach_type u32 @24.
    let mut buf = [0u64; 6];
    obj_info(fd, &mut buf)?;
    Ok(LinkInfo {
        link_type: buf[0] as u32,
        prog_id: buf[1] as u32,
        cgroup_id: buf[2],
        attach_type: buf[3] as u32,
    })
}

/// Name of a loaded program (truncated by the kernel to 15 bytes).
pub(crate) fn prog_name(prog_id: u32) -> io::Result<String> {
    let mut attr = Attr::default();
    attr.0[0] = prog_id;
    let fd = fd_result(bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?)?;
    // struct bpf_prog_info: name[16] at byte 64.
    let mut buf = [0u64; 10];
    obj_info(std::os::fd::AsFd::as_fd(&fd), &mut buf)?;
    let bytes: Vec<u8> = buf[8..10].iter().flat_map(|w| w.to_ne_bytes()).collect();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    Ok(String::from_utf8_lossy(&bytes[..end]).into_owned())
}

/// Cumulative (run time ns, run count) of a program, counted only while
/// some process holds a [`enable_run_stats`] fd.
pub(crate) fn prog_run_stats(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    // struct bpf_prog_info: run_time_ns u64 at byte 192, run_cnt at 200.
    let mut buf = [0u64; 26];
    obj_info(fd, &mut buf)?;
    Ok((buf[24], buf[25]))
}

/// Turns on the kernel's per-program run-time accounting until the
/// returned fd is closed (BPF_ENABLE_STATS, BPF_STATS_RUN_TIME). Costs a
/// clock read around every program run: for measuring, not production.
pub(crate) fn enable_run_stats() -> io::Result<OwnedFd> {
    let mut attr = Attr::default();
    attr.0[0] = 0; // BPF_STATS_RUN_TIME
    fd_result(bpf(BPF_ENABLE_STATS, &mut attr)?)
}

/// All link ids in the system (a snapshot; links may come and go).
pub(crate) fn link_ids() -> io::Result<Vec<u32>> {
    let mut ids = Vec::new();
    let mut start = 0u32;
    loop {
        let mut attr = Attr::default();
        attr.0[0] = start;
        match bpf(BPF_LINK_GET_NEXT_ID, &mut attr) {
            Ok(_) => {
                start = attr.0[1];
                ids.push(start);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(ids),
            Err(e) => return Err(e),
        }
    }
}

pub(crate) fn link_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = Attr::default();
    attr.0[0] = id;
    fd_result(bpf(BPF_LINK_GET_FD_BY_ID, &mut attr)?)
}

/// `statfs(path).f_type`.
pub(crate) fn fs_type(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: zeroed statfs is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is writable.
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's width differs by libc target"
    )]
    Ok(st.f_type as i64)
}
