//! The agent's copy of the registry: the identities that apply to this node
//! and the trust bundle, kept current by the server's watch stream.

use tether_attest::{ProcessInfo, Selector, matches_all};
use tether_proto::tether::{Identity, NodeState};
use tether_spiffe::{Bundle, SpiffeId, TrustDomain};

#[derive(Debug, Clone)]
pub struct AgentIdentity {
    pub name: String,
    pub spiffe_id: SpiffeId,
    pub sets: Vec<Vec<Selector>>,
    /// The selector strings as applied, for explanations.
    pub raw_sets: Vec<Vec<String>>,
    pub x509_ttl_secs: i64,
    pub jwt_ttl_secs: i64,
    pub workload_api: bool,
    /// Exec checks this identity accepts (spec.allowExec).
    pub allow_exec: Vec<String>,
}

impl AgentIdentity {
    /// The process passes the exec checks (those this identity does not
    /// accept by name) and one selector set.
    pub fn matches(&self, p: &ProcessInfo) -> bool {
        crate::state::verify::refusal(&p.exec, &self.allow_exec).is_none()
            && self.sets.iter().any(|set| matches_all(set, p))
    }
}

/// A protected Service as the agent enforces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentService {
    pub name: String,
    pub spec: tether_manifest::ServiceSpec,
}

/// An AccessPolicy with its condition parsed.
#[derive(Debug, Clone)]
pub struct AgentPolicy {
    pub name: String,
    pub spec: tether_manifest::AccessPolicySpec,
    pub condition: Option<tether_policy::Condition>,
}

/// A credential some identity of this node receives: a CredentialBinding
/// with the source it names (a static source's value is never here; it is
/// fetched when first read).
#[derive(Debug, Clone)]
pub struct AgentBinding {
    pub name: String,
    pub identity: String,
    pub source: String,
    pub source_spec: tether_manifest::CredentialSourceSpec,
    /// Delivered as this file in the credential filesystem.
    pub file: Option<tether_manifest::CredentialFile>,
    /// Injected into connections to a Service.
    pub inject: Option<tether_manifest::Injection>,
}

#[derive(Debug, Clone)]
pub struct Registry {
    pub revision: i64,
    pub identities: Vec<AgentIdentity>,
    pub bundle: Bundle,
    pub services: Vec<AgentService>,
    pub policies: Vec<AgentPolicy>,
    /// Sorted by binding name.
    pub bindings: Vec<AgentBinding>,
}

impl Registry {
    pub fn empty(bundle: Bundle) -> Self {
        Registry {
            revision: -1,
            identities: Vec::new(),
            bundle,
            services: Vec::new(),
            policies: Vec::new(),
            bindings: Vec::new(),
        }
    }

    /// Converts the server's snapshot. Entries the agent cannot parse are
    /// skipped with a warning: they then match nothing, which fails closed.
    pub fn from_state(td: &TrustDomain, s: &NodeState) -> anyhow::Result<Self> {
        let bundle = Bundle::from_json(td.clone(), s.bundle_json.as_bytes())?;
        let identities = s
            .identities
            .iter()
            .filter_map(|i| {
                convert(i)
                    .map_err(
                        |e| tracing::warn!(identity = %i.name, error = %e, "skipping identity"),
                    )
                    .ok()
            })
            .collect();
        let mut services = Vec::new();
        let mut policies = Vec::new();
        let mut bindings = Vec::new();
        let mut sources = std::collections::HashMap::new();
        for r in &s.resources {
            match tether_manifest::Resource::from_stored(&r.kind, &r.name, &r.spec_json) {
                Some(tether_manifest::Resource::Service { name, spec }) => {
                    services.push(AgentService { name, spec })
                }
                Some(tether_manifest::Resource::AccessPolicy { name, spec }) => {
                    // A condition that does not parse can never allow.
                    let condition = match &spec.when {
                        Some(w) => match tether_policy::Condition::parse(&name, w) {
                            Ok(c) => Some(c),
                            Err(e) => {
                                tracing::warn!(policy = %name, error = %e, "skipping policy");
                                continue;
                            }
                        },
                        None => None,
                    };
                    policies.push(AgentPolicy {
                        name,
                        spec,
                        condition,
                    });
                }
                Some(tether_manifest::Resource::CredentialBinding { name, spec }) => {
                    bindings.push((name, spec))
                }
                Some(tether_manifest::Resource::CredentialSource { name, spec }) => {
                    sources.insert(name, spec);
                }
                _ => tracing::warn!(kind = %r.kind, name = %r.name, "skipping unreadable resource"),
            }
        }
        services.sort_by(|a, b| a.name.cmp(&b.name));
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        // A binding without its source, or with nothing to deliver,
        // delivers nothing.
        let mut bindings: Vec<AgentBinding> = bindings
            .into_iter()
            .filter_map(|(name, b)| {
                let Some(source_spec) = sources.get(&b.source) else {
                    tracing::warn!(binding = %name, source = %b.source, "skipping binding: no source");
                    return None;
                };
                if b.file.is_none() && b.inject.is_none() {
                    return None;
                }
                Some(AgentBinding {
                    name,
                    identity: b.identity,
                    source: b.source,
                    source_spec: source_spec.clone(),
                    file: b.file,
                    inject: b.inject,
                })
            })
            .collect();
        bindings.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Registry {
            revision: s.revision,
            identities,
            bundle,
            services,
            policies,
            bindings,
        })
    }

    /// The hostnames of Service `name` (lowercase, sorted, once each):
    /// what its intercepting CA is constrained to.
    pub fn service_hostnames(&self, name: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .services
            .iter()
            .filter(|s| s.name == name)
            .flat_map(|s| s.spec.hostnames.iter().map(|h| h.to_ascii_lowercase()))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    pub fn matching(&self, p: &ProcessInfo) -> Vec<&AgentIdentity> {
        self.identities.iter().filter(|i| i.matches(p)).collect()
    }
}

fn convert(i: &Identity) -> anyhow::Result<AgentIdentity> {
    let spiffe_id = SpiffeId::parse(&i.spiffe_id)?;
    let mut sets = Vec::new();
    for set in &i.selector_sets {
        let parsed = set
            .selectors
            .iter()
            .map(|s| Selector::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        if !parsed.is_empty() {
            sets.push(parsed);
        }
    }
    Ok(AgentIdentity {
        name: i.name.clone(),
        spiffe_id,
        sets,
        raw_sets: i
            .selector_sets
            .iter()
            .map(|s| s.selectors.clone())
            .collect(),
        x509_ttl_secs: i.x509_ttl_secs,
        jwt_ttl_secs: i.jwt_ttl_secs,
        workload_api: i.workload_api,
        allow_exec: i.allow_exec.clone(),
    })
}

impl crate::identity::Wanted for AgentIdentity {
    fn name(&self) -> &str {
        &self.name
    }
    fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }
    fn x509_ttl_secs(&self) -> i64 {
        self.x509_ttl_secs
    }
    fn workload_api(&self) -> bool {
        self.workload_api
    }
}
