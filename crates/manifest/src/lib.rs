//! Tether's resource manifests: Kubernetes-style YAML documents
//! (apiVersion, kind, metadata, spec).
//!
//! Parsing is two-stage on purpose: documents are first read into plain
//! serde structs, then validated field by field so every error names the
//! file, the document, the resource and the field path, and says what is
//! wrong. Nothing is applied unless every document in the file is valid.

mod credentials;

use std::collections::BTreeSet;
use std::fmt;

pub use credentials::{
    CredentialBindingSpec, CredentialFile, CredentialSourceSpec, FileFormat, HttpScheme,
    InjectProtocol, Injection, MAX_STATIC_BYTES, OAuthGrant, REDACTED, UpstreamTls,
    client_id_allowed,
};

use serde::{Deserialize, Serialize};
use tether_attest::Selector;
use tether_spiffe::SpiffeId;

pub const API_VERSION: &str = "tether.dev/v1alpha1";

/// Kinds the registry stores.
pub const KINDS: &[&str] = &[
    "WorkloadIdentity",
    "Service",
    "AccessPolicy",
    "CredentialSource",
    "CredentialBinding",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub source: String,
    /// 1-based document index within the file.
    pub document: usize,
    pub resource: Option<String>,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.source, self.document)?;
        if let Some(r) = &self.resource {
            write!(f, " ({r})")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ManifestError {}

/// A validated WorkloadIdentity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadIdentitySpec {
    pub spiffe_id: String,
    /// Selector sets: selectors within a set are ANDed, sets are ORed.
    pub selectors: Vec<Vec<String>>,
    pub x509_ttl_secs: i64,
    pub jwt_ttl_secs: i64,
    #[serde(default)]
    pub dns_names: Vec<String>,
    /// Node names this identity applies to; empty means every node.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Whether the key may be handed to the process via the Workload API.
    pub workload_api: bool,
    /// Exec checks this identity accepts by name (see
    /// `tether_attest::EXEC_CHECKS`); empty: every check must pass.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_exec: Vec<String>,
}

impl WorkloadIdentitySpec {
    pub fn spiffe_id(&self) -> Result<SpiffeId, tether_spiffe::IdError> {
        SpiffeId::parse(&self.spiffe_id)
    }

    /// Parsed selector sets. Specs in the store were validated on apply, so
    /// an unparsable selector there means corruption: such a set is dropped
    /// (it can then match nothing) rather than widening access.
    pub fn selector_sets(&self) -> Vec<Vec<Selector>> {
        self.selectors
            .iter()
            .filter_map(|set| {
                set.iter()
                    .map(|s| Selector::parse(s).ok())
                    .collect::<Option<Vec<_>>>()
            })
            .filter(|set| !set.is_empty())
            .collect()
    }

    pub fn applies_to_node(&self, node: &str) -> bool {
        self.nodes.is_empty() || self.nodes.iter().any(|n| n == "*" || n == node)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Both,
}

/// One address block of a Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAddress {
    /// Canonical "ip/prefix"; empty for a `local` entry.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cidr: String,
    /// This host, at every address that reaches its listeners: loopback,
    /// unspecified, multicast and broadcast, and every address it has
    /// (followed as they change). A Service that names a loopback address
    /// or one of the host's gets the same protection for those ports.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
    /// Empty means every port.
    #[serde(default)]
    pub ports: Vec<u16>,
    pub protocol: Protocol,
}

impl ServiceAddress {
    pub fn network(&self) -> Option<(std::net::IpAddr, u8)> {
        parse_cidr(&self.cidr).ok()
    }
}

/// A protected destination: connections to it are denied unless an
/// AccessPolicy allows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    pub addresses: Vec<ServiceAddress>,
    /// Resolved by the agent (and refreshed) into more addresses, using the
    /// ports and protocol given here.
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub host_ports: Vec<u16>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Present when agents front this Service: clients reach it only
    /// through a mutual-TLS tunnel to the agent on its host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<MeshSpec>,
}

/// How agents carry connections to a Service they front.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshSpec {
    pub mode: TlsMode,
    /// Prefix each connection to the service with a PROXY protocol v2
    /// header naming the client's SPIFFE ID.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Node names whose agents front it. Clients then accept only those
    /// agents' node SVIDs at the far end of a tunnel; empty: any node of
    /// the trust domain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
}

/// What crosses the network to a fronted Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// The agents' mutual TLS carries the connection; the service speaks
    /// plaintext to its own agent only.
    Mutual,
    /// As mutual, and the application runs its own TLS end to end inside
    /// the tunnel; the agents neither terminate nor inspect it.
    Passthrough,
    /// Migration: tunnelled connections as mutual, and plaintext from
    /// hosts without an agent still accepted, each one audited.
    Permissive,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Mutual => "mutual",
            TlsMode::Passthrough => "passthrough",
            TlsMode::Permissive => "permissive",
        }
    }
}

