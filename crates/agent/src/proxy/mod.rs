//! The proxy plane: connections the kernel sends to the agent. `hold`
//! takes connections of processes not attested yet and dispatches allowed
//! ones directly or into the mesh; `mesh` carries them between agents over
//! mutual TLS (outbound and inbound) and keeps the connection table. The
//! coming egress filters (credential injection) belong here.

pub mod hold;
pub mod mesh;
