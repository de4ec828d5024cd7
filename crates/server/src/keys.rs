//! Signing keys (X.509 CAs and JWT keys), their rotation, and the trust
//! bundle built from them.
//!
//! Rotation is two-step so relying parties never see an SVID signed by a
//! CA they do not trust yet: a new key is first *prepared* (published in
//! the bundle, not signing), and only *activated* later; the previous key is
//! *retired* but stays in the bundle until it expires, so everything it
//! signed keeps validating. Automatic rotation prepares at half the active
//! key's lifetime and activates at five sixths.

use tether_ca::{CaMaterial, PrivateKey, Signer, Upstream};
use tether_spiffe::jwt::JwtKey;
use tether_spiffe::{Bundle, SpiffeId, TrustDomain};
use tether_store::{CaRow, JwtKeyRow, KeyState, Store};

use crate::ServerError;

/// What is known about the tokens the active JWT key has signed, so that
/// when it is retired it stays published exactly as long as they live.
///
/// Kept in this server process only: with several servers on one database
/// each would know its own tokens, which is why an unknown history falls
/// back to the longest lifetime any token can have.
pub struct JwtIssued {
    kid: String,
    /// The latest `exp` it signed; None when it may have signed before this
    /// process started.
    last_exp: Option<i64>,
}

impl JwtIssued {
    /// For a key found active at start: what it signed before is unknown.
    pub fn unknown(kid: &str) -> Self {
        JwtIssued {
            kid: kid.to_owned(),
            last_exp: None,
        }
    }

    /// For a key that became active at `now` in this process.
    pub fn fresh(kid: &str, now: i64) -> Self {
        JwtIssued {
            kid: kid.to_owned(),
            last_exp: Some(now),
        }
    }

    pub fn note(&mut self, kid: &str, exp: i64) {
        if self.kid == kid {
            self.last_exp = self.last_exp.map(|e| e.max(exp));
        }
    }

    /// When a retirement of `kid` at `now` may end its publication: after
    /// its last token's expiry plus the leeway validators allow for skew.
    /// Unknown history: no token outlives `now` plus the longest JWT TTL.
    pub fn retire_until(&self, kid: &str, now: i64) -> Option<i64> {
        if self.kid != kid {
            return None;
        }
        let last = self
            .last_exp
            .unwrap_or(now.saturating_add(tether_manifest::MAX_JWT_TTL_SECS));
        Some(last.saturating_add(tether_spiffe::jwt::CLOCK_SKEW_LEEWAY_SECS))
    }

    /// After `kid` became the active key at `now`: it has signed nothing.
    pub fn activated(&mut self, kid: &str, now: i64) {
        if self.kid != kid {
            *self = JwtIssued::fresh(kid, now);
        }
    }
}

/// The bundle's refresh hint: how often relying parties should re-fetch.
const REFRESH_HINT_SECS: u64 = 300;

pub struct ActiveKeys {
    pub signer: Signer,
    pub signer_id: i64,
    pub jwt: JwtKey,
    pub bundle: Bundle,
}

pub struct KeyManager {
    pub td: TrustDomain,
    pub ttl_secs: i64,
    pub upstream: Option<Upstream>,
    /// Private keys are sealed before they reach the database.
    pub sealer: std::sync::Arc<crate::secrets::Sealer>,
    /// Whether a key stored in clear (before sealing existed) is read.
    pub clear_keys_allowed: bool,
}

fn sealing(e: crate::secrets::SealError) -> ServerError {
    ServerError::Internal(format!("a signing key in the database: {e}"))
}

fn lifetime_fraction_passed(created: i64, not_after: i64, now: i64, num: i64, den: i64) -> bool {
    let life = (not_after - created).max(1);
    (now - created) * den >= life * num
}

impl KeyManager {
    fn new_ca(&self, now: i64) -> Result<CaMaterial, ServerError> {
        Ok(match &self.upstream {
            Some(up) => tether_ca::new_intermediate_ca(&self.td, up, self.ttl_secs, now)?,
            None => tether_ca::new_self_signed_ca(&self.td, self.ttl_secs, now)?,
        })
    }

    fn insert_ca(
        &self,
        store: &Store,
        m: &CaMaterial,
        state: KeyState,
        now: i64,
    ) -> Result<i64, ServerError> {
        Ok(store.insert_ca(&CaRow {
            id: 0,
            cert_der: m.cert_der.clone(),
            key_pkcs8: self.sealer.seal_key(&m.key_pkcs8).map_err(sealing)?,
            chain_der: m.chain.clone(),
            anchors_der: m.anchors.clone(),
            state,
            not_after: m.not_after,
            created_at: now,
        })?)
    }

