//! Tether's control-plane state.
//!
//! SQLite is the embedded default. The SQL is kept to the portable subset
//! (no SQLite-only functions, explicit keys, integers for time) and every
//! access goes through [`Store`], so a PostgreSQL backend is another
//! implementation of the same methods rather than a redesign. Schema changes
//! are numbered migrations applied in one transaction at open.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error(
        "database schema version {found} is newer than this binary understands ({known}); upgrade tether"
    )]
    TooNew { found: i64, known: i64 },
    #[error("{0}")]
    Conflict(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Ordered schema migrations; index + 1 is the version.
const MIGRATIONS: &[&str] = &[
    // 1: registry resources, nodes, join tokens, CA and JWT keys.
    "CREATE TABLE resources (
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        spec TEXT NOT NULL,
        revision BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (kind, name)
     );
     CREATE TABLE meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
     INSERT INTO meta (key, value) VALUES ('revision', 0);
     CREATE TABLE join_tokens (
        token_hash TEXT PRIMARY KEY,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        used_at BIGINT,
        used_by TEXT,
        bound_node TEXT
     );
     CREATE TABLE nodes (
        name TEXT PRIMARY KEY,
        spiffe_id TEXT NOT NULL,
        attested_at BIGINT NOT NULL,
        svid_serial TEXT NOT NULL,
        svid_expires_at BIGINT NOT NULL,
        last_seen BIGINT NOT NULL
     );
     CREATE TABLE x509_cas (
        id INTEGER PRIMARY KEY,
        cert_der BLOB NOT NULL,
        key_pkcs8 BLOB NOT NULL,
        chain_der TEXT NOT NULL,
        anchors_der TEXT NOT NULL,
        state TEXT NOT NULL,
        not_after BIGINT NOT NULL,
        created_at BIGINT NOT NULL
     );
     CREATE TABLE jwt_keys (
        kid TEXT PRIMARY KEY,
        key_pkcs8 BLOB NOT NULL,
        state TEXT NOT NULL,
        not_after BIGINT NOT NULL,
        created_at BIGINT NOT NULL
     );",
    // 2: the addresses each node's SVID vouches for (comma-separated), so
    // two nodes can never both be vouched for at one address.
    "ALTER TABLE nodes ADD COLUMN addresses TEXT NOT NULL DEFAULT ''",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceRow {
    pub kind: String,
    pub name: String,
    /// Canonical JSON of the validated spec.
    pub spec: String,
    pub revision: i64,
}

/// One change in an apply.
#[derive(Debug, Clone)]
pub enum Change {
    Upsert {
        kind: String,
        name: String,
        spec: String,
    },
    Delete {
        kind: String,
        name: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeOutcome {
    Created,
    Configured,
    Unchanged,
    Deleted,
    NotFound,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    pub name: String,
    pub spiffe_id: String,
    pub attested_at: i64,
    pub svid_serial: String,
    pub svid_expires_at: i64,
    pub last_seen: i64,
    /// Addresses in its current SVID (IP SANs), comma-separated.
    pub addresses: String,
}

/// Lifecycle of a signing key (X.509 CA or JWT key).
/// prepared: published in the bundle, not yet signing; active: signing;
/// retired: no longer signing, kept in the bundle until it expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Prepared,
    Active,
    Retired,
}

impl KeyState {
    fn as_str(self) -> &'static str {
        match self {
            KeyState::Prepared => "prepared",
            KeyState::Active => "active",
            KeyState::Retired => "retired",
        }
    }
    fn parse(s: &str) -> KeyState {
        match s {
            "prepared" => KeyState::Prepared,
            "active" => KeyState::Active,
            _ => KeyState::Retired,
        }
    }
}

#[derive(Clone)]
pub struct CaRow {
    pub id: i64,
    pub cert_der: Vec<u8>,
    pub key_pkcs8: Vec<u8>,
    pub chain_der: Vec<Vec<u8>>,
    pub anchors_der: Vec<Vec<u8>>,
    pub state: KeyState,
    pub not_after: i64,
    pub created_at: i64,
}

#[derive(Clone)]
pub struct JwtKeyRow {
    pub kid: String,
    pub key_pkcs8: Vec<u8>,
    pub state: KeyState,
    pub not_after: i64,
    pub created_at: i64,
}

pub struct Store {
    conn: Mutex<Connection>,
}

fn hexes(v: &[Vec<u8>]) -> String {
    v.iter()
        .map(|c| c.iter().map(|b| format!("{b:02x}")).collect::<String>())
        .collect::<Vec<_>>()
        .join(",")
}

fn unhexes(s: &str) -> Vec<Vec<u8>> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            (0..p.len())
                .step_by(2)
                .map(|i| p.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
                .collect::<Option<Vec<u8>>>()
        })
        .collect()
}

