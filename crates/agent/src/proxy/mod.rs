//! The proxy plane: connections the kernel sends to the agent. `hold`
//! takes connections of processes not attested yet and dispatches allowed
//! ones directly, into the mesh, or to the injector; `mesh` carries them
//! between agents over mutual TLS (outbound and inbound) and keeps the
//! connection table; `inject` adds a bound process's credential to its
//! connections on the way out (`http`, `redis`: the protocol halves);
//! `netns` keeps a hold listener in every network namespace with workload
//! processes and makes upstream sockets where their connections came from.

pub mod hold;
pub mod http;
pub mod inject;
pub mod mesh;
pub mod netns;
pub mod postgres;
pub mod redis;
