//! Decisions, pure: the registry and a context in, verdicts out. No locks,
//! no kernel, no clock reads (time is an argument) and no name resolution
//! (a resolver is passed in), so every case is tested in process without
//! root (tests below). `enforce.rs` applies what this computes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use tether_attest::ProcessInfo;
use tether_kernel::{DstPrefix, Proto, ServiceFlags};
use tether_manifest::Protocol;

use crate::state::registry::Registry;

/// Rule id 0 is the default: a protected Service with no allowing policy.
pub const DEFAULT_DENY: &str = "default-deny";

/// Kernel numbers for Services and rules. Derived from names, not order,
/// so an agent restarted over adopted kernel maps agrees with its
/// predecessor about what a surviving verdict refers to; never reused
/// within one agent's life.
#[derive(Debug, Default, Clone)]
pub struct Names {
    pub services: HashMap<String, u32>,
    pub service_names: HashMap<u32, String>,
    pub rules: HashMap<String, u32>,
    pub rule_names: HashMap<u32, String>,
}

impl Names {
    /// Numbers every Service and policy of `reg` not numbered yet.
    pub fn assign(&mut self, reg: &Registry) {
        for s in &reg.services {
            if !self.services.contains_key(&s.name) {
                let id = stable_id(&s.name, &self.service_names);
                self.services.insert(s.name.clone(), id);
                self.service_names.insert(id, s.name.clone());
            }
        }
        for p in &reg.policies {
            if !self.rules.contains_key(&p.name) {
                let id = stable_id(&p.name, &self.rule_names);
                self.rules.insert(p.name.clone(), id);
                self.rule_names.insert(id, p.name.clone());
            }
        }
    }

    pub fn rule_name(&self, rule: u32) -> String {
        self.rule_names.get(&rule).cloned().unwrap_or_default()
    }
}

/// What a process (or identity) may reach now.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verdicts {
    /// Service id -> the allowing rule id.
    pub allowed: BTreeMap<u32, u32>,
    /// Services allowed only by a policy with a condition: their kernel
    /// verdicts expire unless refreshed.
    pub conditional: BTreeSet<u32>,
    /// Allowed Services a CredentialBinding of the process's identities
    /// injects into: the kernel sends those connects to the agent.
    pub inject: BTreeSet<u32>,
}

/// Why ingress was refused (the tunnel audits it and resets).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngressRefusal {
    #[error("no WorkloadIdentity has SPIFFE ID {peer}")]
    UnknownPeer { peer: String },
    #[error("no AccessPolicy lets {identities:?} reach {service} now")]
    NotAllowed {
        identities: Vec<String>,
        service: String,
    },
}

/// The process a decision is for; `None` fields for `policy check
/// --identity` (only what the identity implies).
pub struct Subject<'a> {
    pub info: Option<&'a ProcessInfo>,
    pub identities: &'a [String],
    pub spiffe_ids: &'a [String],
}

/// The verdicts for `who` on node `node` at Unix time `now`.
pub fn evaluate(reg: &Registry, names: &Names, node: &str, now: i64, who: &Subject) -> Verdicts {
    // Policies allow identities only; most processes on a host have none.
    if who.identities.is_empty() {
        return Verdicts::default();
    }
    let process = match who.info {
        Some(info) => serde_json::json!({
            "pid": info.pid, "uid": info.uid, "gid": info.gid,
            "user": info.user.clone().unwrap_or_default(), "group": info.group.clone().unwrap_or_default(),
            "path": info.exe_path, "sha256": info.sha256, "name": info.name,
            "cgroup": info.cgroup, "identities": who.identities, "spiffeIds": who.spiffe_ids,
        }),
        None => serde_json::json!({ "identities": who.identities, "spiffeIds": who.spiffe_ids }),
    };
    let ctx = serde_json::json!({
        "time": tether_policy::time_context(now),
        "node": node,
        "process": process,
    });
    allowed_by(reg, names, who.identities, &ctx)
}

/// Ingress policy: may a peer presenting `peer_id` reach `service`?
/// Judged with what this node knows: the identities registered under that
/// SPIFFE ID and this node's time. Neither `context.node` (this node is not
/// the client's) nor the client's process details (attested by its own
/// node) are present, so conditions on them deny here. Ok(rule name).
pub fn ingress(
    reg: &Registry,
    names: &Names,
    now: i64,
    service: &str,
    peer_id: &str,
) -> Result<String, IngressRefusal> {
    let identities: Vec<String> = reg
        .identities
        .iter()
        .filter(|i| i.spiffe_id.to_string() == peer_id)
        .map(|i| i.name.clone())
        .collect();
    if identities.is_empty() {
        return Err(IngressRefusal::UnknownPeer {
            peer: peer_id.to_owned(),
        });
    }
    let ctx = serde_json::json!({
        "time": tether_policy::time_context(now),
        "direction": "ingress",
        "process": { "identities": identities, "spiffeIds": [peer_id] },
    });
    let allowed = allowed_by(reg, names, &identities, &ctx).allowed;
    let sid = names.services.get(service).copied().unwrap_or(0);
    match allowed.get(&sid) {
        Some(rule) => Ok(names.rule_name(*rule)),
        None => Err(IngressRefusal::NotAllowed {
            identities,
            service: service.to_owned(),
        }),
    }
}

