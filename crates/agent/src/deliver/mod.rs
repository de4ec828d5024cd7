//! The delivery plane: how a process receives what it is entitled to. The
//! SPIFFE Workload API (gRPC, with its HTTP/2 `:authority` shim and the
//! per-write sender check), and the credential filesystem (`credfs`); token
//! exchange belongs here.

pub mod credfs;
pub mod exchange;
pub mod h2_authority;
pub mod sender;
pub mod workload_api;