/// Who may reach which Services, optionally under a Cedar condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessPolicySpec {
    pub services: Vec<String>,
    /// WorkloadIdentity names.
    pub identities: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
}

/// A validated resource, ready for the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    WorkloadIdentity {
        name: String,
        spec: WorkloadIdentitySpec,
    },
    Service {
        name: String,
        spec: ServiceSpec,
    },
    AccessPolicy {
        name: String,
        spec: AccessPolicySpec,
    },
    CredentialSource {
        name: String,
        spec: CredentialSourceSpec,
    },
    CredentialBinding {
        name: String,
        spec: CredentialBindingSpec,
    },
}

impl Resource {
    pub fn kind(&self) -> &'static str {
        match self {
            Resource::WorkloadIdentity { .. } => "WorkloadIdentity",
            Resource::Service { .. } => "Service",
            Resource::AccessPolicy { .. } => "AccessPolicy",
            Resource::CredentialSource { .. } => "CredentialSource",
            Resource::CredentialBinding { .. } => "CredentialBinding",
        }
    }
    pub fn name(&self) -> &str {
        match self {
            Resource::WorkloadIdentity { name, .. }
            | Resource::Service { name, .. }
            | Resource::AccessPolicy { name, .. }
            | Resource::CredentialSource { name, .. }
            | Resource::CredentialBinding { name, .. } => name,
        }
    }
    /// Canonical JSON of the spec: equal specs give equal strings, which is
    /// what makes apply idempotent.
    pub fn spec_json(&self) -> String {
        match self {
            Resource::WorkloadIdentity { spec, .. } => {
                serde_json::to_string(spec).unwrap_or_default()
            }
            Resource::Service { spec, .. } => serde_json::to_string(spec).unwrap_or_default(),
            Resource::AccessPolicy { spec, .. } => serde_json::to_string(spec).unwrap_or_default(),
            Resource::CredentialSource { spec, .. } => {
                serde_json::to_string(spec).unwrap_or_default()
            }
            Resource::CredentialBinding { spec, .. } => {
                serde_json::to_string(spec).unwrap_or_default()
            }
        }
    }
    /// The resource as a YAML manifest again (for `tether get`).
    pub fn to_yaml(&self) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct OutSpec<'a> {
            spiffe_id: &'a str,
            selectors: &'a Vec<Vec<String>>,
            x509_ttl: String,
            jwt_ttl: String,
            #[serde(skip_serializing_if = "Vec::is_empty")]
            dns_names: &'a Vec<String>,
            #[serde(skip_serializing_if = "Vec::is_empty")]
            nodes: &'a Vec<String>,
            workload_api: bool,
            #[serde(skip_serializing_if = "Vec::is_empty")]
            allow_exec: &'a Vec<String>,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Out<'a> {
            api_version: &'a str,
            kind: &'a str,
            metadata: Meta<'a>,
            spec: OutSpec<'a>,
        }
        #[derive(Serialize)]
        struct Meta<'a> {
            name: &'a str,
        }
        match self {
            Resource::WorkloadIdentity { name, spec } => serde_norway::to_string(&Out {
                api_version: API_VERSION,
                kind: "WorkloadIdentity",
                metadata: Meta { name },
                spec: OutSpec {
                    spiffe_id: &spec.spiffe_id,
                    selectors: &spec.selectors,
                    x509_ttl: format_duration(spec.x509_ttl_secs),
                    jwt_ttl: format_duration(spec.jwt_ttl_secs),
                    dns_names: &spec.dns_names,
                    nodes: &spec.nodes,
                    workload_api: spec.workload_api,
                    allow_exec: &spec.allow_exec,
                },
            })
            .unwrap_or_default(),
            Resource::Service { name, spec } => generic_yaml("Service", name, spec),
            Resource::AccessPolicy { name, spec } => generic_yaml("AccessPolicy", name, spec),
            Resource::CredentialSource { name, spec } => {
                generic_yaml("CredentialSource", name, &spec.manifest_value())
            }
            Resource::CredentialBinding { name, spec } => {
                generic_yaml("CredentialBinding", name, &spec.manifest_value())
            }
        }
    }

    pub fn from_stored(kind: &str, name: &str, spec_json: &str) -> Option<Resource> {
        match kind {
            "WorkloadIdentity" => {
                serde_json::from_str(spec_json)
                    .ok()
                    .map(|spec| Resource::WorkloadIdentity {
                        name: name.to_string(),
                        spec,
                    })
            }
            "Service" => serde_json::from_str(spec_json)
                .ok()
                .map(|spec| Resource::Service {
                    name: name.to_string(),
                    spec,
                }),
            "AccessPolicy" => {
                serde_json::from_str(spec_json)
                    .ok()
                    .map(|spec| Resource::AccessPolicy {
                        name: name.to_string(),
                        spec,
                    })
            }
            "CredentialSource" => {
                serde_json::from_str(spec_json)
                    .ok()
                    .map(|spec| Resource::CredentialSource {
                        name: name.to_string(),
                        spec,
                    })
            }
            "CredentialBinding" => {
                serde_json::from_str(spec_json)
                    .ok()
                    .map(|spec| Resource::CredentialBinding {
                        name: name.to_string(),
                        spec,
                    })
            }
            _ => None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawDoc {
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<RawMeta>,
    spec: Option<serde_norway::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMeta {
    name: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    labels: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawIdentity {
    spiffe_id: Option<String>,
    selectors: Option<Vec<Vec<String>>>,
    x509_ttl: Option<serde_norway::Value>,
    jwt_ttl: Option<serde_norway::Value>,
    #[serde(default)]
    dns_names: Vec<String>,
    #[serde(default)]
    nodes: Vec<String>,
    workload_api: Option<bool>,
    #[serde(default)]
    allow_exec: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawAddress {
    cidr: Option<String>,
    local: Option<bool>,
    #[serde(default)]
    ports: Vec<i64>,
    protocol: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawService {
    #[serde(default)]
    addresses: Vec<RawAddress>,
    #[serde(default)]
    hostnames: Vec<String>,
    #[serde(default)]
    host_ports: Vec<i64>,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    mesh: Option<RawMesh>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawMesh {
    mode: Option<String>,
    #[serde(default)]
    proxy_protocol: bool,
    #[serde(default)]
    nodes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPolicy {
    #[serde(default)]
    services: Vec<String>,
    #[serde(default)]
    identities: Vec<String>,
    when: Option<String>,
}

pub const DEFAULT_X509_TTL_SECS: i64 = 3600;
pub const DEFAULT_JWT_TTL_SECS: i64 = 300;
const MIN_TTL_SECS: i64 = 10;
const MAX_X509_TTL_SECS: i64 = 30 * 86400;
/// The longest JWT-SVID lifetime an identity may ask for; the server relies
/// on it to bound how long a retired JWT key's tokens can live.
pub const MAX_JWT_TTL_SECS: i64 = 86400;

/// Manifests larger than this are refused outright.
pub const MAX_MANIFEST_LEN: usize = 4 * 1024 * 1024;

/// Parses and validates every document in `text`. `source` names the file
/// in errors.
pub fn parse(source: &str, text: &[u8]) -> Result<Vec<Resource>, ManifestError> {
    let err = |doc: usize, resource: Option<String>, field: &str, message: String| ManifestError {
        source: source.to_string(),
        document: doc,
        resource,
        field: field.to_string(),
        message,
    };
    if text.len() > MAX_MANIFEST_LEN {
        return Err(err(
            0,
            None,
            "",
            format!("file is {} bytes, limit {MAX_MANIFEST_LEN}", text.len()),
        ));
    }
    let text =
        std::str::from_utf8(text).map_err(|e| err(0, None, "", format!("not UTF-8: {e}")))?;
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let doc = i + 1;
        let value = serde_norway::Value::deserialize(de)
            .map_err(|e| err(doc, None, "", format!("invalid YAML: {e}")))?;
        if value.is_null() {
            continue; // empty document, e.g. a trailing `---`
        }
        let raw: RawDoc =
            serde_norway::from_value(value).map_err(|e| err(doc, None, "", e.to_string()))?;
        match raw.api_version.as_deref() {
            Some(API_VERSION) => {}
            Some(other) => {
                return Err(err(
                    doc,
                    None,
                    "apiVersion",
                    format!("{other:?} is not supported; use {API_VERSION:?}"),
                ));
            }
            None => {
                return Err(err(
                    doc,
                    None,
                    "apiVersion",
                    format!("missing; use {API_VERSION:?}"),
                ));
            }
        }
        let kind = raw
            .kind
            .ok_or_else(|| err(doc, None, "kind", format!("missing; one of {KINDS:?}")))?;
        let name = raw
            .metadata
            .and_then(|m| m.name)
            .ok_or_else(|| err(doc, None, "metadata.name", "missing".into()))?;
        validate_name(&name).map_err(|m| err(doc, None, "metadata.name", m))?;
        let label = Some(format!("{kind} {name:?}"));
        if !seen.insert((kind.clone(), name.clone())) {
            return Err(err(
                doc,
                label,
                "metadata.name",
                "defined twice in this file".into(),
            ));
        }
        let spec = raw
            .spec
            .ok_or_else(|| err(doc, label.clone(), "spec", "missing".into()))?;
        let res = match kind.as_str() {
            "WorkloadIdentity" => {
                let raw: RawIdentity = serde_norway::from_value(spec)
                    .map_err(|e| err(doc, label.clone(), "spec", e.to_string()))?;
                let spec =
                    validate_identity(raw).map_err(|(f, m)| err(doc, label.clone(), &f, m))?;
                Resource::WorkloadIdentity { name, spec }
            }
            "Service" => {
                let raw: RawService = serde_norway::from_value(spec)
                    .map_err(|e| err(doc, label.clone(), "spec", e.to_string()))?;
                let spec =
                    validate_service(raw).map_err(|(f, m)| err(doc, label.clone(), &f, m))?;
                Resource::Service { name, spec }
            }
            "AccessPolicy" => {
                let raw: RawPolicy = serde_norway::from_value(spec)
                    .map_err(|e| err(doc, label.clone(), "spec", e.to_string()))?;
                let spec =
                    validate_policy(&name, raw).map_err(|(f, m)| err(doc, label.clone(), &f, m))?;
                Resource::AccessPolicy { name, spec }
            }
            "CredentialSource" => {
                let raw: credentials::RawSource = serde_norway::from_value(spec)
                    .map_err(|e| err(doc, label.clone(), "spec", e.to_string()))?;
                let spec = credentials::validate_source(raw)
                    .map_err(|(f, m)| err(doc, label.clone(), &f, m))?;
                Resource::CredentialSource { name, spec }
            }
            "CredentialBinding" => {
                let raw: credentials::RawBinding = serde_norway::from_value(spec)
                    .map_err(|e| err(doc, label.clone(), "spec", e.to_string()))?;
                let spec = credentials::validate_binding(raw)
                    .map_err(|(f, m)| err(doc, label.clone(), &f, m))?;
                Resource::CredentialBinding { name, spec }
            }
            other => {
                return Err(err(
                    doc,
                    None,
                    "kind",
                    format!("unknown kind {other:?}; one of {KINDS:?}"),
                ));
            }
        };
        out.push(res);
    }
    if out.is_empty() {
        return Err(err(0, None, "", "no resources in file".into()));
    }
    Ok(out)
}

/// Resource and node names: DNS-label-like, so they are safe in URLs,
/// SPIFFE ID paths and logs.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err(format!("{name:?} must be 1 to 253 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    {
        return Err(format!("{name:?} may contain only a-z, 0-9, '-' and '.'"));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !name.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Err(format!(
            "{name:?} must start and end with a letter or digit"
        ));
    }
    Ok(())
}

fn validate_identity(raw: RawIdentity) -> Result<WorkloadIdentitySpec, (String, String)> {
    let id = raw
        .spiffe_id
        .ok_or_else(|| ("spec.spiffeId".to_string(), "missing".to_string()))?;
    let id = SpiffeId::parse(&id).map_err(|e| ("spec.spiffeId".to_string(), e.to_string()))?;
    // Tether's own identities (node and server SVIDs) live under /tether:
    // a workload identity there could stand in for an agent or the server.
    if id.path() == "/tether" || id.path().starts_with("/tether/") {
        return Err((
            "spec.spiffeId".to_string(),
            format!("{id}: paths under /tether are reserved for Tether's own nodes and servers"),
        ));
    }
    let sets = raw.selectors.ok_or_else(|| {
        (
            "spec.selectors".to_string(),
            "missing; give at least one set, e.g. [[\"unix:uid:1000\"]]".to_string(),
        )
    })?;
    if sets.is_empty() {
        return Err((
            "spec.selectors".into(),
            "empty: an identity with no selector sets would match nothing".into(),
        ));
    }
    let mut selectors = Vec::with_capacity(sets.len());
    for (i, set) in sets.iter().enumerate() {
        if set.is_empty() {
            return Err((format!("spec.selectors[{i}]"), "empty set".into()));
        }
        let mut canon = Vec::with_capacity(set.len());
        for (j, s) in set.iter().enumerate() {
            let sel = Selector::parse(s)
                .map_err(|e| (format!("spec.selectors[{i}][{j}]"), e.to_string()))?;
            canon.push(sel.to_string());
        }
        canon.sort();
        canon.dedup();
        selectors.push(canon);
    }
    let x509 = ttl(raw.x509_ttl, DEFAULT_X509_TTL_SECS, MAX_X509_TTL_SECS)
        .map_err(|m| ("spec.x509Ttl".to_string(), m))?;
    let jwt = ttl(raw.jwt_ttl, DEFAULT_JWT_TTL_SECS, MAX_JWT_TTL_SECS)
        .map_err(|m| ("spec.jwtTtl".to_string(), m))?;
    for (i, d) in raw.dns_names.iter().enumerate() {
        validate_dns(d).map_err(|m| (format!("spec.dnsNames[{i}]"), m))?;
    }
    for (i, n) in raw.nodes.iter().enumerate() {
        if n != "*" {
            validate_name(n).map_err(|m| (format!("spec.nodes[{i}]"), m))?;
        }
    }
    let mut allow_exec = Vec::with_capacity(raw.allow_exec.len());
    for (i, a) in raw.allow_exec.iter().enumerate() {
        if !tether_attest::EXEC_CHECKS.contains(&a.as_str()) {
            return Err((
                format!("spec.allowExec[{i}]"),
                format!(
                    "{a:?} is not an exec check; valid names: {}",
                    tether_attest::EXEC_CHECKS.join(", ")
                ),
            ));
        }
        allow_exec.push(a.clone());
    }
    allow_exec.sort();
    allow_exec.dedup();
    Ok(WorkloadIdentitySpec {
        spiffe_id: id.to_string(),
        selectors,
        x509_ttl_secs: x509,
        jwt_ttl_secs: jwt,
        dns_names: raw.dns_names,
        nodes: raw.nodes,
        workload_api: raw.workload_api.unwrap_or(true),
        allow_exec,
    })
}

/// "10.0.0.0/8", "::1/128", or a bare address (a single host).
pub fn parse_cidr(s: &str) -> Result<(std::net::IpAddr, u8), String> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (s, None),
    };
    let ip: std::net::IpAddr = ip
        .parse()
        .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) => l
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("{s:?}: prefix length must be 0 to {max}"))?,
        None => max,
    };
    Ok((ip, len))
}

