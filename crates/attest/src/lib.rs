//! Workload attestation for Tether: who is this Linux process?
//!
//! * [`pidfd`] pins a process so that a recycled pid can never be mistaken
//!   for the process we meant.
//! * [`process`] reads `/proc/PID/*` through a directory fd, hashes the
//!   executable actually mapped, and yields a [`ProcessInfo`].
//! * [`selector`] is the canonical `TYPE:VALUE` selector language that
//!   workload identities are written in.
//! * [`container`] reads what a container runtime recorded of the
//!   container a process runs in (name, image, runtime).
//! * [`events`] listens to the kernel proc connector for exec/fork/exit so
//!   the agent re-attests at the moment a process changes.
//!
//! Everything read from `/proc` or the kernel is treated as untrusted input:
//! parsing never panics, and errors name the pid and file involved.

pub mod container;
pub mod events;
pub mod pidfd;
pub mod process;
pub mod selector;
pub mod slots;

pub use container::ContainerInfo;
pub use events::{ProcConnector, ProcEvent, parse_datagram};
pub use pidfd::{PidFd, peer_pidfd};
pub use process::{
    AttestError, Attestor, EXEC_CHECKS, ExecCheck, FileAccess, HashLimits, ProcessInfo,
    UnreadableElf, list_pids, parse_interp,
};
pub use selector::{Selector, SelectorError, matches_all};
pub use slots::{KeyedSlot, KeyedSlots};
