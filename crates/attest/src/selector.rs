//! Selectors: the `TYPE:VALUE` attributes workload identities are bound to.
//!
//! The string form is canonical: `parse(s).to_string()` is the normalised
//! spelling and parses back to the same value. Parsing is strict so that a
//! typo in a manifest is an error rather than a selector that never matches.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::process::ProcessInfo;

/// Longest value a selector may carry.
pub const MAX_VALUE_LEN: usize = 4096;

/// One attribute a process must have.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Selector {
    /// `unix:uid` — effective uid.
    Uid(u32),
    /// `unix:gid` — effective gid.
    Gid(u32),
    /// `unix:user` — name of the effective uid in the host's /etc/passwd.
    User(String),
    /// `unix:group` — name of the effective gid in the host's /etc/group.
    Group(String),
    /// `process:path` — executable path.
    Path(String),
    /// `process:sha256` — hash of the executable, lowercase hex.
    Sha256(String),
    /// `process:name` — comm (15 bytes at most; settable by the process).
    Name(String),
    /// `process:cmdline` — arguments joined by single spaces.
    Cmdline(String),
    /// `process:cmdline-prefix` — leading whole arguments of the command line.
    CmdlinePrefix(String),
    /// `process:parent:path` — executable path of the parent.
    ParentPath(String),
    /// `cgroup:path` — cgroup v2 path.
    CgroupPath(String),
    /// `container:id` — full 64-hex container id.
    ContainerId(String),
    /// `container:name` — the name the runtime recorded for the container.
    ContainerName(String),
    /// `container:image` — the image ID (64 hex) the runtime recorded.
    ContainerImage(String),
    /// `container:runtime` — the OCI runtime that started it (`runc`, `crun`).
    ContainerRuntime(String),
    /// `container:path` — executable path as the container itself sees it.
    ContainerPath(String),
    /// `systemd:unit` — e.g. `nginx.service`.
    SystemdUnit(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Uid,
    Gid,
    User,
    Group,
    Path,
    Sha256,
    Name,
    Cmdline,
    CmdlinePrefix,
    ParentPath,
    CgroupPath,
    ContainerId,
    ContainerName,
    ContainerImage,
    ContainerRuntime,
    ContainerPath,
    SystemdUnit,
}

/// Type prefixes in display order (for error messages).
const TYPES: [(&str, Kind); 17] = [
    ("unix:uid", Kind::Uid),
    ("unix:gid", Kind::Gid),
    ("unix:user", Kind::User),
    ("unix:group", Kind::Group),
    ("process:path", Kind::Path),
    ("process:sha256", Kind::Sha256),
    ("process:name", Kind::Name),
    ("process:cmdline", Kind::Cmdline),
    ("process:cmdline-prefix", Kind::CmdlinePrefix),
    ("process:parent:path", Kind::ParentPath),
    ("cgroup:path", Kind::CgroupPath),
    ("container:id", Kind::ContainerId),
    ("container:name", Kind::ContainerName),
    ("container:image", Kind::ContainerImage),
    ("container:runtime", Kind::ContainerRuntime),
    ("container:path", Kind::ContainerPath),
    ("systemd:unit", Kind::SystemdUnit),
];

/// Why a selector string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("selector {selector:?}: unknown type; valid types are {valid}")]
    UnknownType { selector: String, valid: String },
    #[error("selector {selector:?}: {reason}")]
    InvalidValue { selector: String, reason: String },
}

/// Shortened copy of user input for error messages (input may be huge).
fn excerpt(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Rules every selector value follows.
fn validate_value(v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Err("value is empty".into());
    }
    if v.len() > MAX_VALUE_LEN {
        return Err(format!(
            "value is {} bytes; the limit is {MAX_VALUE_LEN}",
            v.len()
        ));
    }
    if v.contains('\0') {
        return Err("value contains a NUL byte".into());
    }
    Ok(())
}

fn parse_id(v: &str) -> Result<u32, String> {
    if !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{v:?} is not a decimal number"));
    }
    // One spelling per id keeps the string form canonical.
    if v.len() > 1 && v.starts_with('0') {
        return Err(format!("{v:?} has leading zeros"));
    }
    v.parse::<u32>()
        .map_err(|_| format!("{v:?} does not fit in 32 bits"))
}

fn parse_hex64(v: &str, what: &str) -> Result<String, String> {
    if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{what} must be exactly 64 hex digits"));
    }
    Ok(v.to_ascii_lowercase())
}

fn absolute(v: &str) -> Result<String, String> {
    if !v.starts_with('/') {
        return Err("path must be absolute (start with '/')".into());
    }
    Ok(v.to_owned())
}

