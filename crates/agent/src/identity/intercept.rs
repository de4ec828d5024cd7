//! The node's intercepting CA (HTTPS injection): made and held by this
//! agent, never sent anywhere, name-constrained to the hostnames of the
//! Services a binding intercepts, valid a day and replaced at half-life or
//! as soon as that set of names changes. Its bundle (the current CA and,
//! until it expires, the one before) is a file only bound processes see;
//! its leaves (one per hostname, an hour, cached) are what the injector
//! presents to them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tether_ca::{InterceptCa, new_intercept_ca, sign_intercept_leaf};

use crate::clock::unix_now;

/// Lifetime of an intercepting CA; replaced at half of it.
const CA_TTL_SECS: i64 = 24 * 3600;
/// Lifetime of a leaf (never past its CA).
const LEAF_TTL_SECS: i64 = 3600;

pub struct Interceptor {
    node: String,
    state: Mutex<Option<Generation>>,
}

struct Generation {
    names: Vec<String>,
    ca: InterceptCa,
    issued: i64,
    /// The CA before this one and when it expires: still in the bundle, so
    /// a process that read it before the change keeps verifying until then
    /// (leaves are all signed by the current one).
    previous: Option<(Vec<u8>, i64)>,
    leaves: HashMap<String, (i64, Arc<rustls::sign::CertifiedKey>)>,
}

impl Interceptor {
    pub fn new(node: &str) -> Arc<Self> {
        Arc::new(Interceptor {
            node: node.to_owned(),
            state: Mutex::new(None),
        })
    }

    fn with_current<T>(
        &self,
        names: &[String],
        f: impl FnOnce(&mut Generation, i64) -> Result<T, String>,
    ) -> Result<T, String> {
        let now = unix_now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = state
            .as_ref()
            .is_some_and(|g| g.names == names && now < g.issued + CA_TTL_SECS / 2);
        if !fresh {
            let ca = new_intercept_ca(&self.node, names, now, CA_TTL_SECS)
                .map_err(|e| format!("intercepting CA: {e}"))?;
            let previous = state
                .take()
                .map(|g| (g.ca.cert_der, g.ca.not_after))
                .filter(|(_, exp)| *exp > now);
            *state = Some(Generation {
                names: names.to_vec(),
                ca,
                issued: now,
                previous,
                leaves: HashMap::new(),
            });
        }
        match state.as_mut() {
            Some(g) => f(g, now),
            None => Err("no intercepting CA".into()),
        }
    }

    /// The bundle a bound process trusts (PEM), for the names in force.
    pub fn bundle_pem(&self, names: &[String]) -> Result<String, String> {
        self.with_current(names, |g, now| {
            let mut pem = tether_ca::pem_encode("CERTIFICATE", &g.ca.cert_der);
            if let Some((prev, exp)) = &g.previous
                && *exp > now
            {
                pem.push_str(&tether_ca::pem_encode("CERTIFICATE", prev));
            }
            Ok(pem)
        })
    }

    /// A server leaf for `host`, which must be one of `names` exactly.
    pub fn leaf(
        &self,
        names: &[String],
        host: &str,
    ) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
        let host = host.to_ascii_lowercase();
        if !names.contains(&host) {
            return Err(format!(
                "{host:?} is not a hostname of an intercepted Service"
            ));
        }
        self.with_current(names, |g, now| {
            if let Some((exp, ck)) = g.leaves.get(&host)
                && now + 60 < *exp
            {
                return Ok(ck.clone());
            }
            let exp = (now + LEAF_TTL_SECS).min(g.ca.not_after);
            let (der, key) = sign_intercept_leaf(&g.ca, &host, now, exp)
                .map_err(|e| format!("leaf for {host}: {e}"))?;
            let ck = tether_tls::certified_key(&[der], key.pkcs8_der())
                .map_err(|e| format!("leaf for {host}: {e}"))?;
            g.leaves.insert(host, (exp, ck.clone()));
            Ok(ck)
        })
    }
}