/// Explains the verdict for `who` and the Service the connect hook found
/// (None: the destination is not protected).
pub fn explain(
    reg: &Registry,
    names: &Names,
    node: &str,
    now: i64,
    who: &Subject,
    service: Option<&str>,
) -> serde_json::Value {
    let Some(service) = service else {
        return serde_json::json!({ "verdict": "untouched", "reason": "no Service covers this destination" });
    };
    let allowed = evaluate(reg, names, node, now, who).allowed;
    let sid = names.services.get(service).copied().unwrap_or(0);
    if let Some(rule) = allowed.get(&sid) {
        return serde_json::json!({
            "verdict": "allow", "service": service,
            "rule": names.rule_name(*rule), "identities": who.identities,
        });
    }
    // Name the policies that mention this service and why they did not
    // allow.
    let near: Vec<serde_json::Value> = reg
        .policies
        .iter()
        .filter(|p| p.spec.services.iter().any(|s| s == service))
        .map(|p| {
            let why = if !p.spec.identities.iter().any(|i| who.identities.contains(i)) {
                format!(
                    "allows identities {:?}, caller has {:?}",
                    p.spec.identities, who.identities
                )
            } else {
                format!(
                    "condition `{}` does not hold now",
                    p.spec.when.clone().unwrap_or_default()
                )
            };
            serde_json::json!({ "policy": p.name, "why": why })
        })
        .collect();
    serde_json::json!({
        "verdict": "deny", "service": service, "rule": DEFAULT_DENY,
        "identities": who.identities, "policies": near,
    })
}

/// Service id -> allowing rule id, for the policies naming one of
/// `identities` whose condition holds in `ctx`, and which of those
/// services only a conditional policy allows. A condition that fails to
/// evaluate does not allow.
fn allowed_by(
    reg: &Registry,
    names: &Names,
    identities: &[String],
    ctx: &serde_json::Value,
) -> Verdicts {
    let mut allowed = BTreeMap::new();
    let mut unconditional = BTreeSet::new();
    for p in &reg.policies {
        if !p.spec.identities.iter().any(|i| identities.contains(i)) {
            continue;
        }
        let holds = match &p.condition {
            None => true,
            Some(cond) => cond.holds(ctx).unwrap_or_else(|e| {
                tracing::debug!(policy = %p.name, error = %e, "condition did not evaluate; not allowing");
                false
            }),
        };
        if !holds {
            continue;
        }
        let rule = names.rules.get(&p.name).copied().unwrap_or(0);
        for s in &p.spec.services {
            if let Some(id) = names.services.get(s) {
                allowed.entry(*id).or_insert(rule);
                if p.condition.is_none() {
                    unconditional.insert(*id);
                }
            }
        }
    }
    let conditional = allowed
        .keys()
        .filter(|id| !unconditional.contains(id))
        .copied()
        .collect();
    // A binding gives a credential; only a policy gives access. A Service
    // the identity may not reach is refused, credential or not.
    let inject = reg
        .bindings
        .iter()
        .filter(|b| identities.contains(&b.identity))
        .filter_map(|b| names.services.get(&b.inject.as_ref()?.service).copied())
        .filter(|id| allowed.contains_key(id))
        .collect();
    Verdicts {
        allowed,
        conditional,
        inject,
    }
}

/// The kernel's destination entries: every (prefix, port, protocol) key of
/// every Service with its id and flags. Hostnames go through `resolve`
/// (DNS in the agent; one that fails adds nothing, and is retried later).
pub fn service_keys(
    reg: &Registry,
    names: &Names,
    resolve: &dyn Fn(&str) -> Vec<IpAddr>,
) -> HashMap<DstPrefix, (u32, ServiceFlags)> {
    let mut wanted = HashMap::new();
    for s in &reg.services {
        let Some(id) = names.services.get(&s.name).copied() else {
            continue;
        };
        let flags = service_flags(&s.spec);
        for p in prefixes(&s.spec, resolve) {
            wanted.insert(p, (id, flags));
        }
    }
    wanted
}

/// Ports of this host's Services: a Service naming a loopback, unspecified
/// or own address (or `local: true`) protects its ports at every local
/// destination, and a meshed one's are closed to other hosts on every
/// address. (protocol, port 0 = every port) -> (id, flags, Service name);
/// when two Services claim one port the first by name keeps it.
pub fn local_ports(
    reg: &Registry,
    names: &Names,
    host: &[IpAddr],
) -> HashMap<(Proto, u16), (u32, ServiceFlags, String)> {
    let mut ports: HashMap<(Proto, u16), (u32, ServiceFlags, String)> = HashMap::new();
    let mut by_name: Vec<&crate::state::registry::AgentService> = reg.services.iter().collect();
    by_name.sort_by(|a, b| a.name.cmp(&b.name));
    for s in by_name {
        let Some(id) = names.services.get(&s.name).copied() else {
            continue;
        };
        let flags = service_flags(&s.spec);
        for a in &s.spec.addresses {
            let local = a.local
                || a.network()
                    .is_some_and(|(ip, len)| covers_local(ip, len, host));
            if !local {
                continue;
            }
            let list: &[u16] = if a.ports.is_empty() { &[0] } else { &a.ports };
            for proto in protos(a.protocol) {
                for p in list {
                    match ports.get(&(*proto, *p)) {
                        Some((_, _, other)) if other != &s.name => tracing::warn!(
                            port = p, service = %s.name, kept = %other,
                            "two Services claim the same port of this host; keeping the first by name"
                        ),
                        Some(_) => {}
                        None => {
                            ports.insert((*proto, *p), (id, flags, s.name.clone()));
                        }
                    }
                }
            }
        }
    }
    ports
}

