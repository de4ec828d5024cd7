//! The delivery plane: how a process receives what it is entitled to. The
//! SPIFFE Workload API (gRPC, with its HTTP/2 `:authority` shim and the
//! per-write sender check), the credential filesystem (`credfs`), and what
//! both it and the injecting proxy use to obtain values (`fetch`, with token
//! exchange in `exchange`).

pub mod credfs;
pub mod exchange;
pub mod fetch;
pub mod h2_authority;
pub mod sender;
pub mod workload_api;