impl Selector {
    /// Parses a canonical `TYPE:VALUE` string.
    pub fn parse(s: &str) -> Result<Selector, SelectorError> {
        let invalid = |reason: String| SelectorError::InvalidValue {
            selector: excerpt(s),
            reason,
        };
        // Longest type first, so a type that is a prefix of another never
        // captures it.
        let mut found: Option<(&str, Kind, &str)> = None;
        for (name, kind) in TYPES {
            if let Some(value) = s.strip_prefix(name).and_then(|r| r.strip_prefix(':'))
                && found.is_none_or(|(n, _, _)| n.len() < name.len())
            {
                found = Some((name, kind, value));
            }
        }
        let Some((_, kind, value)) = found else {
            if let Some((name, _)) = TYPES.iter().find(|(name, _)| s == *name) {
                return Err(invalid(format!("no value after {name:?}")));
            }
            let valid: Vec<&str> = TYPES.iter().map(|(n, _)| *n).collect();
            return Err(SelectorError::UnknownType {
                selector: excerpt(s),
                valid: valid.join(", "),
            });
        };
        validate_value(value).map_err(invalid)?;
        let sel = match kind {
            Kind::Uid => Selector::Uid(parse_id(value).map_err(invalid)?),
            Kind::Gid => Selector::Gid(parse_id(value).map_err(invalid)?),
            Kind::User | Kind::Group => {
                // passwd/group names cannot contain these, so such a
                // selector could never match.
                if value.contains([':', '\n']) {
                    return Err(invalid("names cannot contain ':' or newlines".into()));
                }
                if kind == Kind::User {
                    Selector::User(value.to_owned())
                } else {
                    Selector::Group(value.to_owned())
                }
            }
            Kind::Path => Selector::Path(absolute(value).map_err(invalid)?),
            Kind::ParentPath => Selector::ParentPath(absolute(value).map_err(invalid)?),
            Kind::CgroupPath => Selector::CgroupPath(absolute(value).map_err(invalid)?),
            Kind::Sha256 => Selector::Sha256(parse_hex64(value, "sha256").map_err(invalid)?),
            Kind::ContainerId => Selector::ContainerId(
                parse_hex64(
                    value,
                    "container id (the full id, not the 12-digit short form)",
                )
                .map_err(invalid)?,
            ),
            Kind::ContainerImage => Selector::ContainerImage(
                parse_hex64(
                    value.strip_prefix("sha256:").unwrap_or(value),
                    "image ID (64 hex digits, as `podman images --no-trunc` shows)",
                )
                .map_err(invalid)?,
            ),
            Kind::ContainerName | Kind::ContainerRuntime => {
                if value.contains(['/', '\n']) || value.chars().any(char::is_whitespace) {
                    return Err(invalid(
                        "names cannot contain '/', whitespace or newlines".into(),
                    ));
                }
                if kind == Kind::ContainerName {
                    Selector::ContainerName(value.to_owned())
                } else {
                    Selector::ContainerRuntime(value.to_owned())
                }
            }
            Kind::ContainerPath => Selector::ContainerPath(absolute(value).map_err(invalid)?),
            Kind::Name => Selector::Name(value.to_owned()),
            Kind::Cmdline => Selector::Cmdline(value.to_owned()),
            Kind::CmdlinePrefix => Selector::CmdlinePrefix(value.to_owned()),
            Kind::SystemdUnit => {
                let is_unit = [".service", ".scope"]
                    .iter()
                    .any(|suf| value.len() > suf.len() && value.ends_with(suf));
                if value.contains('/') || !is_unit {
                    return Err(invalid(
                        "unit must be a name ending in .service or .scope, e.g. nginx.service"
                            .into(),
                    ));
                }
                Selector::SystemdUnit(value.to_owned())
            }
        };
        Ok(sel)
    }