fn protos(p: Protocol) -> &'static [Proto] {
    match p {
        Protocol::Tcp => &[Proto::Tcp],
        Protocol::Udp => &[Proto::Udp],
        Protocol::Both => &[Proto::Tcp, Proto::Udp],
    }
}

/// The kernel flags of a Service: fronted by agents (mesh), and whether
/// plaintext from other hosts is still accepted (permissive).
pub fn service_flags(spec: &tether_manifest::ServiceSpec) -> ServiceFlags {
    ServiceFlags {
        mesh: spec.mesh.is_some(),
        permissive: spec
            .mesh
            .as_ref()
            .is_some_and(|m| m.mode == tether_manifest::TlsMode::Permissive),
    }
}

/// Every kernel key for a Service.
fn prefixes(
    spec: &tether_manifest::ServiceSpec,
    resolve: &dyn Fn(&str) -> Vec<IpAddr>,
) -> Vec<DstPrefix> {
    let mut out = Vec::new();
    let mut push = |net: IpAddr, prefix_len: u8, ports: &[u16], protocol: Protocol| {
        for proto in protos(protocol) {
            if ports.is_empty() {
                out.push(DstPrefix {
                    net,
                    prefix_len,
                    port: 0,
                    proto: *proto,
                });
            }
            for port in ports {
                out.push(DstPrefix {
                    net,
                    prefix_len,
                    port: *port,
                    proto: *proto,
                });
            }
        }
    };
    for a in &spec.addresses {
        if let Some((ip, len)) = a.network() {
            push(ip, len, &a.ports, a.protocol);
        }
    }
    for h in &spec.hostnames {
        for ip in resolve(h) {
            let len = if ip.is_ipv4() { 32 } else { 128 };
            push(ip, len, &spec.host_ports, Protocol::Both);
        }
    }
    out
}

/// A Service address block reaches this host: it covers a loopback or
/// unspecified address, or one the host has.
pub fn covers_local(ip: IpAddr, prefix_len: u8, host: &[IpAddr]) -> bool {
    let contains = |a: IpAddr| in_prefix(ip, prefix_len, a);
    let fixed: [IpAddr; 4] = [
        IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    ];
    fixed.into_iter().any(contains)
        || ip.to_canonical().is_loopback()
        || host.iter().any(|h| contains(*h))
}

/// Whether `dst` is inside one of the Service's `cidr` entries for TCP,
/// with its port listed (or every port): an address the operator named.
/// `local: true` entries and addresses resolved from hostnames do not
/// count (the injector sends credentials only to named addresses).
pub fn declared_tcp_address(
    spec: &tether_manifest::ServiceSpec,
    dst: std::net::SocketAddr,
) -> bool {
    spec.addresses.iter().any(|a| {
        matches!(a.protocol, Protocol::Tcp | Protocol::Both)
            && (a.ports.is_empty() || a.ports.contains(&dst.port()))
            && a.network()
                .is_some_and(|(net, len)| in_prefix(net, len, dst.ip()))
    })
}

/// `a` lies in `net/len` (IPv4-mapped compared as IPv4).
fn in_prefix(net: IpAddr, len: u8, a: IpAddr) -> bool {
    match (net.to_canonical(), a.to_canonical()) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(len.min(32)))
                .unwrap_or(0);
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(len.min(128)))
                .unwrap_or(0);
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// A model of the connect hook's Service lookup (`decide()` in
/// tether.bpf.c), step for step: the middle tier's oracle, checked in
/// every lookup case against the maps this module fills. Test-only: the
/// agent itself asks the kernel's maps (`Enforcer::service_for`).
#[cfg(test)]
pub mod hook_model {
    use std::collections::HashMap;
    use std::net::IpAddr;

    use tether_kernel::{DstPrefix, Proto, ServiceFlags};