    fn insert_jwt(&self, store: &Store, state: KeyState, now: i64) -> Result<(), ServerError> {
        let kid = hex::encode(rand::random::<[u8; 16]>());
        let key =
            JwtKey::generate(&kid).map_err(|e| ServerError::Internal(format!("JWT key: {e}")))?;
        store.insert_jwt_key(&JwtKeyRow {
            kid,
            key_pkcs8: self.sealer.seal_key(key.pkcs8_der()).map_err(sealing)?,
            state,
            not_after: now + self.ttl_secs,
            created_at: now,
        })?;
        Ok(())
    }

    /// Creates missing keys, performs due rotation steps (or the one
    /// `force`d by an operator), prunes expired keys and returns the active
    /// keys with a freshly built bundle. `changed` tells whether the bundle
    /// content changed (so its sequence number was bumped).
    ///
    /// `jwt_retire_until` is when the last token signed by the active JWT
    /// key expires, if the caller knows: a key retired by this call leaves
    /// the bundle then instead of at the end of its own life.
    pub fn reconcile(
        &self,
        store: &Store,
        now: i64,
        force: Option<&str>,
        jwt_retire_until: Option<i64>,
    ) -> Result<(ActiveKeys, bool), ServerError> {
        let before = self.bundle_keys(store, now)?;
        let cas = store.cas()?;
        let active = cas
            .iter()
            .find(|c| c.state == KeyState::Active && c.not_after > now);
        let prepared = cas
            .iter()
            .find(|c| c.state == KeyState::Prepared && c.not_after > now);
        match (active, prepared) {
            (None, Some(p)) => store.activate_ca(p.id)?,
            (None, None) => {
                let m = self.new_ca(now)?;
                let id = self.insert_ca(store, &m, KeyState::Prepared, now)?;
                store.activate_ca(id)?;
            }
            (Some(a), None) => {
                if force == Some("prepare")
                    || lifetime_fraction_passed(a.created_at, a.not_after, now, 1, 2)
                {
                    let m = self.new_ca(now)?;
                    self.insert_ca(store, &m, KeyState::Prepared, now)?;
                } else if force == Some("activate") {
                    return Err(ServerError::InvalidArgument(
                        "no prepared CA to activate; run `rotate prepare` first".into(),
                    ));
                }
            }
            (Some(a), Some(p)) => {
                if force == Some("activate")
                    || lifetime_fraction_passed(a.created_at, a.not_after, now, 5, 6)
                {
                    store.activate_ca(p.id)?;
                } else if force == Some("prepare") {
                    return Err(ServerError::InvalidArgument(
                        "a prepared CA is already published; activate it with `rotate activate`"
                            .into(),
                    ));
                }
            }
        }
        let jwts = store.jwt_keys()?;
        let active = jwts
            .iter()
            .find(|k| k.state == KeyState::Active && k.not_after > now);
        let prepared = jwts
            .iter()
            .find(|k| k.state == KeyState::Prepared && k.not_after > now);
        match (active, prepared) {
            (None, Some(p)) => store.activate_jwt_key(&p.kid, jwt_retire_until)?,
            (None, None) => {
                self.insert_jwt(store, KeyState::Active, now)?;
            }
            (Some(a), None) => {
                if force == Some("prepare")
                    || lifetime_fraction_passed(a.created_at, a.not_after, now, 1, 2)
                {
                    self.insert_jwt(store, KeyState::Prepared, now)?;
                }
            }
            (Some(a), Some(p)) => {
                if force == Some("activate")
                    || lifetime_fraction_passed(a.created_at, a.not_after, now, 5, 6)
                {
                    store.activate_jwt_key(&p.kid, jwt_retire_until)?;
                }
            }
        }
        store.prune_expired_keys(now)?;

        let after = self.bundle_keys(store, now)?;
        let changed = after != before;
        let sequence = if changed {
            store.bump_counter("bundle_sequence")?
        } else {
            store.counter("bundle_sequence")?
        };
        let (x509, jwt_auth) = after;
        let mut bundle = Bundle::new(self.td.clone());
        bundle.x509_authorities = x509;
        bundle.jwt_authorities = jwt_auth;
        bundle.sequence = u64::try_from(sequence).unwrap_or(0);
        bundle.refresh_hint_secs = Some(REFRESH_HINT_SECS);

        let cas = store.cas()?;
        let ca = cas
            .iter()
            .find(|c| c.state == KeyState::Active)
            .ok_or_else(|| ServerError::Internal("no active CA after reconcile".into()))?;
        let signer = Signer::new(&CaMaterial {
            cert_der: ca.cert_der.clone(),
            key_pkcs8: self
                .sealer
                .open_key(&ca.key_pkcs8, self.clear_keys_allowed)
                .map_err(sealing)?,
            chain: ca.chain_der.clone(),
            anchors: ca.anchors_der.clone(),
            not_after: ca.not_after,
        })?;
        let jwts = store.jwt_keys()?;
        let jk = jwts
            .iter()
            .find(|k| k.state == KeyState::Active)
            .ok_or_else(|| ServerError::Internal("no active JWT key after reconcile".into()))?;
        let der = self
            .sealer
            .open_key(&jk.key_pkcs8, self.clear_keys_allowed)
            .map_err(sealing)?;
        let jwt = JwtKey::from_pkcs8(&jk.kid, &der)
            .map_err(|e| ServerError::Internal(format!("JWT key: {e}")))?;
        Ok((
            ActiveKeys {
                signer,
                signer_id: ca.id,
                jwt,
                bundle,
            },
            changed,
        ))
    }

