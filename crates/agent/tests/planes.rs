//! The agent's planes depend on each other in one direction only (see the
//! table in src/lib.rs). This reads every module's `crate::` paths and
//! fails on an edge the table does not allow, so a back-pointer cannot
//! creep in unnoticed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The planes from the bottom up: each may use the planes before it,
/// unless [`NARROWER`] lists fewer. `crate::BoxFuture` (root) is open to
/// all.
const ORDER: &[&str] = &[
    "clock",
    "metrics",
    "host_addrs",
    "audit",
    "identity",
    "state",
    "decide",
    "enforce",
    // Below proxy: the injector obtains credentials through `deliver::fetch`.
    "deliver",
    "proxy",
    "admin",
    "app",
];

/// Planes held to fewer edges than everything below them.
const NARROWER: &[(&str, &[&str])] = &[
    ("clock", &[]),
    ("metrics", &[]),
    ("host_addrs", &[]),
    ("audit", &["clock"]),
    ("identity", &["clock", "metrics", "host_addrs"]),
    ("state", &["clock", "metrics", "host_addrs", "identity"]),
    ("decide", &["state"]),
    (
        "deliver",
        &[
            "clock",
            "metrics",
            "host_addrs",
            "audit",
            "identity",
            "state",
        ],
    ),
];

/// What `plane` may use; None for a module in no plane.
fn allowed(plane: &str) -> Option<Vec<&'static str>> {
    if let Some((_, only)) = NARROWER.iter().find(|(p, _)| *p == plane) {
        return Some(only.to_vec());
    }
    let at = ORDER.iter().position(|p| *p == plane)?;
    Some(ORDER[..at].to_vec())
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The first path segments after every `crate::` (including each name of
/// a `crate::{a, b::c}` group).
fn used_planes(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name = ident(item.trim());
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out
}

#[test]
fn planes_depend_in_one_direction() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() > 10, "found only {} sources", files.len());
    let planes: BTreeSet<&str> = ORDER.iter().copied().collect();
    let mut bad = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).expect("under src");
        let first = rel.iter().next().and_then(|c| c.to_str()).unwrap_or("");
        let plane = first.trim_end_matches(".rs");
        if plane == "lib" {
            continue; // the crate root declares the planes and re-exports
        }
        let Some(allowed) = allowed(plane) else {
            bad.push(format!(
                "{}: not in any plane; add it to the table",
                rel.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(f).expect("read");
        for used in used_planes(&text) {
            if used == plane || used == "BoxFuture" {
                continue;
            }
            if !planes.contains(used.as_str()) {
                bad.push(format!(
                    "{}: uses crate::{used}, which is no plane",
                    rel.display()
                ));
            } else if !allowed.contains(&used.as_str()) {
                bad.push(format!("{}: {plane} must not use {used}", rel.display()));
            }
        }
    }
    assert!(bad.is_empty(), "plane edges broken:\n{}", bad.join("\n"));
}

#[test]
fn the_checker_sees_grouped_and_nested_paths() {
    let used =
        used_planes("use crate::{admin, enforce::X};\nlet t = crate::state::tracker::now();");
    let want: BTreeSet<String> = ["admin", "enforce", "state"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(used, want);
}
