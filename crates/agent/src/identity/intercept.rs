//! The node's intercepting CAs (HTTPS injection): made and held by this
//! agent, never sent anywhere. One per set of hostnames (the hostnames of
//! one intercepted Service), name-constrained to exactly those, so a
//! process bound to one Service never trusts a CA that could vouch for
//! another's names, and one binding's change never rotates another's CA.
//!
//! Rotation without breaking clients that load their bundle once: a new CA
//! is made at half-life and published at once (the bundle file holds the
//! current CA and the one before it), but leaves keep being signed by the
//! older CA while it outlives a leaf; only then does the new one sign. A
//! process that read its bundle at any time in the older CA's second half
//! keeps verifying until the older CA expires.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tether_ca::{InterceptCa, new_intercept_ca, sign_intercept_leaf};

use crate::clock::unix_now;

/// Lifetime of an intercepting CA; a successor is made at half of it.
const CA_TTL_SECS: i64 = 24 * 3600;
/// Lifetime of a leaf (never past its CA).
const LEAF_TTL_SECS: i64 = 3600;
/// CAs kept at once (one per intercepted hostname set).
const MAX_SETS: usize = 1024;

pub struct Interceptor {
    node: String,
    sets: Mutex<HashMap<Vec<String>, Generation>>,
}

struct Generation {
    current: InterceptCa,
    issued: i64,
    /// The CA before `current`, while it is valid.
    older: Option<InterceptCa>,
    /// Leaves by hostname, with their expiry and whether `older` signed them.
    leaves: HashMap<String, (i64, bool, Arc<rustls::sign::CertifiedKey>)>,
}

impl Generation {
    /// The CA that signs leaves now: the older one while it outlives a leaf.
    fn signer(&self, now: i64) -> (&InterceptCa, bool) {
        match &self.older {
            Some(o) if o.not_after > now + LEAF_TTL_SECS + 300 => (o, true),
            _ => (&self.current, false),
        }
    }
}

impl Interceptor {
    pub fn new(node: &str) -> Arc<Self> {
        Arc::new(Interceptor {
            node: node.to_owned(),
            sets: Mutex::new(HashMap::new()),
        })
    }

    fn with_set<T>(
        &self,
        names: &[String],
        f: impl FnOnce(&mut Generation, i64) -> Result<T, String>,
    ) -> Result<T, String> {
        let now = unix_now();
        let mut names = names.to_vec();
        names.sort();
        names.dedup();
        let mut sets = self.sets.lock().unwrap_or_else(|p| p.into_inner());
        if sets.len() >= MAX_SETS && !sets.contains_key(&names) {
            sets.retain(|_, g| g.current.not_after > now);
        }
        let fresh = |now| {
            new_intercept_ca(&self.node, &names, now, CA_TTL_SECS)
                .map_err(|e| format!("intercepting CA: {e}"))
        };
        let g = match sets.get_mut(&names) {
            Some(g) => g,
            None => {
                let g = Generation {
                    current: fresh(now)?,
                    issued: now,
                    older: None,
                    leaves: HashMap::new(),
                };
                sets.entry(names.clone()).or_insert(g)
            }
        };
        if now >= g.issued + CA_TTL_SECS / 2 {
            let next = fresh(now)?;
            g.older = Some(std::mem::replace(&mut g.current, next)).filter(|o| o.not_after > now);
            g.issued = now;
            g.leaves.clear();
        }
        if g.older.as_ref().is_some_and(|o| o.not_after <= now) {
            g.older = None;
        }
        f(g, now)
    }

    /// The bundle a process bound to a Service with these hostnames trusts
    /// (PEM): the current CA and the one before it, while valid.
    pub fn bundle_pem(&self, names: &[String]) -> Result<String, String> {
        self.with_set(names, |g, _| {
            let mut pem = tether_ca::pem_encode("CERTIFICATE", &g.current.cert_der);
            if let Some(o) = &g.older {
                pem.push_str(&tether_ca::pem_encode("CERTIFICATE", &o.cert_der));
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
                "{host:?} is not a hostname of the intercepted Service"
            ));
        }
        self.with_set(names, |g, now| {
            let (ca, by_older) = g.signer(now);
            if let Some((exp, older, ck)) = g.leaves.get(&host)
                && now + 60 < *exp
                && *older == by_older
            {
                return Ok(ck.clone());
            }
            let exp = (now + LEAF_TTL_SECS).min(ca.not_after);
            let (der, key) = sign_intercept_leaf(ca, &host, now, exp)
                .map_err(|e| format!("leaf for {host}: {e}"))?;
            let ck = tether_tls::certified_key(&[der], key.pkcs8_der())
                .map_err(|e| format!("leaf for {host}: {e}"))?;
            g.leaves.insert(host, (exp, by_older, ck.clone()));
            Ok(ck)
        })
    }
}