    /// The `TYPE` part of the canonical form.
    pub fn type_name(&self) -> &'static str {
        match self {
            Selector::Uid(_) => "unix:uid",
            Selector::Gid(_) => "unix:gid",
            Selector::User(_) => "unix:user",
            Selector::Group(_) => "unix:group",
            Selector::Path(_) => "process:path",
            Selector::Sha256(_) => "process:sha256",
            Selector::Name(_) => "process:name",
            Selector::Cmdline(_) => "process:cmdline",
            Selector::CmdlinePrefix(_) => "process:cmdline-prefix",
            Selector::ParentPath(_) => "process:parent:path",
            Selector::CgroupPath(_) => "cgroup:path",
            Selector::ContainerId(_) => "container:id",
            Selector::ContainerName(_) => "container:name",
            Selector::ContainerImage(_) => "container:image",
            Selector::ContainerRuntime(_) => "container:runtime",
            Selector::ContainerPath(_) => "container:path",
            Selector::SystemdUnit(_) => "systemd:unit",
        }
    }

    /// Whether `p` has this attribute. `CmdlinePrefix` matches whole leading
    /// arguments: the joined command line equals the value or continues
    /// with a space after it (so `/usr/bin/python3` does not match
    /// `/usr/bin/python3.11`). Everything else is an exact comparison.
    pub fn matches(&self, p: &ProcessInfo) -> bool {
        let opt_eq = |o: &Option<String>, v: &str| o.as_deref() == Some(v);
        match self {
            Selector::Uid(u) => p.uid == *u,
            Selector::Gid(g) => p.gid == *g,
            Selector::User(v) => opt_eq(&p.user, v),
            Selector::Group(v) => opt_eq(&p.group, v),
            // The path as the host sees it, never one a private mount
            // namespace or chroot made up.
            Selector::Path(v) => p.exe_path_host && p.exe_path == *v,
            Selector::Sha256(v) => p.sha256 == *v,
            Selector::Name(v) => p.name == *v,
            Selector::Cmdline(v) => p.cmdline.join(" ") == *v,
            Selector::CmdlinePrefix(v) => {
                let joined = p.cmdline.join(" ");
                joined
                    .strip_prefix(v.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '))
            }
            Selector::ParentPath(v) => opt_eq(&p.parent_path, v),
            Selector::CgroupPath(v) => p.cgroup == *v,
            Selector::ContainerId(v) => opt_eq(&p.container_id, v),
            // Only what the runtime's own state says, tied to the process
            // (see crate::container): never a cgroup name alone.
            Selector::ContainerName(v) => opt_eq(&p.container.as_ref().map(|c| c.name.clone()), v),
            Selector::ContainerImage(v) => {
                opt_eq(&p.container.as_ref().map(|c| c.image.clone()), v)
            }
            Selector::ContainerRuntime(v) => {
                opt_eq(&p.container.as_ref().map(|c| c.runtime.clone()), v)
            }
            Selector::ContainerPath(v) => p
                .container
                .as_ref()
                .is_some_and(|c| c.path.as_deref() == Some(v.as_str())),
            Selector::SystemdUnit(v) => opt_eq(&p.systemd_unit, v),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.type_name();
        match self {
            Selector::Uid(n) | Selector::Gid(n) => write!(f, "{t}:{n}"),
            Selector::User(v)
            | Selector::Group(v)
            | Selector::Path(v)
            | Selector::Sha256(v)
            | Selector::Name(v)
            | Selector::Cmdline(v)
            | Selector::CmdlinePrefix(v)
            | Selector::ParentPath(v)
            | Selector::CgroupPath(v)
            | Selector::ContainerId(v)
            | Selector::ContainerName(v)
            | Selector::ContainerImage(v)
            | Selector::ContainerRuntime(v)
            | Selector::ContainerPath(v)
            | Selector::SystemdUnit(v) => write!(f, "{t}:{v}"),
        }
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Selector::parse(s)
    }
}

/// True when `p` matches every selector in `set`. An empty set matches
/// nothing: an identity with no selectors must not be granted to everyone.
pub fn matches_all(set: &[Selector], p: &ProcessInfo) -> bool {
    !set.is_empty() && set.iter().all(|s| s.matches(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ProcessInfo {
        ProcessInfo {
            pid: 10,
            ppid: 1,
            start_time: 5,
            uid: 1000,
            gid: 100,
            user: Some("alice".into()),
            group: Some("users".into()),
            exe_path: "/usr/bin/python3.11".into(),
            exe_path_host: true,
            sha256: "ab".repeat(32),
            name: "python3".into(),
            cmdline: vec!["/usr/bin/python3".into(), "app.py".into()],
            parent_path: Some("/usr/bin/bash".into()),
            cgroup: "/system.slice/app.service".into(),
            container_id: None,
            systemd_unit: Some("app.service".into()),
            ..ProcessInfo::default()
        }
    }

    #[test]
    fn round_trip() {
        let hex = "0123456789abcdef".repeat(4);
        let inputs = [
            "unix:uid:1000".to_owned(),
            "unix:uid:0".into(),
            "unix:gid:4294967295".into(),
            "unix:user:alice".into(),
            "unix:group:users".into(),
            "process:path:/usr/bin/python3".into(),
            format!("process:sha256:{hex}"),
            "process:name:nginx: worker".into(),
            "process:cmdline:/usr/bin/python3 app.py".into(),
            "process:cmdline-prefix:/usr/bin/python3".into(),
            "process:parent:path:/usr/bin/bash".into(),
            "cgroup:path:/system.slice/nginx.service".into(),
            format!("container:id:{hex}"),
            "systemd:unit:nginx.service".into(),
            "systemd:unit:session-3.scope".into(),
        ];
        for s in inputs {
            let sel = Selector::parse(&s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(sel.to_string(), s);
            assert_eq!(s.parse::<Selector>().unwrap(), sel);
        }
    }

    #[test]
    fn longest_type_wins() {
        assert_eq!(
            Selector::parse("process:parent:path:/bin/sh").unwrap(),
            Selector::ParentPath("/bin/sh".into())
        );
        assert_eq!(
            Selector::parse("process:cmdline-prefix:/bin/sh -c").unwrap(),
            Selector::CmdlinePrefix("/bin/sh -c".into())
        );
        // Value may itself contain the separator.
        assert_eq!(
            Selector::parse("process:cmdline:a:b").unwrap(),
            Selector::Cmdline("a:b".into())
        );
    }

    #[test]
    fn sha256_normalised_to_lowercase() {
        let upper = "ABCDEF0123456789".repeat(4);
        let sel = Selector::parse(&format!("process:sha256:{upper}")).unwrap();
        assert_eq!(sel, Selector::Sha256(upper.to_lowercase()));
        assert_eq!(Selector::parse(&sel.to_string()).unwrap(), sel);
    }

    #[test]
    fn rejections() {
        let long = format!("process:cmdline:{}", "a".repeat(MAX_VALUE_LEN + 1));
        let bad = [
            "",
            "unix",
            "unix:uid",
            "unix:uid:",
            "unix:uid:-1",
            "unix:uid:+1",
            "unix:uid: 1",
            "unix:uid:007",
            "unix:uid:4294967296",
            "unix:uid:1e3",
            "unix:gid:abc",
            "unix:user:a:b",
            "process:sha256:abc",
            "process:sha256:zz23456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "process:path:usr/bin/x",
            "process:parent:path:relative",
            "cgroup:path:system.slice",
            "container:id:0123456789ab",
            "systemd:unit:nginx",
            "systemd:unit:a/b.service",
            "process:name:a\0b",
            "process:cmdline:",
            &long,
            "UNIX:UID:1",
            "process:pathx:/bin/sh",
            "k8s:ns:default",
            "unix:uid1000",
        ];
        for s in bad {
            assert!(Selector::parse(s).is_err(), "accepted {s:?}");
        }
        let e = Selector::parse("k8s:ns:default").unwrap_err().to_string();
        assert!(
            e.contains("k8s:ns:default") && e.contains("unix:uid") && e.contains("systemd:unit"),
            "{e}"
        );
        let e = Selector::parse("unix:uid:abc").unwrap_err().to_string();
        assert!(e.contains("unix:uid:abc") && e.contains("decimal"), "{e}");
        let e = Selector::parse(&long).unwrap_err().to_string();
        assert!(e.len() < 300 && e.contains("limit"), "{e}");
    }

    #[test]
    fn matching() {
        let p = info();
        let yes = [
            "unix:uid:1000",
            "unix:gid:100",
            "unix:user:alice",
            "unix:group:users",
            "process:path:/usr/bin/python3.11",
            "process:name:python3",
            "process:cmdline:/usr/bin/python3 app.py",
            "process:cmdline-prefix:/usr/bin/python3",
            "process:cmdline-prefix:/usr/bin/python3 app.py",
            "process:parent:path:/usr/bin/bash",
            "cgroup:path:/system.slice/app.service",
            "systemd:unit:app.service",
        ];
        for s in yes {
            assert!(Selector::parse(s).unwrap().matches(&p), "{s}");
        }
        let no = [
            "unix:uid:0",
            "unix:user:root",
            "process:path:/usr/bin/python3",
            "process:cmdline:/usr/bin/python3",
            "process:cmdline-prefix:/usr/bin/pyth",
            "process:cmdline-prefix:/usr/bin/python3 app.py x",
            "cgroup:path:/system.slice",
            "systemd:unit:other.service",
        ];
        for s in no {
            assert!(!Selector::parse(s).unwrap().matches(&p), "{s}");
        }
        assert!(!Selector::ContainerId("ab".repeat(32)).matches(&p));
        assert!(Selector::Sha256("ab".repeat(32)).matches(&p));
    }

    #[test]
    fn matches_all_is_and_and_empty_is_false() {
        let p = info();
        assert!(!matches_all(&[], &p));
        assert!(matches_all(&[Selector::Uid(1000), Selector::Gid(100)], &p));
        assert!(!matches_all(&[Selector::Uid(1000), Selector::Gid(0)], &p));
    }

    #[test]
    fn selectors_listing_round_trips() {
        let p = info();
        let list = p.selectors();
        let mut sorted = list.clone();
        sorted.sort();
        assert_eq!(list, sorted);
        assert!(list.contains(&"unix:uid:1000".to_owned()));
        assert!(list.contains(&"process:cmdline:/usr/bin/python3 app.py".to_owned()));
        assert!(list.contains(&"systemd:unit:app.service".to_owned()));
        for s in &list {
            let sel = Selector::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert!(sel.matches(&p), "{s}");
        }
        assert_eq!(list.len(), 11);
    }
}
