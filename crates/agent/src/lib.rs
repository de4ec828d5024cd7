//! The Tether node agent: attests processes, holds their keys and SVIDs,
//! and serves the SPIFFE Workload API.
//!
//! Threads and tasks (see docs/ARCHITECTURE.md): one OS thread reads kernel
//! process events; tokio tasks run the tracker loop, the server watch
//! stream, node SVID renewal, the Workload API, the admin API and metrics.

//!
//! Planes (modules), each depending only on those listed before it
//! (`tests/planes.rs` checks the imports):
//!
//! | plane | owns |
//! |---|---|
//! | `clock`, `metrics`, `host_addrs` | leaves: time, counters, this host's addresses |
//! | `audit` | the audit record sinks |
//! | `identity` | keys, SVIDs, the node's identity, who signs (`Signer`) |
//! | `state` | registry, process table, exec checks |
//! | `decide` | pure: registry to verdicts, ingress, explanations |
//! | `enforce` | subjects and kernel maps from `decide`'s verdicts; kernel audit events |
//! | `deliver` | Workload API, credential filesystem, fetching credentials (not `decide`, `enforce`) |
//! | `proxy` | hold path, mesh tunnels, credential injection (uses `deliver::fetch`) |
//! | `admin` | read-only views over the above |
//! | `app` | builds and wires everything; owns tasks and shutdown |

mod clock;
mod host_addrs;
mod metrics;

mod audit;
mod identity;
mod state;

mod decide;
mod enforce;

mod deliver;
mod proxy;

mod admin;
mod app;

pub use app::{AgentConfig, DEFAULT_PIN_DIR, EnforceConfig, RunningAgent, harden_process, start};
pub use clock::{Clock, file as file_clock, system as system_clock};
pub use deliver::{exchange, h2_authority};
pub use identity::live_keys;
pub use identity::node::{NodeConn, NodeIdentity, Servers, channel as server_channel};
pub use metrics::Metrics;
pub use proxy::mesh::DEFAULT_PORT as DEFAULT_MESH_PORT;
pub use proxy::{http as inject_http, postgres as inject_postgres, redis as inject_redis};
pub use state::registry::Registry;
pub use state::tracker::Tracker;

/// A boxed future: what the seams' traits return, so they stay object
/// safe without another crate.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;