fn ports(raw: &[i64], field: &str) -> Result<Vec<u16>, (String, String)> {
    let mut out = Vec::with_capacity(raw.len());
    for (j, p) in raw.iter().enumerate() {
        let port = u16::try_from(*p).ok().filter(|p| *p > 0).ok_or_else(|| {
            (
                format!("{field}[{j}]"),
                format!("{p} is not a port (1 to 65535)"),
            )
        })?;
        out.push(port);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn validate_service(raw: RawService) -> Result<ServiceSpec, (String, String)> {
    if raw.addresses.is_empty() && raw.hostnames.is_empty() {
        return Err((
            "spec.addresses".into(),
            "give at least one address or hostname".into(),
        ));
    }
    let mut addresses = Vec::new();
    for (i, a) in raw.addresses.iter().enumerate() {
        let local = a.local.unwrap_or(false);
        let cidr = match (a.cidr.as_deref(), local) {
            (Some(_), true) => {
                return Err((
                    format!("spec.addresses[{i}]"),
                    "give either cidr or `local: true`, not both".to_string(),
                ));
            }
            (None, true) => String::new(),
            (Some(c), false) => {
                let (ip, len) =
                    parse_cidr(c).map_err(|m| (format!("spec.addresses[{i}].cidr"), m))?;
                format!("{ip}/{len}")
            }
            (None, false) => {
                return Err((
                    format!("spec.addresses[{i}].cidr"),
                    "missing (or say `local: true` for this host at every local address)"
                        .to_string(),
                ));
            }
        };
        let protocol = match a.protocol.as_deref().unwrap_or("tcp") {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "both" => Protocol::Both,
            other => {
                return Err((
                    format!("spec.addresses[{i}].protocol"),
                    format!("{other:?}: use tcp, udp or both"),
                ));
            }
        };
        addresses.push(ServiceAddress {
            cidr,
            local,
            ports: ports(&a.ports, &format!("spec.addresses[{i}].ports"))?,
            protocol,
        });
    }
    for (i, h) in raw.hostnames.iter().enumerate() {
        validate_dns(h).map_err(|m| (format!("spec.hostnames[{i}]"), m))?;
    }
    let host_ports = ports(&raw.host_ports, "spec.hostPorts")?;
    let mesh = match raw.mesh {
        None => None,
        Some(m) => {
            let mode = match m.mode.as_deref().unwrap_or("mutual") {
                "mutual" => TlsMode::Mutual,
                "passthrough" => TlsMode::Passthrough,
                "permissive" => TlsMode::Permissive,
                other => {
                    return Err((
                        "spec.mesh.mode".into(),
                        format!("{other:?}: use mutual, passthrough or permissive"),
                    ));
                }
            };
            // A tunnel carries a byte stream: datagrams cannot be fronted.
            if let Some(i) = addresses.iter().position(|a| a.protocol != Protocol::Tcp) {
                return Err((
                    format!("spec.addresses[{i}].protocol"),
                    "a Service with spec.mesh must be tcp only".into(),
                ));
            }
            if !raw.hostnames.is_empty() || addresses.is_empty() {
                return Err((
                    "spec.hostnames".into(),
                    "a Service with spec.mesh is fronted by the agent on its host: give its addresses, not hostnames".into(),
                ));
            }
            if let Some(i) = addresses.iter().position(|a| a.ports.is_empty()) {
                return Err((
                    format!("spec.addresses[{i}].ports"),
                    "a Service with spec.mesh needs explicit ports".into(),
                ));
            }
            // Plaintext peers of a permissive Service could send a PROXY
            // header of their own, naming any SPIFFE ID.
            if m.proxy_protocol && mode == TlsMode::Permissive {
                return Err((
                    "spec.mesh.proxyProtocol".into(),
                    "not with mode permissive: a client without an agent could forge the header; use mutual".into(),
                ));
            }
            for (i, n) in m.nodes.iter().enumerate() {
                validate_name(n).map_err(|e| (format!("spec.mesh.nodes[{i}]"), e))?;
            }
            Some(MeshSpec {
                mode,
                proxy_protocol: m.proxy_protocol,
                nodes: m.nodes,
            })
        }
    };
    Ok(ServiceSpec {
        addresses,
        hostnames: raw.hostnames,
        host_ports,
        labels: raw.labels,
        mesh,
    })
}

fn validate_policy(name: &str, raw: RawPolicy) -> Result<AccessPolicySpec, (String, String)> {
    if raw.services.is_empty() {
        return Err(("spec.services".into(), "name at least one Service".into()));
    }
    if raw.identities.is_empty() {
        return Err((
            "spec.identities".into(),
            "name at least one WorkloadIdentity".into(),
        ));
    }
    for (i, s) in raw.services.iter().enumerate() {
        validate_name(s).map_err(|m| (format!("spec.services[{i}]"), m))?;
    }
    for (i, s) in raw.identities.iter().enumerate() {
        validate_name(s).map_err(|m| (format!("spec.identities[{i}]"), m))?;
    }
    if let Some(w) = &raw.when {
        tether_policy::Condition::parse(name, w)
            .map_err(|e| ("spec.when".to_string(), e.to_string()))?;
    }
    Ok(AccessPolicySpec {
        services: raw.services,
        identities: raw.identities,
        when: raw.when,
    })
}

fn generic_yaml<T: Serialize>(kind: &str, name: &str, spec: &T) -> String {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Out<'a, T> {
        api_version: &'a str,
        kind: &'a str,
        metadata: std::collections::BTreeMap<&'a str, &'a str>,
        spec: &'a T,
    }
    let mut metadata = std::collections::BTreeMap::new();
    metadata.insert("name", name);
    serde_norway::to_string(&Out {
        api_version: API_VERSION,
        kind,
        metadata,
        spec,
    })
    .unwrap_or_default()
}

fn ttl(v: Option<serde_norway::Value>, default: i64, max: i64) -> Result<i64, String> {
    let secs = match v {
        None => return Ok(default),
        Some(serde_norway::Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| format!("{n} is not a whole number of seconds"))?,
        Some(serde_norway::Value::String(s)) => parse_duration(&s)?,
        Some(other) => {
            return Err(format!(
                "{other:?} is not a duration; use e.g. \"1h\", \"5m\", \"30s\""
            ));
        }
    };
    if secs < MIN_TTL_SECS || secs > max {
        return Err(format!(
            "{secs}s is out of range ({MIN_TTL_SECS}s to {max}s)"
        ));
    }
    Ok(secs)
}

/// "90", "90s", "5m", "1h", "2d", or combinations such as "1h30m".
pub fn parse_duration(s: &str) -> Result<i64, String> {
    let bad = || format!("{s:?} is not a duration; use e.g. \"1h\", \"5m\", \"30s\"");
    if s.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    let mut total: i64 = 0;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(bad()),
        };
        let n: i64 = num.parse().map_err(|_| bad())?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
        num.clear();
    }
    if !num.is_empty() {
        return Err(bad());
    }
    Ok(total)
}