impl Store {
    /// Opens (creating if needed) the database file with owner-only
    /// permissions, since it holds CA keys.
    pub fn open(path: &Path) -> Result<Store> {
        if !path.exists() {
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(path);
        }
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Self::init(conn)
    }

    pub fn open_in_memory() -> Result<Store> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Store> {
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY)",
        )?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current: i64 = tx.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )?;
        let known = MIGRATIONS.len() as i64;
        if current > known {
            return Err(StoreError::TooNew {
                found: current,
                known,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            tx.execute_batch(sql)?;
            tx.execute(
                "INSERT INTO schema_migrations (version) VALUES (?1)",
                params![i as i64 + 1],
            )?;
        }
        tx.commit()?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written
        // (transactions roll back), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn schema_version(&self) -> Result<i64> {
        Ok(self
            .conn()
            .query_row("SELECT MAX(version) FROM schema_migrations", [], |r| {
                r.get(0)
            })?)
    }

    /// The registry revision: bumped by every apply that changes something.
    pub fn revision(&self) -> Result<i64> {
        Ok(self
            .conn()
            .query_row("SELECT value FROM meta WHERE key = 'revision'", [], |r| {
                r.get(0)
            })?)
    }

    /// Applies all changes in one transaction: either every change lands or
    /// none does.
    pub fn apply(&self, changes: &[Change], now: i64) -> Result<Vec<ChangeOutcome>> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let rev: i64 = tx.query_row("SELECT value FROM meta WHERE key = 'revision'", [], |r| {
            r.get(0)
        })?;
        let next = rev + 1;
        let mut outcomes = Vec::with_capacity(changes.len());
        for c in changes {
            let outcome = match c {
                Change::Upsert { kind, name, spec } => {
                    let old: Option<String> = tx
                        .query_row(
                            "SELECT spec FROM resources WHERE kind = ?1 AND name = ?2",
                            params![kind, name],
                            |r| r.get(0),
                        )
                        .optional()?;
                    match old {
                        Some(o) if &o == spec => ChangeOutcome::Unchanged,
                        Some(_) => {
                            tx.execute(
                                "UPDATE resources SET spec = ?3, revision = ?4, updated_at = ?5 WHERE kind = ?1 AND name = ?2",
                                params![kind, name, spec, next, now],
                            )?;
                            ChangeOutcome::Configured
                        }
                        None => {
                            tx.execute(
                                "INSERT INTO resources (kind, name, spec, revision, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                                params![kind, name, spec, next, now],
                            )?;
                            ChangeOutcome::Created
                        }
                    }
                }
                Change::Delete { kind, name } => {
                    let n = tx.execute(
                        "DELETE FROM resources WHERE kind = ?1 AND name = ?2",
                        params![kind, name],
                    )?;
                    if n > 0 {
                        ChangeOutcome::Deleted
                    } else {
                        ChangeOutcome::NotFound
                    }
                }
            };
            outcomes.push(outcome);
        }
        if outcomes
            .iter()
            .any(|o| !matches!(o, ChangeOutcome::Unchanged | ChangeOutcome::NotFound))
        {
            tx.execute(
                "UPDATE meta SET value = ?1 WHERE key = 'revision'",
                params![next],
            )?;
        }
        tx.commit()?;
        Ok(outcomes)
    }

    pub fn list(&self, kind: &str) -> Result<Vec<ResourceRow>> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT kind, name, spec, revision FROM resources WHERE kind = ?1 ORDER BY name",
        )?;
        let rows = st
            .query_map(params![kind], |r| {
                Ok(ResourceRow {
                    kind: r.get(0)?,
                    name: r.get(1)?,
                    spec: r.get(2)?,
                    revision: r.get(3)?,
                })
            })?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    pub fn get(&self, kind: &str, name: &str) -> Result<Option<ResourceRow>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT kind, name, spec, revision FROM resources WHERE kind = ?1 AND name = ?2",
                params![kind, name],
                |r| {
                    Ok(ResourceRow {
                        kind: r.get(0)?,
                        name: r.get(1)?,
                        spec: r.get(2)?,
                        revision: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    // ---- join tokens -------------------------------------------------------

    /// Stores only the token's hash, so a database leak does not leak
    /// usable tokens.
    pub fn create_join_token(
        &self,
        token_hash: &str,
        now: i64,
        expires_at: i64,
        bound_node: Option<&str>,
    ) -> Result<()> {
        self.conn().execute(
            "INSERT INTO join_tokens (token_hash, created_at, expires_at, bound_node) VALUES (?1, ?2, ?3, ?4)",
            params![token_hash, now, expires_at, bound_node],
        )?;
        Ok(())
    }

    /// Reads a counter from `meta` (0 when absent).
    pub fn counter(&self, key: &str) -> Result<i64> {
        Ok(self
            .conn()
            .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                r.get(0)
            })
            .optional()?
            .unwrap_or(0))
    }

    /// Increments a counter in `meta` and returns the new value.
    pub fn bump_counter(&self, key: &str) -> Result<i64> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES (?1, 1) ON CONFLICT (key) DO UPDATE SET value = meta.value + 1",
            params![key],
        )?;
        let v = tx.query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
            r.get(0)
        })?;
        tx.commit()?;
        Ok(v)
    }

    pub fn delete_node(&self, name: &str) -> Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM nodes WHERE name = ?1", params![name])?
            > 0)
    }

    /// Marks a token used, atomically: of two concurrent attempts exactly one
    /// succeeds. Returns why it failed otherwise.
    pub fn consume_join_token(
        &self,
        token_hash: &str,
        node: &str,
        now: i64,
    ) -> Result<std::result::Result<(), &'static str>> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row: Option<(i64, Option<i64>, Option<String>)> = tx
            .query_row(
                "SELECT expires_at, used_at, bound_node FROM join_tokens WHERE token_hash = ?1",
                params![token_hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let existing: Option<String> = tx
            .query_row(
                "SELECT name FROM nodes WHERE name = ?1",
                params![node],
                |r| r.get(0),
            )
            .optional()?;
        let verdict = match row {
            None => Err("unknown join token"),
            Some((_, Some(_), _)) => Err("join token already used"),
            Some((exp, None, _)) if exp <= now => Err("join token expired"),
            Some((_, None, Some(b))) if b != node => {
                Err("join token is bound to another node name")
            }
            // An unbound token may not take over a name an attested node holds.
            Some((_, None, None)) if existing.is_some() => {
                Err("a node with this name is already attested")
            }
            Some(_) => {
                tx.execute(
                    "UPDATE join_tokens SET used_at = ?2, used_by = ?3 WHERE token_hash = ?1 AND used_at IS NULL",
                    params![token_hash, now, node],
                )?;
                Ok(())
            }
        };
        tx.commit()?;
        Ok(verdict)
    }

    // ---- nodes -------------------------------------------------------------

    pub fn upsert_node(&self, n: &NodeRow) -> Result<()> {
        self.conn().execute(
            "INSERT INTO nodes (name, spiffe_id, attested_at, svid_serial, svid_expires_at, last_seen, addresses)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (name) DO UPDATE SET spiffe_id = excluded.spiffe_id, attested_at = excluded.attested_at,
               svid_serial = excluded.svid_serial, svid_expires_at = excluded.svid_expires_at, last_seen = excluded.last_seen,
               addresses = excluded.addresses",
            params![n.name, n.spiffe_id, n.attested_at, n.svid_serial, n.svid_expires_at, n.last_seen, n.addresses],
        )?;
        Ok(())
    }

    pub fn node(&self, name: &str) -> Result<Option<NodeRow>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT name, spiffe_id, attested_at, svid_serial, svid_expires_at, last_seen, addresses FROM nodes WHERE name = ?1",
                params![name],
                node_row,
            )
            .optional()?)
    }

    pub fn nodes(&self) -> Result<Vec<NodeRow>> {
        let conn = self.conn();
        let mut st =
            conn.prepare("SELECT name, spiffe_id, attested_at, svid_serial, svid_expires_at, last_seen, addresses FROM nodes ORDER BY name")?;
        let rows = st
            .query_map([], node_row)?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    // ---- signing keys ------------------------------------------------------

    pub fn insert_ca(&self, c: &CaRow) -> Result<i64> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO x509_cas (cert_der, key_pkcs8, chain_der, anchors_der, state, not_after, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![c.cert_der, c.key_pkcs8, hexes(&c.chain_der), hexes(&c.anchors_der), c.state.as_str(), c.not_after, c.created_at],
        )?;
        Ok(conn.last_insert_rowid())
    }

    pub fn cas(&self) -> Result<Vec<CaRow>> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT id, cert_der, key_pkcs8, chain_der, anchors_der, state, not_after, created_at FROM x509_cas ORDER BY id",
        )?;
        let rows = st
            .query_map([], |r| {
                Ok(CaRow {
                    id: r.get(0)?,
                    cert_der: r.get(1)?,
                    key_pkcs8: r.get(2)?,
                    chain_der: unhexes(&r.get::<_, String>(3)?),
                    anchors_der: unhexes(&r.get::<_, String>(4)?),
                    state: KeyState::parse(&r.get::<_, String>(5)?),
                    not_after: r.get(6)?,
                    created_at: r.get(7)?,
                })
            })?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Makes `id` the only active CA; the previous active one is retired.
    pub fn activate_ca(&self, id: i64) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "UPDATE x509_cas SET state = 'retired' WHERE state = 'active'",
            [],
        )?;
        let n = tx.execute(
            "UPDATE x509_cas SET state = 'active' WHERE id = ?1",
            params![id],
        )?;
        if n != 1 {
            return Err(StoreError::Conflict(format!("CA {id} does not exist")));
        }
        tx.commit()?;
        Ok(())
    }

    /// Deletes keys that expired before `now`: they can no longer verify
    /// anything.
    pub fn prune_expired_keys(&self, now: i64) -> Result<usize> {
        let conn = self.conn();
        let a = conn.execute(
            "DELETE FROM x509_cas WHERE not_after <= ?1 AND state != 'active'",
            params![now],
        )?;
        let b = conn.execute(
            "DELETE FROM jwt_keys WHERE not_after <= ?1 AND state != 'active'",
            params![now],
        )?;
        Ok(a + b)
    }

    pub fn insert_jwt_key(&self, k: &JwtKeyRow) -> Result<()> {
        self.conn().execute(
            "INSERT INTO jwt_keys (kid, key_pkcs8, state, not_after, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![k.kid, k.key_pkcs8, k.state.as_str(), k.not_after, k.created_at],
        )?;
        Ok(())
    }

    pub fn jwt_keys(&self) -> Result<Vec<JwtKeyRow>> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT kid, key_pkcs8, state, not_after, created_at FROM jwt_keys ORDER BY created_at, kid")?;
        let rows = st
            .query_map([], |r| {
                Ok(JwtKeyRow {
                    kid: r.get(0)?,
                    key_pkcs8: r.get(1)?,
                    state: KeyState::parse(&r.get::<_, String>(2)?),
                    not_after: r.get(3)?,
                    created_at: r.get(4)?,
                })
            })?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Makes `kid` the signing key and retires the active one. A retired
    /// key never signs again, so once every token it signed has expired it
    /// is useless to relying parties: `retire_until`, when known, shortens
    /// its life (and so its stay in the bundle and the OIDC JWKS) to then.
    pub fn activate_jwt_key(&self, kid: &str, retire_until: Option<i64>) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "UPDATE jwt_keys SET state = 'retired', not_after = MIN(not_after, COALESCE(?1, not_after)) WHERE state = 'active'",
            params![retire_until],
        )?;
        let n = tx.execute(
            "UPDATE jwt_keys SET state = 'active' WHERE kid = ?1",
            params![kid],
        )?;
        if n != 1 {
            return Err(StoreError::Conflict(format!(
                "JWT key {kid} does not exist"
            )));
        }
        tx.commit()?;
        Ok(())
    }
}

