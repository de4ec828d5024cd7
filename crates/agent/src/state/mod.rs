//! The state plane: the registry as this node sees it, the process table
//! (keyed by process instance), and the exec checks that decide whether
//! an attested process may hold an identity at all. It depends on
//! `identity` (to have SVIDs issued) and on nothing that acts on
//! processes: those parts observe it ([`tracker::ProcessObserver`]).

pub mod registry;
pub mod tracker;
pub mod verify;