    /// What the connect hook finds for a destination.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Found {
        pub service_id: u32,
        /// Cleared for a Service of this host reached locally: decided here,
        /// never tunnelled to ourselves.
        pub flags: ServiceFlags,
        /// Found through `local_ports` (a port of this host's Service at a
        /// destination that reaches this host).
        pub local: bool,
    }

    /// The kernel maps the connect hook reads, as [`service_keys`] and
    /// [`local_ports`] compute them, plus the host's addresses (`local_addrs`).
    pub struct ConnectMaps<'a> {
        pub services: &'a HashMap<DstPrefix, (u32, ServiceFlags)>,
        pub local_ports: &'a HashMap<(Proto, u16), (u32, ServiceFlags, String)>,
        pub host: &'a [IpAddr],
    }

    /// What the hook finds for `dst`. `socket_proto` is the socket's
    /// IPPROTO_* number;
    /// `listener_bound` says whether a socket in the caller's namespace is
    /// bound to exactly that address and port (the hook's bpf_sk_lookup; a
    /// wildcard listener does not count).
    pub fn connect_lookup(
        maps: &ConnectMaps,
        socket_proto: i32,
        dst: std::net::SocketAddr,
        listener_bound: &dyn Fn(std::net::SocketAddr, Proto) -> bool,
    ) -> Option<Found> {
        // MPTCP is TCP and UDP-Lite is UDP to the hook; nothing else can be a
        // protected destination.
        let proto = match socket_proto {
            libc::IPPROTO_TCP | libc::IPPROTO_MPTCP => Proto::Tcp,
            libc::IPPROTO_UDP | libc::IPPROTO_UDPLITE => Proto::Udp,
            _ => return None,
        };
        let addr = mapped_bits(dst.ip());
        let port = dst.port();
        // A port a Service of this host owns, at a destination that reaches
        // this host, is decided by that Service even if a broader one also
        // covers the address.
        let owned = maps
            .local_ports
            .get(&(proto, port))
            .or_else(|| maps.local_ports.get(&(proto, 0)));
        if let Some((id, _, _)) = owned {
            let here = std::net::SocketAddr::new(dst.ip().to_canonical(), port);
            if is_local_dst(dst.ip(), maps.host) || listener_bound(here, proto) {
                return Some(Found {
                    service_id: *id,
                    flags: ServiceFlags::default(),
                    local: true,
                });
            }
        }
        // The LPM trie: the exact port's longest prefix, then the any-port
        // entries' (the port is part of the key, so an exact-port /8 beats an
        // any-port /32).
        [port, 0].into_iter().find_map(|p| {
            maps.services
                .iter()
                .filter(|(k, _)| k.proto == proto && k.port == p)
                .filter_map(|(k, v)| {
                    let (net, bits) = prefix_bits(k);
                    let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                    (net & mask == addr & mask).then_some((bits, *v))
                })
                .max_by_key(|(bits, _)| *bits)
                .map(|(_, (id, flags))| Found {
                    service_id: id,
                    flags,
                    local: false,
                })
        })
    }

    /// An address as the kernel keys it: IPv4 as IPv4-mapped IPv6.
    fn mapped_bits(ip: IpAddr) -> u128 {
        match ip {
            IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
            IpAddr::V6(v6) => u128::from(v6),
        }
    }

    /// A prefix in the kernel's 128-bit address space.
    fn prefix_bits(k: &DstPrefix) -> (u128, u32) {
        let bits = match k.net {
            IpAddr::V4(_) => 96 + u32::from(k.prefix_len.min(32)),
            IpAddr::V6(_) => u32::from(k.prefix_len.min(128)),
        };
        (mapped_bits(k.net), bits)
    }

    /// The hook's `is_local_dst`: where the kernel would deliver to a
    /// listener on this host (the fixed set, and the host's own addresses).
    pub fn is_local_dst(ip: IpAddr, host: &[IpAddr]) -> bool {
        tether_kernel::always_local(ip)
            || host.iter().any(|h| h.to_canonical() == ip.to_canonical())
    }
}

/// A nonzero id from a name (FNV-1a), probing past ids already taken.
fn stable_id(name: &str, taken: &HashMap<u32, String>) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    loop {
        if h != 0 && !taken.contains_key(&h) {
            return h;
        }
        h = h.wrapping_add(1);
    }
}

