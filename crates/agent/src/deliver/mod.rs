//! The delivery plane: how a process receives what it is entitled to. The
//! SPIFFE Workload API (gRPC, with its HTTP/2 `:authority` shim and the
//! per-write sender check) today; the credential filesystem and token
//! exchange belong here.

pub mod h2_authority;
pub mod sender;
pub mod workload_api;