fn format_duration(secs: i64) -> String {
    if secs % 3600 == 0 {
        format!("{}h", secs / 3600)
    } else if secs % 60 == 0 {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

fn validate_dns(d: &str) -> Result<(), String> {
    let ok = !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '*')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("{d:?} is not a valid DNS name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata:
  name: web
spec:
  spiffeId: spiffe://example.org/web
  selectors:
    - ["unix:uid:1000", "process:path:/usr/bin/python3"]
    - ["process:sha256:ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789"]
  x509Ttl: 30m
  dnsNames: [web.local]
---
apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata: {name: db}
spec:
  spiffeId: spiffe://example.org/db
  selectors: [["unix:user:postgres"]]
  workloadApi: false
---
"#;

    #[test]
    fn parses_multi_document_file() {
        let r = parse("good.yaml", GOOD.as_bytes()).unwrap();
        assert_eq!(r.len(), 2);
        let Resource::WorkloadIdentity { name, spec } = &r[0] else {
            panic!("not an identity")
        };
        assert_eq!(name, "web");
        assert_eq!(spec.x509_ttl_secs, 1800);
        assert_eq!(spec.jwt_ttl_secs, DEFAULT_JWT_TTL_SECS);
        assert!(spec.workload_api);
        assert!(
            spec.selectors[1][0]
                .ends_with("abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789")
        );
        let Resource::WorkloadIdentity { spec, .. } = &r[1] else {
            panic!("not an identity")
        };
        assert!(!spec.workload_api);
        // Round trip through get's YAML output.
        let again = parse("again", r[0].to_yaml().as_bytes()).unwrap();
        assert_eq!(again[0], r[0]);
    }

    fn error_of(yaml: &str) -> String {
        parse("bad.yaml", yaml.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_file_document_field() {
        let base = |spec: &str| {
            format!(
                "apiVersion: tether.dev/v1alpha1\nkind: WorkloadIdentity\nmetadata: {{name: w}}\nspec:\n{spec}"
            )
        };
        let e = error_of(&base(
            "  spiffeId: spiffe://Example.org/w\n  selectors: [[\"unix:uid:1\"]]\n",
        ));
        assert!(
            e.starts_with("bad.yaml: document 1 (WorkloadIdentity \"w\"): spec.spiffeId:"),
            "{e}"
        );
        let e = error_of(&base(
            "  spiffeId: spiffe://example.org/w\n  selectors: [[\"unix:uid:1\", \"proc:path:/x\"]]\n",
        ));
        assert!(e.contains("spec.selectors[0][1]"), "{e}");
        let e = error_of(&base(
            "  spiffeId: spiffe://example.org/w\n  selectors: [[\"unix:uid:abc\"]]\n",
        ));
        assert!(e.contains("spec.selectors[0][0]"), "{e}");
        let e = error_of(&base(
            "  spiffeId: spiffe://example.org/w\n  selectors: [[\"unix:uid:1\"]]\n  x509Ttl: forever\n",
        ));
        assert!(e.contains("spec.x509Ttl"), "{e}");
        let e = error_of(&base(
            "  spiffeId: spiffe://example.org/w\n  selectors: [[\"unix:uid:1\"]]\n  colour: red\n",
        ));
        assert!(e.contains("colour"), "{e}");
        let e = error_of(&base(
            "  spiffeId: spiffe://example.org/w\n  selectors: []\n",
        ));
        assert!(e.contains("spec.selectors"), "{e}");
        let e = error_of("apiVersion: v1\nkind: WorkloadIdentity\nmetadata: {name: w}\nspec: {}\n");
        assert!(e.contains("apiVersion"), "{e}");
        let e = error_of(
            "apiVersion: tether.dev/v1alpha1\nkind: Thing\nmetadata: {name: w}\nspec: {}\n",
        );
        assert!(e.contains("unknown kind"), "{e}");
        let e = error_of(&format!(
            "{}---\n{}",
            GOOD.trim_end_matches("---\n"),
            "apiVersion: tether.dev/v1alpha1\nkind: WorkloadIdentity\nmetadata: {name: Bad_Name}\nspec: {}\n"
        ));
        assert!(
            e.contains("document 3") && e.contains("metadata.name"),
            "{e}"
        );
        let e = error_of("key: [unclosed");
        assert!(e.contains("invalid YAML"), "{e}");
    }

    #[test]
    fn exec_checks_reserved_ids_and_local_services() {
        let ident = |extra: &str, id: &str| {
            format!(
                "apiVersion: tether.dev/v1alpha1\nkind: WorkloadIdentity\nmetadata: {{name: w}}\nspec:\n  spiffeId: {id}\n  selectors: [[\"unix:uid:1\"]]\n{extra}"
            )
        };
        let r = parse(
            "ok",
            ident(
                "  allowExec: [mount-namespace, LD_LIBRARY_PATH, mount-namespace]\n",
                "spiffe://example.org/w",
            )
            .as_bytes(),
        )
        .unwrap();
        let Resource::WorkloadIdentity { spec, .. } = &r[0] else {
            panic!("not an identity")
        };
        assert_eq!(spec.allow_exec, ["LD_LIBRARY_PATH", "mount-namespace"]);
        let again = parse("again", r[0].to_yaml().as_bytes()).unwrap();
        assert_eq!(again[0], r[0]);
        let e = error_of(&ident("  allowExec: [ptrace]\n", "spiffe://example.org/w"));
        assert!(
            e.contains("spec.allowExec[0]") && e.contains("LD_PRELOAD"),
            "{e}"
        );
        // Tether's own identities cannot be claimed by a workload.
        for id in [
            "spiffe://example.org/tether/node/n1",
            "spiffe://example.org/tether/server",
            "spiffe://example.org/tether",
        ] {
            let e = error_of(&ident("", id));
            assert!(e.contains("spec.spiffeId") && e.contains("reserved"), "{e}");
        }
        assert!(parse("ok", ident("", "spiffe://example.org/tethered").as_bytes()).is_ok());

        let svc = |addrs: &str| {
            format!(
                "apiVersion: tether.dev/v1alpha1\nkind: Service\nmetadata: {{name: s}}\nspec:\n  addresses: [{addrs}]\n"
            )
        };
        let r = parse(
            "ok",
            svc("{local: true, ports: [6379], protocol: both}").as_bytes(),
        )
        .unwrap();
        let Resource::Service { spec, .. } = &r[0] else {
            panic!("not a service")
        };
        assert!(spec.addresses[0].local && spec.addresses[0].cidr.is_empty());
        assert_eq!(spec.addresses[0].network(), None);
        let again = parse("again", r[0].to_yaml().as_bytes()).unwrap();
        assert_eq!(again[0], r[0]);
        let e = error_of(&svc("{local: true, cidr: 127.0.0.1/32, ports: [1]}"));
        assert!(
            e.contains("spec.addresses[0]") && e.contains("not both"),
            "{e}"
        );
        let e = error_of(&svc("{ports: [1]}"));
        assert!(e.contains("spec.addresses[0].cidr"), "{e}");
    }

    #[test]
    fn services_and_policies() {
        let y = r#"
apiVersion: tether.dev/v1alpha1
kind: Service
metadata: {name: redis}
spec:
  addresses:
    - {cidr: 127.0.0.1, ports: [6379]}
    - {cidr: "::1/128", ports: [6379, 6380], protocol: both}
---
apiVersion: tether.dev/v1alpha1
kind: AccessPolicy
metadata: {name: redis-clients}
spec:
  services: [redis]
  identities: [redis-cli]
  when: context.time.hour >= 8
"#;
        let r = parse("s.yaml", y.as_bytes()).unwrap();
        let Resource::Service { spec, .. } = &r[0] else {
            panic!()
        };
        assert_eq!(spec.addresses[0].cidr, "127.0.0.1/32");
        assert_eq!(spec.addresses[1].protocol, Protocol::Both);
        let again = parse("again", r[1].to_yaml().as_bytes()).unwrap();
        assert_eq!(again[0], r[1]);
        let again = parse("again", r[0].to_yaml().as_bytes()).unwrap();
        assert_eq!(again[0], r[0]);
        let bad = y.replace("context.time.hour >= 8", "context.time.hour >=");
        assert!(error_of(&bad).contains("spec.when"), "{}", error_of(&bad));
        let bad = y.replace("127.0.0.1, ports: [6379]", "127.0.0.1/33, ports: [6379]");
        assert!(error_of(&bad).contains("spec.addresses[0].cidr"));
        let bad = y.replace("ports: [6379]}", "ports: [70000]}");
        assert!(error_of(&bad).contains("spec.addresses[0].ports[0]"));
    }

    #[test]
    fn mesh_services() {
        let y = r#"
apiVersion: tether.dev/v1alpha1
kind: Service
metadata: {name: pg}
spec:
  addresses: [{cidr: 10.0.0.2, ports: [5432]}]
  mesh: {mode: passthrough, proxyProtocol: true, nodes: [db-1]}
"#;
        let r = parse("s.yaml", y.as_bytes()).unwrap();
        let Resource::Service { spec, .. } = &r[0] else {
            panic!()
        };
        let mesh = spec.mesh.as_ref().unwrap();
        assert_eq!(
            (mesh.mode, mesh.proxy_protocol),
            (TlsMode::Passthrough, true)
        );
        assert_eq!(mesh.nodes, ["db-1"]);
        let again = parse("again", r[0].to_yaml().as_bytes()).unwrap();
        assert_eq!(again[0], r[0]);
        let dflt = y.replace(
            "{mode: passthrough, proxyProtocol: true, nodes: [db-1]}",
            "{}",
        );
        let r = parse("s.yaml", dflt.as_bytes()).unwrap();
        let Resource::Service { spec, .. } = &r[0] else {
            panic!()
        };
        assert_eq!(spec.mesh.as_ref().unwrap().mode, TlsMode::Mutual);
        let bad = y.replace("passthrough", "tls");
        assert!(
            error_of(&bad).contains("spec.mesh.mode"),
            "{}",
            error_of(&bad)
        );
        let bad = y.replace("ports: [5432]}", "ports: [5432], protocol: udp}");
        assert!(error_of(&bad).contains("spec.addresses[0].protocol"));
        let bad = y.replace(", ports: [5432]}", "}");
        assert!(error_of(&bad).contains("spec.addresses[0].ports"));
        let bad = y.replace("passthrough", "permissive");
        assert!(error_of(&bad).contains("spec.mesh.proxyProtocol"));
        let bad = y.replace("db-1", "Db_1");
        assert!(
            error_of(&bad).contains("spec.mesh.nodes[0]"),
            "{}",
            error_of(&bad)
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1h30m").unwrap(), 5400);
        assert_eq!(parse_duration("45").unwrap(), 45);
        for bad in ["", "h", "1x", "1h5", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