fn node_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<NodeRow> {
    Ok(NodeRow {
        name: r.get(0)?,
        spiffe_id: r.get(1)?,
        attested_at: r.get(2)?,
        svid_serial: r.get(3)?,
        svid_expires_at: r.get(4)?,
        last_seen: r.get(5)?,
        addresses: r.get(6)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(name: &str, spec: &str) -> Change {
        Change::Upsert {
            kind: "WorkloadIdentity".into(),
            name: name.into(),
            spec: spec.into(),
        }
    }

    #[test]
    fn apply_is_idempotent_and_bumps_revision_only_on_change() {
        let s = Store::open_in_memory().unwrap();
        assert_eq!(s.revision().unwrap(), 0);
        let o = s.apply(&[up("a", "{}"), up("b", "{}")], 1).unwrap();
        assert_eq!(o, vec![ChangeOutcome::Created, ChangeOutcome::Created]);
        assert_eq!(s.revision().unwrap(), 1);
        let o = s.apply(&[up("a", "{}"), up("b", "{}")], 2).unwrap();
        assert_eq!(o, vec![ChangeOutcome::Unchanged, ChangeOutcome::Unchanged]);
        assert_eq!(s.revision().unwrap(), 1);
        let o = s.apply(&[up("a", "{\"x\":1}")], 3).unwrap();
        assert_eq!(o, vec![ChangeOutcome::Configured]);
        assert_eq!(s.revision().unwrap(), 2);
        assert_eq!(s.list("WorkloadIdentity").unwrap().len(), 2);
        let o = s
            .apply(
                &[Change::Delete {
                    kind: "WorkloadIdentity".into(),
                    name: "b".into(),
                }],
                4,
            )
            .unwrap();
        assert_eq!(o, vec![ChangeOutcome::Deleted]);
        assert!(s.get("WorkloadIdentity", "b").unwrap().is_none());
    }

    #[test]
    fn join_tokens_are_single_use_and_expire() {
        let s = Store::open_in_memory().unwrap();
        s.create_join_token("h1", 0, 100, None).unwrap();
        s.create_join_token("h2", 0, 100, None).unwrap();
        s.create_join_token("h3", 0, 100, Some("n3")).unwrap();
        assert_eq!(
            s.consume_join_token("h3", "n4", 1).unwrap(),
            Err("join token is bound to another node name")
        );
        assert_eq!(s.consume_join_token("h3", "n3", 1).unwrap(), Ok(()));
        assert_eq!(s.bump_counter("c").unwrap(), 1);
        assert_eq!(s.bump_counter("c").unwrap(), 2);
        assert_eq!(s.counter("c").unwrap(), 2);
        assert_eq!(s.consume_join_token("h1", "n1", 10).unwrap(), Ok(()));
        assert_eq!(
            s.consume_join_token("h1", "n2", 11).unwrap(),
            Err("join token already used")
        );
        assert_eq!(
            s.consume_join_token("h2", "n2", 100).unwrap(),
            Err("join token expired")
        );
        assert_eq!(
            s.consume_join_token("nope", "n2", 1).unwrap(),
            Err("unknown join token")
        );
    }

    #[test]
    fn migrations_run_once_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.db");
        {
            let s = Store::open(&p).unwrap();
            s.apply(&[up("a", "{}")], 1).unwrap();
        }
        let s = Store::open(&p).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
        assert_eq!(s.list("WorkloadIdentity").unwrap().len(), 1);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o077,
            0,
            "db must be owner-only"
        );
    }

    #[test]
    fn ca_rotation_states() {
        let s = Store::open_in_memory().unwrap();
        let row = |state| CaRow {
            id: 0,
            cert_der: vec![1, 2],
            key_pkcs8: vec![3],
            chain_der: vec![vec![0xab, 0xcd], vec![0x01]],
            anchors_der: vec![vec![9]],
            state,
            not_after: 100,
            created_at: 0,
        };
        let a = s.insert_ca(&row(KeyState::Active)).unwrap();
        let b = s.insert_ca(&row(KeyState::Prepared)).unwrap();
        s.activate_ca(b).unwrap();
        let cas = s.cas().unwrap();
        assert_eq!(
            cas.iter().find(|c| c.id == a).unwrap().state,
            KeyState::Retired
        );
        assert_eq!(
            cas.iter().find(|c| c.id == b).unwrap().state,
            KeyState::Active
        );
        assert_eq!(cas[0].chain_der, vec![vec![0xab, 0xcd], vec![0x01]]);
        assert_eq!(s.prune_expired_keys(100).unwrap(), 1);
    }
}