/// The middle tier: in process, no root, no kernel.
#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use tether_attest::ProcessInfo;
    use tether_kernel::{DstPrefix, Proto};
    use tether_spiffe::{Bundle, SpiffeId, TrustDomain};

    use super::hook_model::{ConnectMaps, connect_lookup};
    use super::*;
    use crate::state::registry::{AgentIdentity, AgentPolicy, AgentService, Registry};

    const NODE: &str = "n1";
    /// 1970-01-01 10:00 and 13:00 UTC.
    const MORNING: i64 = 10 * 3600;
    const AFTERNOON: i64 = 13 * 3600;

    /// A registry from manifest YAML, with identities named `names`
    /// (`spiffe://example.org/<name>`), numbered.
    fn registry(identities: &[&str], yaml: &str) -> (Registry, Names) {
        let td = TrustDomain::new("example.org").expect("td");
        let mut reg = Registry::empty(Bundle::new(td));
        for n in identities {
            reg.identities.push(AgentIdentity {
                name: (*n).to_owned(),
                spiffe_id: SpiffeId::parse(&format!("spiffe://example.org/{n}")).expect("id"),
                sets: Vec::new(),
                raw_sets: Vec::new(),
                x509_ttl_secs: 3600,
                jwt_ttl_secs: 300,
                workload_api: true,
                allow_exec: Vec::new(),
            });
        }
        for r in tether_manifest::parse("test.yaml", yaml.as_bytes()).expect("manifest") {
            match r {
                tether_manifest::Resource::Service { name, spec } => {
                    reg.services.push(AgentService { name, spec })
                }
                tether_manifest::Resource::AccessPolicy { name, spec } => {
                    let condition = spec
                        .when
                        .as_ref()
                        .map(|w| tether_policy::Condition::parse(&name, w).expect("condition"));
                    reg.policies.push(AgentPolicy {
                        name,
                        spec,
                        condition,
                    })
                }
                other => panic!("unexpected {}", other.kind()),
            }
        }
        let mut names = Names::default();
        names.assign(&reg);
        (reg, names)
    }

    fn service(name: &str, addresses: &str) -> String {
        format!(
            "apiVersion: tether.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  addresses:\n{addresses}\n---\n"
        )
    }

    fn policy(name: &str, services: &str, identities: &str, when: Option<&str>) -> String {
        let when = when.map(|w| format!("  when: '{w}'\n")).unwrap_or_default();
        format!(
            "apiVersion: tether.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{name: {name}}}\nspec:\n  services: [{services}]\n  identities: [{identities}]\n{when}---\n"
        )
    }

    #[test]
    fn only_named_tcp_addresses_are_declared() {
        let (reg, _) = registry(
            &[],
            &service(
                "db",
                "    - {cidr: 127.0.0.1/32, ports: [5432]}\n    - {cidr: 10.1.0.0/16, protocol: udp}\n    - {local: true, ports: [6379]}",
            ),
        );
        let spec = &reg.services[0].spec;
        let yes = |a: &str| declared_tcp_address(spec, a.parse().expect("addr"));
        assert!(yes("127.0.0.1:5432"));
        assert!(yes("[::ffff:127.0.0.1]:5432"));
        for no in [
            "127.0.0.2:5432",
            "[::1]:5432",
            "127.0.0.1:5433",
            "10.1.2.3:53",
            "127.0.0.1:6379",
        ] {
            assert!(!yes(no), "{no}");
        }
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    fn verdicts(
        reg: &Registry,
        names: &Names,
        who: &[&str],
        info: Option<&ProcessInfo>,
        now: i64,
    ) -> Verdicts {
        let identities = ids(who);
        let spiffe: Vec<String> = who
            .iter()
            .map(|n| format!("spiffe://example.org/{n}"))
            .collect();
        evaluate(
            reg,
            names,
            NODE,
            now,
            &Subject {
                info,
                identities: &identities,
                spiffe_ids: &spiffe,
            },
        )
    }

    const DB: &str = "    - {cidr: 127.0.0.1/32, ports: [5432]}";

    #[test]
    fn numbers_are_nonzero_distinct_and_kept_across_changes() {
        let yaml = service("a", DB) + &service("b", DB) + &policy("p", "a", "x", None);
        let (reg, names) = registry(&["x"], &yaml);
        let (a, b) = (names.services["a"], names.services["b"]);
        assert!(a != 0 && b != 0 && a != b);
        // Another agent numbering the same names in another order agrees.
        let mut reversed = reg.clone();
        reversed.services.reverse();
        let mut again = Names::default();
        again.assign(&reversed);
        assert_eq!((again.services["a"], again.services["b"]), (a, b));
        // A Service that goes and comes back keeps its number.
        let mut fewer = reg.clone();
        fewer.services.retain(|s| s.name != "a");
        let mut kept = names.clone();
        kept.assign(&fewer);
        kept.assign(&reg);
        assert_eq!(kept.services["a"], a);
        assert_eq!(names.rule_name(names.rules["p"]), "p");
        assert_eq!(names.rule_name(12345), "", "an unknown rule has no name");
    }

    #[test]
    fn a_policy_allows_the_identities_it_names_and_no_one_else() {
        let yaml = service("db", DB) + &policy("db-clients", "db", "client", None);
        let (reg, names) = registry(&["client", "other"], &yaml);
        let v = verdicts(&reg, &names, &["client"], None, MORNING);
        assert_eq!(
            v.allowed.get(&names.services["db"]),
            Some(&names.rules["db-clients"])
        );
        assert!(v.conditional.is_empty(), "no condition: never expires");
        assert!(
            verdicts(&reg, &names, &["other"], None, MORNING)
                .allowed
                .is_empty()
        );
        assert!(
            verdicts(&reg, &names, &[], None, MORNING)
                .allowed
                .is_empty()
        );
    }

    #[test]
    fn a_time_window_allows_inside_it_only_and_its_verdict_expires() {
        let yaml =
            service("db", DB) + &policy("mornings", "db", "client", Some("context.time.hour < 12"));
        let (reg, names) = registry(&["client"], &yaml);
        let db = names.services["db"];
        let v = verdicts(&reg, &names, &["client"], None, MORNING);
        assert!(v.allowed.contains_key(&db));
        assert!(v.conditional.contains(&db), "rests on a condition");
        assert!(
            !verdicts(&reg, &names, &["client"], None, AFTERNOON)
                .allowed
                .contains_key(&db)
        );
        // An unconditional policy for the same Service makes it permanent.
        let yaml2 = yaml + &policy("always", "db", "client", None);
        let (reg, names) = registry(&["client"], &yaml2);
        let v = verdicts(&reg, &names, &["client"], None, AFTERNOON);
        assert_eq!(v.allowed.get(&db), Some(&names.rules["always"]));
        assert!(v.conditional.is_empty());
    }

    #[test]
    fn a_condition_that_cannot_be_evaluated_does_not_allow() {
        let yaml = service("db", DB)
            + &policy(
                "alice",
                "db",
                "client",
                Some("context.process.user == \"alice\""),
            );
        let (reg, names) = registry(&["client"], &yaml);
        let db = names.services["db"];
        let alice = ProcessInfo {
            pid: 42,
            uid: 1000,
            user: Some("alice".into()),
            ..ProcessInfo::default()
        };
        let bob = ProcessInfo {
            user: Some("bob".into()),
            ..alice.clone()
        };
        assert!(
            verdicts(&reg, &names, &["client"], Some(&alice), MORNING)
                .allowed
                .contains_key(&db)
        );
        assert!(
            !verdicts(&reg, &names, &["client"], Some(&bob), MORNING)
                .allowed
                .contains_key(&db)
        );
        // `policy check --identity`: no process, so context.process.user is
        // missing and the condition errors: deny, not allow.
        assert!(
            !verdicts(&reg, &names, &["client"], None, MORNING)
                .allowed
                .contains_key(&db)
        );
    }

    #[test]
    fn ingress_knows_the_peer_by_its_spiffe_id_and_judges_with_local_context() {
        let yaml = service("db", DB)
            + &policy("db-clients", "db", "client", None)
            + &service("cache", DB)
            + &policy("on-n1", "cache", "client", Some("context.node == \"n1\""));
        let (reg, names) = registry(&["client"], &yaml);
        assert_eq!(
            ingress(&reg, &names, MORNING, "db", "spiffe://example.org/client"),
            Ok("db-clients".into())
        );
        assert_eq!(
            ingress(&reg, &names, MORNING, "db", "spiffe://example.org/stranger"),
            Err(IngressRefusal::UnknownPeer {
                peer: "spiffe://example.org/stranger".into()
            })
        );
        // The client's node is not known here: a condition on it denies.
        assert_eq!(
            ingress(
                &reg,
                &names,
                MORNING,
                "cache",
                "spiffe://example.org/client"
            ),
            Err(IngressRefusal::NotAllowed {
                identities: ids(&["client"]),
                service: "cache".into()
            })
        );
        assert!(matches!(
            ingress(
                &reg,
                &names,
                MORNING,
                "no-such-service",
                "spiffe://example.org/client"
            ),
            Err(IngressRefusal::NotAllowed { .. })
        ));
    }

    #[test]
    fn explanations_name_the_rule_or_every_policy_that_did_not_allow() {
        let yaml = service("db", DB)
            + &policy("admins", "db", "admin", None)
            + &policy("mornings", "db", "client", Some("context.time.hour < 12"));
        let (reg, names) = registry(&["client", "admin"], &yaml);
        let client = ids(&["client"]);
        let who = Subject {
            info: None,
            identities: &client,
            spiffe_ids: &[],
        };
        assert_eq!(
            explain(&reg, &names, NODE, MORNING, &who, None)["verdict"],
            "untouched"
        );
        let allow = explain(&reg, &names, NODE, MORNING, &who, Some("db"));
        assert_eq!(
            (allow["verdict"].as_str(), allow["rule"].as_str()),
            (Some("allow"), Some("mornings"))
        );
        let deny = explain(&reg, &names, NODE, AFTERNOON, &who, Some("db"));
        assert_eq!(
            (deny["verdict"].as_str(), deny["rule"].as_str()),
            (Some("deny"), Some(DEFAULT_DENY))
        );
        let why: Vec<(String, String)> = deny["policies"]
            .as_array()
            .expect("policies")
            .iter()
            .map(|p| {
                (
                    p["policy"].as_str().unwrap_or_default().into(),
                    p["why"].as_str().unwrap_or_default().into(),
                )
            })
            .collect();
        assert_eq!(why.len(), 2, "{why:?}");
        assert!(
            why.iter()
                .any(|(p, w)| p == "admins" && w.contains("allows identities [\"admin\"]")),
            "{why:?}"
        );
        assert!(
            why.iter()
                .any(|(p, w)| p == "mornings" && w.contains("does not hold now")),
            "{why:?}"
        );
    }

    #[test]
    fn service_keys_cover_every_port_protocol_and_resolved_name() {
        let yaml = service(
            "db",
            "    - {cidr: 10.1.0.0/16, ports: [5432, 5433], protocol: both}\n    - {cidr: \"fd00::/8\"}",
        ) + "apiVersion: tether.dev/v1alpha1\nkind: Service\nmetadata: {name: api}\nspec:\n  addresses: []\n  hostnames: [api.internal]\n  hostPorts: [443]\n---\n"
            + "apiVersion: tether.dev/v1alpha1\nkind: Service\nmetadata: {name: fronted}\nspec:\n  addresses: [{cidr: 10.2.0.1/32, ports: [6379]}]\n  mesh: {mode: permissive}\n---\n";
        let (reg, names) = registry(&[], &yaml);
        let resolve = |h: &str| -> Vec<IpAddr> {
            assert_eq!(h, "api.internal");
            vec!["10.9.9.9".parse().expect("ip")]
        };
        let keys = service_keys(&reg, &names, &resolve);
        let db = names.services["db"];
        let key = |net: &str, len: u8, port: u16, proto: Proto| DstPrefix {
            net: net.parse().expect("ip"),
            prefix_len: len,
            port,
            proto,
        };
        for port in [5432, 5433] {
            for proto in [Proto::Tcp, Proto::Udp] {
                assert_eq!(
                    keys.get(&key("10.1.0.0", 16, port, proto)).map(|v| v.0),
                    Some(db)
                );
            }
        }
        // No ports: every port (0), TCP only by default.
        assert!(keys.contains_key(&key("fd00::", 8, 0, Proto::Tcp)));
        assert!(!keys.contains_key(&key("fd00::", 8, 0, Proto::Udp)));
        let api = keys
            .get(&key("10.9.9.9", 32, 443, Proto::Tcp))
            .expect("resolved hostname");
        assert_eq!(api.0, names.services["api"]);
        assert!(!api.1.mesh);
        let fronted = keys
            .get(&key("10.2.0.1", 32, 6379, Proto::Tcp))
            .expect("fronted");
        assert!(fronted.1.mesh && fronted.1.permissive);
        // db: 2 ports x 2 protocols + fd00::/8; api: 443 over TCP and UDP
        // (hostnames take both); fronted: one.
        assert_eq!(keys.len(), 4 + 1 + 2 + 1, "{keys:?}");
    }

    #[test]
    fn a_service_of_this_host_protects_its_ports_at_every_local_address() {
        let yaml = service("loop", "    - {cidr: 127.0.0.1/32, ports: [6379]}")
            + &service("own", "    - {cidr: 192.0.2.7/32, ports: [5432]}")
            + &service("remote", "    - {cidr: 198.51.100.0/24, ports: [80]}")
            + &service(
                "flagged",
                "    - {local: true, ports: [9000], protocol: udp}",
            )
            + &service("everywhere", "    - {cidr: 0.0.0.0/0, ports: [22]}")
            + &service("aaa-same-port", "    - {cidr: \"::1/128\", ports: [6379]}");
        let (reg, names) = registry(&[], &yaml);
        let host: Vec<IpAddr> = vec!["192.0.2.7".parse().expect("ip")];
        let ports = local_ports(&reg, &names, &host);
        let owner = |proto: Proto, port: u16| ports.get(&(proto, port)).map(|v| v.2.as_str());
        // Two Services claim 6379: the first by name keeps it.
        assert_eq!(owner(Proto::Tcp, 6379), Some("aaa-same-port"));
        assert_eq!(
            owner(Proto::Tcp, 5432),
            Some("own"),
            "one of the host's addresses"
        );
        assert_eq!(owner(Proto::Tcp, 80), None, "another host's address");
        assert_eq!(owner(Proto::Udp, 9000), Some("flagged"));
        assert_eq!(owner(Proto::Tcp, 9000), None);
        assert_eq!(
            owner(Proto::Tcp, 22),
            Some("everywhere"),
            "0.0.0.0/0 covers loopback"
        );
        // Without the host address, 192.0.2.7 is someone else's.
        assert_eq!(
            local_ports(&reg, &names, &[]).get(&(Proto::Tcp, 5432)),
            None
        );
    }

    #[test]
    fn local_coverage_compares_mapped_addresses_as_ipv4() {
        let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
        assert!(covers_local(ip("127.0.0.0"), 8, &[]));
        assert!(covers_local(ip("::ffff:127.0.0.1"), 128, &[]));
        assert!(covers_local(ip("::"), 128, &[]));
        assert!(!covers_local(ip("10.0.0.1"), 32, &[]));
        assert!(covers_local(ip("10.0.0.0"), 24, &[ip("::ffff:10.0.0.5")]));
        assert!(!covers_local(ip("10.0.0.0"), 24, &[ip("10.0.1.5")]));
    }

    /// The connect hook's view of a registry on a host with `host`
    /// addresses: (Service name, local) per destination, or None.
    struct Hook {
        services: HashMap<DstPrefix, (u32, ServiceFlags)>,
        ports: HashMap<(Proto, u16), (u32, ServiceFlags, String)>,
        host: Vec<IpAddr>,
        names: Names,
    }

    impl Hook {
        fn new(yaml: &str, host: &[&str]) -> Self {
            let (reg, names) = registry(&[], yaml);
            let host: Vec<IpAddr> = host.iter().map(|h| h.parse().expect("ip")).collect();
            let resolve = |h: &str| -> Vec<IpAddr> {
                match h {
                    "db.example" => vec!["203.0.113.9".parse().expect("ip")],
                    _ => Vec::new(),
                }
            };
            Hook {
                services: service_keys(&reg, &names, &resolve),
                ports: local_ports(&reg, &names, &host),
                host,
                names,
            }
        }

        fn find_with(
            &self,
            proto: i32,
            dst: &str,
            listener: &dyn Fn(std::net::SocketAddr, Proto) -> bool,
        ) -> Option<(String, bool, ServiceFlags)> {
            let maps = ConnectMaps {
                services: &self.services,
                local_ports: &self.ports,
                host: &self.host,
            };
            connect_lookup(&maps, proto, dst.parse().expect("dst"), listener).map(|f| {
                (
                    self.names.service_names[&f.service_id].clone(),
                    f.local,
                    f.flags,
                )
            })
        }

        /// TCP, no listener bound to exactly the destination.
        fn find(&self, dst: &str) -> Option<(String, bool)> {
            self.find_with(libc::IPPROTO_TCP, dst, &|_, _| false)
                .map(|(n, l, _)| (n, l))
        }
    }

    fn hit(name: &str, local: bool) -> Option<(String, bool)> {
        Some((name.to_owned(), local))
    }

    #[test]
    fn connect_lookup_prefers_the_exact_port_then_the_longest_prefix() {
        let yaml = service("wide-port", "    - {cidr: 10.0.0.0/8, ports: [443]}")
            + &service("narrow-any", "    - {cidr: 10.1.2.3/32}")
            + &service("mid-port", "    - {cidr: 10.1.0.0/16, ports: [443]}")
            + &service("v6", "    - {cidr: \"2001:db8::/32\", ports: [443]}");
        let hook = Hook::new(&yaml, &[]);
        // The port is part of the key: an exact-port /8 beats an any-port
        // /32, and among exact-port entries the longest prefix wins.
        assert_eq!(hook.find("10.1.2.3:443"), hit("mid-port", false));
        assert_eq!(hook.find("10.9.9.9:443"), hit("wide-port", false));
        assert_eq!(hook.find("10.1.2.3:80"), hit("narrow-any", false));
        assert_eq!(hook.find("10.1.2.4:80"), None, "unprotected");
        assert_eq!(hook.find("11.0.0.1:443"), None);
        assert_eq!(hook.find("[2001:db8::1]:443"), hit("v6", false));
        assert_eq!(hook.find("[2001:db9::1]:443"), None);
    }

    #[test]
    fn connect_lookup_sees_ipv4_through_mapped_ipv6_and_protocol_aliases() {
        let yaml = service("tcp", "    - {cidr: 192.0.2.0/24, ports: [5432]}")
            + &service(
                "udp",
                "    - {cidr: 192.0.2.0/24, ports: [53], protocol: udp}",
            )
            + &service("all-v6", "    - {cidr: \"::/0\", ports: [7000]}");
        let hook = Hook::new(&yaml, &[]);
        // connect6 on a dual-stack socket reaches the IPv4 entry.
        assert_eq!(hook.find("[::ffff:192.0.2.5]:5432"), hit("tcp", false));
        // MPTCP is TCP and UDP-Lite is UDP; other protocols are never
        // protected destinations.
        let none = |_: std::net::SocketAddr, _: Proto| false;
        let find = |proto, dst| hook.find_with(proto, dst, &none).map(|(n, _, _)| n);
        assert_eq!(
            find(libc::IPPROTO_MPTCP, "192.0.2.5:5432"),
            Some("tcp".into())
        );
        assert_eq!(find(libc::IPPROTO_UDP, "192.0.2.5:5432"), None);
        assert_eq!(
            find(libc::IPPROTO_UDPLITE, "192.0.2.5:53"),
            Some("udp".into())
        );
        assert_eq!(find(libc::IPPROTO_TCP, "192.0.2.5:53"), None);
        assert_eq!(find(libc::IPPROTO_SCTP, "192.0.2.5:5432"), None);
        // An IPv6 ::/0 block is a zero-bit prefix of the whole key space,
        // IPv4-mapped addresses included.
        assert_eq!(hook.find("192.0.2.5:7000"), hit("all-v6", false));
    }

    #[test]
    fn connect_lookup_resolves_hostnames_on_their_ports() {
        let yaml = "apiVersion: tether.dev/v1alpha1\nkind: Service\nmetadata: {name: db}\nspec:\n  hostnames: [db.example, unknown.example]\n  hostPorts: [5432]\n";
        let hook = Hook::new(yaml, &[]);
        assert_eq!(hook.find("203.0.113.9:5432"), hit("db", false));
        assert_eq!(hook.find("203.0.113.9:5433"), None);
        let udp = hook
            .find_with(libc::IPPROTO_UDP, "203.0.113.9:5432", &|_, _| false)
            .map(|(n, _, _)| n);
        assert_eq!(udp, Some("db".into()), "hostnames cover both protocols");
    }

    #[test]
    fn connect_lookup_lets_this_hosts_service_decide_at_every_local_destination() {
        let yaml = service("cache", "    - {cidr: 127.0.0.1/32, ports: [6379]}")
            + &service("net", "    - {cidr: 0.0.0.0/0, ports: [6379]}")
            + &service(
                "meshed",
                "    - {cidr: 192.0.2.7/32, ports: [8443]}\n  mesh: {}",
            );
        let hook = Hook::new(&yaml, &["192.0.2.7"]);
        // "net" also covers 127.0.0.1 (and "cache" owns 6379 on this host
        // since 0.0.0.0/0 covers loopback, first by name): a local
        // destination is decided by the port's owner, locally.
        let owner = hook.ports[&(Proto::Tcp, 6379)].2.clone();
        for dst in [
            "127.0.0.1:6379",
            "127.9.9.9:6379",
            "0.0.0.0:6379",
            "[::1]:6379",
            "[::]:6379",
            "[::ffff:127.0.0.1]:6379",
            "192.0.2.7:6379",
            "224.0.0.1:6379",
            "255.255.255.255:6379",
        ] {
            assert_eq!(hook.find(dst), hit(&owner, true), "{dst}");
        }
        // Another host's address: the network-wide Service.
        assert_eq!(hook.find("198.51.100.1:6379"), hit("net", false));
        // ... unless a socket here is bound to exactly that address (an
        // address of another namespace's the agent does not follow).
        let bound = |a: std::net::SocketAddr, p: Proto| {
            p == Proto::Tcp && a == "198.51.100.1:6379".parse().expect("addr")
        };
        let found = hook.find_with(libc::IPPROTO_TCP, "198.51.100.1:6379", &bound);
        assert_eq!(found.map(|(n, l, _)| (n, l)), hit(&owner, true));
        // A meshed Service reached on this host is decided here, without
        // the mesh flag (no tunnel to ourselves); from elsewhere it is
        // meshed.
        let (name, local, flags) = hook
            .find_with(libc::IPPROTO_TCP, "192.0.2.7:8443", &|_, _| false)
            .expect("meshed, locally");
        assert_eq!((name.as_str(), local, flags.mesh), ("meshed", true, false));
        let remote = Hook::new(&yaml, &[]);
        let (_, local, flags) = remote
            .find_with(libc::IPPROTO_TCP, "192.0.2.7:8443", &|_, _| false)
            .expect("meshed, remotely");
        assert!(!local && flags.mesh);
    }
}