    /// Everything that goes into the bundle, in a stable order: the anchors
    /// of every unexpired CA (prepared, active, retired) and every unexpired
    /// JWT key.
    #[allow(clippy::type_complexity)]
    fn bundle_keys(
        &self,
        store: &Store,
        now: i64,
    ) -> Result<(Vec<Vec<u8>>, Vec<tether_spiffe::bundle::JwtAuthority>), ServerError> {
        let mut anchors: Vec<Vec<u8>> = Vec::new();
        for c in store.cas()?.iter().filter(|c| c.not_after > now) {
            for a in &c.anchors_der {
                if !anchors.contains(a) {
                    anchors.push(a.clone());
                }
            }
        }
        let mut jwt = Vec::new();
        for k in store.jwt_keys()?.iter().filter(|k| k.not_after > now) {
            let der = self
                .sealer
                .open_key(&k.key_pkcs8, self.clear_keys_allowed)
                .map_err(sealing)?;
            let key = JwtKey::from_pkcs8(&k.kid, &der)
                .map_err(|e| ServerError::Internal(format!("JWT key: {e}")))?;
            jwt.push(key.authority());
        }
        Ok((anchors, jwt))
    }
}

/// Issues the server's own X.509-SVID (spiffe://TD/tether/server), which
/// agents pin by ID when they connect.
pub fn issue_server_svid(
    keys: &ActiveKeys,
    td: &TrustDomain,
    now: i64,
) -> Result<(Vec<Vec<u8>>, PrivateKey, i64), ServerError> {
    let id = server_id(td)?;
    let key = PrivateKey::generate()?;
    let csr = tether_ca::build_csr(&key, &id)?;
    let cert = keys.signer.sign_svid(&csr, &id, &[], 86400, now)?;
    Ok((cert.chain, key, cert.not_after))
}

pub fn server_id(td: &TrustDomain) -> Result<SpiffeId, ServerError> {
    SpiffeId::new(td, "/tether/server").map_err(|e| ServerError::Internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::JwtIssued;
    use tether_spiffe::jwt::CLOCK_SKEW_LEEWAY_SECS as LEEWAY;

    #[test]
    fn a_retired_jwt_key_lives_as_long_as_its_last_token() {
        let mut i = JwtIssued::fresh("a", 1000);
        i.note("a", 1300);
        i.note("a", 1100);
        i.note("b", 9999); // not the active key: ignored
        assert_eq!(i.retire_until("a", 1200), Some(1300 + LEEWAY));
        assert_eq!(i.retire_until("b", 1200), None);
        // A fresh key that signed nothing can go once the leeway passes.
        i.activated("b", 2000);
        assert_eq!(i.retire_until("b", 2000), Some(2000 + LEEWAY));
        // Re-activating the same key keeps its history.
        i.note("b", 2500);
        i.activated("b", 2100);
        assert_eq!(i.retire_until("b", 2100), Some(2500 + LEEWAY));
    }

    #[test]
    fn an_unknown_history_is_bounded_by_the_longest_jwt_ttl() {
        let mut i = JwtIssued::unknown("a");
        i.note("a", 1300); // still unknown what came before
        assert_eq!(
            i.retire_until("a", 1000),
            Some(1000 + tether_manifest::MAX_JWT_TTL_SECS + LEEWAY)
        );
    }
}
