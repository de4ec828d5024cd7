//! Generated protobuf and gRPC code for the SPIFFE Workload API and
//! Tether's own node and admin APIs.
//!
//! The generated files under `src/gen/` are committed so a build needs no
//! `protoc`; `tests/codegen.rs` regenerates them and fails if they differ.

#![allow(clippy::all, missing_docs)]

/// The SPIFFE Workload API (`SpiffeWorkloadAPI`, no protobuf package).
pub mod workload {
    include!("gen/_.rs");
}

/// Tether's node, admin and agent-admin APIs.
pub mod tether {
    include!("gen/tether.v1.rs");
}

/// Request metadata every Workload API call must carry, per the spec.
pub const WORKLOAD_METADATA_KEY: &str = "workload.spiffe.io";

pub mod uds;
