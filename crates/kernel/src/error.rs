//! Errors name the map, program, link or path involved and, where there is
//! one, what the operator can do about it.

use std::{error::Error as StdError, fmt::Write as _, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "loading the BPF object failed: {detail} (needs root or CAP_BPF+CAP_NET_ADMIN+CAP_PERFMON, \
         and a kernel with BTF at /sys/kernel/btf/vmlinux)"
    )]
    Load { detail: String },

    #[error("BPF program `{program}`: {action} failed: {detail}")]
    Program {
        program: &'static str,
        action: &'static str,
        detail: String,
    },

    #[error("BPF map `{map}`: {op} failed: {detail}")]
    Map {
        map: &'static str,
        op: &'static str,
        detail: String,
    },

    #[error(
        "pinned map `{map}` at {path} does not match this agent's programs ({mismatch}); \
         remove the old state with the detach command, then start the agent again"
    )]
    IncompatiblePin {
        map: &'static str,
        path: PathBuf,
        mismatch: String,
    },

    #[error("link `{link}` at {path}: {op} failed: {source}")]
    Link {
        link: &'static str,
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{path} is not on a BPF filesystem (bpffs); pins need one: \
         `mount -t bpf bpf /sys/fs/bpf` and use a directory under it"
    )]
    NotBpffs { path: PathBuf },

    #[error("{path} is not a cgroup v2 directory (see the cgroup2 line of /proc/mounts)")]
    NotCgroup2 { path: PathBuf },

    #[error("{path}: {op} failed: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("BPF map `events`: {0}")]
    Event(#[from] crate::abi::EventError),

    #[error("invalid destination prefix {0}")]
    InvalidPrefix(String),
}

/// The error and all its sources on one line: aya's top-level messages are
/// often just "error relocating section", the useful part is underneath.
pub(crate) fn chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let msg = inner.to_string();
        if !s.contains(&msg) {
            let _ = write!(s, ": {msg}");
        }
        cur = inner.source();
    }
    s
}

/// Program errors, with the verifier's log when the kernel rejected the
/// program (its tail says why).
pub(crate) fn program_err(
    program: &'static str,
    action: &'static str,
    e: &aya::programs::ProgramError,
) -> KernelError {
    let mut detail = chain(e);
    if let aya::programs::ProgramError::LoadError { verifier_log, .. } = e {
        let log = verifier_log.to_string();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        let _ = write!(detail, "\nverifier log (last lines):\n{tail}");
    }
    KernelError::Program {
        program,
        action,
        detail,
    }
}

pub(crate) fn map_err(map: &'static str, op: &'static str, e: &aya::maps::MapError) -> KernelError {
    KernelError::Map {
        map,
        op,
        detail: chain(e),
    }
}
