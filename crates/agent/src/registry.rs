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
}

impl AgentIdentity {
    pub fn matches(&self, p: &ProcessInfo) -> bool {
        self.sets.iter().any(|set| matches_all(set, p))
    }
}

#[derive(Debug, Clone)]
pub struct Registry {
    pub revision: i64,
    pub identities: Vec<AgentIdentity>,
    pub bundle: Bundle,
}

impl Registry {
    pub fn empty(bundle: Bundle) -> Self {
        Registry { revision: -1, identities: Vec::new(), bundle }
    }

    /// Converts the server's snapshot. Entries the agent cannot parse are
    /// skipped with a warning: they then match nothing, which fails closed.
    pub fn from_state(td: &TrustDomain, s: &NodeState) -> anyhow::Result<Self> {
        let bundle = Bundle::from_json(td.clone(), s.bundle_json.as_bytes())?;
        let identities = s.identities.iter().filter_map(|i| convert(i).map_err(|e| tracing::warn!(identity = %i.name, error = %e, "skipping identity")).ok()).collect();
        Ok(Registry { revision: s.revision, identities, bundle })
    }

    pub fn matching(&self, p: &ProcessInfo) -> Vec<&AgentIdentity> {
        self.identities.iter().filter(|i| i.matches(p)).collect()
    }
}

fn convert(i: &Identity) -> anyhow::Result<AgentIdentity> {
    let spiffe_id = SpiffeId::parse(&i.spiffe_id)?;
    let mut sets = Vec::new();
    for set in &i.selector_sets {
        let parsed = set.selectors.iter().map(|s| Selector::parse(s)).collect::<Result<Vec<_>, _>>()?;
        if !parsed.is_empty() {
            sets.push(parsed);
        }
    }
    Ok(AgentIdentity {
        name: i.name.clone(),
        spiffe_id,
        sets,
        raw_sets: i.selector_sets.iter().map(|s| s.selectors.clone()).collect(),
        x509_ttl_secs: i.x509_ttl_secs,
        jwt_ttl_secs: i.jwt_ttl_secs,
        workload_api: i.workload_api,
    })
}
