//! Tether's control-plane state.
//!
//! SQLite is the embedded default; PostgreSQL serves several servers that
//! share one trust domain. Every method is written once against the
//! [`sql::Tx`] seam, in the portable subset of SQL (explicit keys, integers
//! for time, `RETURNING`), and [`sql::Dialect`] names the few differences
//! (column types, row locks). Schema changes are numbered migrations applied
//! in one transaction at open; on PostgreSQL an advisory lock makes servers
//! that start together apply them once.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, TransactionBehavior};

mod pg;
mod pg_tls;
pub mod sql;

use sql::{Dialect, P, Row, SqliteTx, Tx};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("database: {0}")]
    Postgres(String),
    /// The database cannot be reached or did not answer in time; the
    /// caller may retry.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database configuration: {0}")]
    Config(String),
    #[error("database returned something unexpected: {0}")]
    Decode(String),
    #[error(
        "database schema version {found} is newer than this binary understands ({known}); upgrade tether"
    )]
    TooNew { found: i64, known: i64 },
    #[error("{0}")]
    Conflict(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Ordered schema migrations; index + 1 is the version. `{blob}` and `{id}`
/// are the dialect's byte-string and generated-key column types.
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
        id {id},
        cert_der {blob} NOT NULL,
        key_pkcs8 {blob} NOT NULL,
        chain_der TEXT NOT NULL,
        anchors_der TEXT NOT NULL,
        state TEXT NOT NULL,
        not_after BIGINT NOT NULL,
        created_at BIGINT NOT NULL
     );
     CREATE TABLE jwt_keys (
        kid TEXT PRIMARY KEY,
        key_pkcs8 {blob} NOT NULL,
        state TEXT NOT NULL,
        not_after BIGINT NOT NULL,
        created_at BIGINT NOT NULL
     );",
    // 2: the addresses each node's SVID vouches for (comma-separated), so
    // two nodes can never both be vouched for at one address.
    "ALTER TABLE nodes ADD COLUMN addresses TEXT NOT NULL DEFAULT ''",
    // 3: the server each node last talked to (several share a database),
    // and the node's last time without any server.
    "ALTER TABLE nodes ADD COLUMN server TEXT NOT NULL DEFAULT '';
     ALTER TABLE nodes ADD COLUMN offline_from BIGINT NOT NULL DEFAULT 0;
     ALTER TABLE nodes ADD COLUMN offline_until BIGINT NOT NULL DEFAULT 0;
     ALTER TABLE nodes ADD COLUMN attested_by TEXT NOT NULL DEFAULT '';
     CREATE TABLE x509pop_cutoffs (node TEXT PRIMARY KEY, revoked_at BIGINT NOT NULL);",
];

/// An arbitrary constant: the advisory lock migrations run under.
const MIGRATION_LOCK: i64 = 0x7465_7468_6572;

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
    /// The server it last attested, renewed or watched through.
    pub server: String,
    /// Its last time without any server (Unix seconds; 0, 0 if none known).
    pub offline: (i64, i64),
    /// How it attested: `join-token`, or `x509pop:<SHA-256 of its
    /// certificate>` (which deleting the node revokes).
    pub attested_by: String,
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

enum Backend {
    Sqlite(Mutex<Connection>),
    Postgres(pg::Pg),
}

pub struct Store {
    backend: Backend,
    /// [`Store::exclusive`] within this process, one per [`Lock`]: all of
    /// it on SQLite (one server owns the database); on PostgreSQL taken
    /// before the advisory lock, so at most one pooled connection per lock
    /// waits in the database and the others stay free for the holder.
    local_locks: [Mutex<()>; 2],
}

/// What servers sharing a database tell each other (PostgreSQL NOTIFY).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    /// The registry changed (an apply or delete committed).
    Registry,
    /// Signing keys or the bundle changed (a rotation step).
    Keys,
    /// The feed (re)connected: anything may have been missed; read again.
    Resync,
}

impl Topic {
    fn channel(self) -> &'static str {
        match self {
            Topic::Registry => "tether_registry",
            Topic::Keys => "tether_keys",
            Topic::Resync => "",
        }
    }
}

/// Locks of [`Store::exclusive`].
#[derive(Debug, Clone, Copy)]
pub enum Lock {
    /// Creating, rotating and pruning signing keys.
    Keys = 1,
    /// Signing node SVIDs (which addresses each vouches for).
    Nodes = 2,
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

/// Whether `url` names a PostgreSQL database (rather than a SQLite file).
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
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
        Self::init(Backend::Sqlite(Mutex::new(conn)))
    }

    pub fn open_in_memory() -> Result<Store> {
        Self::init(Backend::Sqlite(Mutex::new(Connection::open_in_memory()?)))
    }

    /// Connects to PostgreSQL at `url` (`postgres://user:pass@host:port/db`,
    /// libpq's keywords, `sslmode` among them). `tls` verifies the server
    /// when the URL's sslmode asks for TLS.
    pub fn open_postgres(url: &str, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Store> {
        Self::init(Backend::Postgres(pg::Pg::connect(url, tls)?))
    }

    fn init(backend: Backend) -> Result<Store> {
        let store = Store {
            backend,
            local_locks: [Mutex::new(()), Mutex::new(())],
        };
        store.write(|tx| {
            if tx.dialect() == Dialect::Postgres {
                tx.exec("SELECT pg_advisory_xact_lock($1)", &[P::I(MIGRATION_LOCK)])
                    .map(|_| ())?;
            }
            tx.batch("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY)")?;
            let current = tx
                .one(
                    "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                    &[],
                )?
                .int(0)?;
            let known = MIGRATIONS.len() as i64;
            if current > known {
                return Err(StoreError::TooNew {
                    found: current,
                    known,
                });
            }
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
                tx.batch(&tx.dialect().ddl(sql))?;
                tx.exec(
                    "INSERT INTO schema_migrations (version) VALUES ($1)",
                    &[P::I(i as i64 + 1)],
                )?;
            }
            Ok(())
        })?;
        Ok(store)
    }

    /// Which database this is.
    pub fn dialect(&self) -> Dialect {
        match self.backend {
            Backend::Sqlite(_) => Dialect::Sqlite,
            Backend::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Calls `on` for every change published by any server on this
    /// database, and with [`Topic::Resync`] whenever the feed (re)connects.
    /// `on` runs on the store's own thread: it must only hand the topic on
    /// (send on a channel), never use the store. On SQLite, which one
    /// server owns, nothing is ever published by others and `on` is never
    /// called.
    pub fn subscribe(&self, on: impl Fn(Topic) + Send + Sync + 'static) {
        if let Backend::Postgres(pg) = &self.backend {
            pg.listen(
                &["tether_registry", "tether_keys"],
                Box::new(move |ch| {
                    on(match ch {
                        Some("tether_registry") => Topic::Registry,
                        Some("tether_keys") => Topic::Keys,
                        _ => Topic::Resync,
                    })
                }),
            );
        }
    }

    /// Tells every server on this database (itself included) about a
    /// change; nothing on SQLite.
    pub fn publish(&self, topic: Topic) -> Result<()> {
        if topic == Topic::Resync || self.dialect() == Dialect::Sqlite {
            return Ok(());
        }
        self.write(|tx| notify(tx, topic, ""))
    }

    /// Runs `f` while no other server on this database runs it under the
    /// same lock: one server decides (say, which key to prepare or
    /// activate) and the others see the outcome.
    pub fn exclusive<R>(&self, lock: Lock, f: impl FnOnce() -> R) -> Result<R> {
        let local = &self.local_locks[lock as usize - 1];
        let _g = local.lock().unwrap_or_else(|p| p.into_inner());
        match &self.backend {
            Backend::Sqlite(_) => Ok(f()),
            Backend::Postgres(pg) => pg.locked(MIGRATION_LOCK + lock as i64, f),
        }
    }

    /// Runs `f` in a write transaction: all of it lands or none does.
    fn write<R>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<R>) -> Result<R> {
        self.run(true, f)
    }

    /// Runs `f` for reading: one consistent view on SQLite; statement by
    /// statement on PostgreSQL, which is all the single-statement reads
    /// here need (and saves the transaction's round trips).
    fn read<R>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<R>) -> Result<R> {
        self.run(false, f)
    }

    fn run<R>(&self, write: bool, f: impl FnOnce(&mut dyn Tx) -> Result<R>) -> Result<R> {
        match &self.backend {
            Backend::Sqlite(conn) => {
                // A panic while holding the lock cannot leave SQLite
                // half-written (transactions roll back), so a poisoned lock
                // is still usable.
                let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
                let behavior = if write {
                    TransactionBehavior::Immediate
                } else {
                    TransactionBehavior::Deferred
                };
                let mut t = SqliteTx(conn.transaction_with_behavior(behavior)?);
                let r = f(&mut t)?;
                t.0.commit()?;
                Ok(r)
            }
            Backend::Postgres(pg) if write => pg.tx(f),
            Backend::Postgres(pg) => pg.read(f),
        }
    }

    pub fn schema_version(&self) -> Result<i64> {
        self.read(|tx| {
            tx.one("SELECT MAX(version) FROM schema_migrations", &[])?
                .int(0)
        })
    }

    /// The registry revision: bumped by every apply that changes something.
    pub fn revision(&self) -> Result<i64> {
        self.read(|tx| {
            tx.one("SELECT value FROM meta WHERE key = 'revision'", &[])?
                .int(0)
        })
    }

    /// Applies all changes in one transaction: either every change lands or
    /// none does.
    pub fn apply(&self, changes: &[Change], now: i64) -> Result<Vec<ChangeOutcome>> {
        self.write(|tx| {
            // Locked: concurrent applies (other servers) queue here, so
            // revisions are handed out one at a time.
            let rev = tx
                .one(
                    &format!(
                        "SELECT value FROM meta WHERE key = 'revision'{}",
                        tx.dialect().for_update()
                    ),
                    &[],
                )?
                .int(0)?;
            let next = rev + 1;
            let mut outcomes = Vec::with_capacity(changes.len());
            for c in changes {
                let outcome = match c {
                    Change::Upsert { kind, name, spec } => {
                        let old = tx.row(
                            "SELECT spec FROM resources WHERE kind = $1 AND name = $2",
                            &[P::T(kind), P::T(name)],
                        )?;
                        match old {
                            Some(o) if &o.text(0)? == spec => ChangeOutcome::Unchanged,
                            Some(_) => {
                                tx.exec(
                                    "UPDATE resources SET spec = $3, revision = $4, updated_at = $5 WHERE kind = $1 AND name = $2",
                                    &[P::T(kind), P::T(name), P::T(spec), P::I(next), P::I(now)],
                                )?;
                                ChangeOutcome::Configured
                            }
                            None => {
                                tx.exec(
                                    "INSERT INTO resources (kind, name, spec, revision, updated_at) VALUES ($1, $2, $3, $4, $5)",
                                    &[P::T(kind), P::T(name), P::T(spec), P::I(next), P::I(now)],
                                )?;
                                ChangeOutcome::Created
                            }
                        }
                    }
                    Change::Delete { kind, name } => {
                        let n = tx.exec(
                            "DELETE FROM resources WHERE kind = $1 AND name = $2",
                            &[P::T(kind), P::T(name)],
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
                tx.exec(
                    "UPDATE meta SET value = $1 WHERE key = 'revision'",
                    &[P::I(next)],
                )?;
                // Delivered at commit, to every server's feed.
                notify(tx, Topic::Registry, &next.to_string())?;
            }
            Ok(outcomes)
        })
    }

    pub fn list(&self, kind: &str) -> Result<Vec<ResourceRow>> {
        self.read(|tx| {
            tx.rows(
                "SELECT kind, name, spec, revision FROM resources WHERE kind = $1 ORDER BY name",
                &[P::T(kind)],
            )?
            .iter()
            .map(resource_row)
            .collect()
        })
    }

    pub fn get(&self, kind: &str, name: &str) -> Result<Option<ResourceRow>> {
        self.read(|tx| {
            tx.row(
                "SELECT kind, name, spec, revision FROM resources WHERE kind = $1 AND name = $2",
                &[P::T(kind), P::T(name)],
            )?
            .as_ref()
            .map(resource_row)
            .transpose()
        })
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
        self.write(|tx| {
            tx.exec(
                "INSERT INTO join_tokens (token_hash, created_at, expires_at, bound_node) VALUES ($1, $2, $3, $4)",
                &[P::T(token_hash), P::I(now), P::I(expires_at), P::opt_t(bound_node)],
            )
            .map(|_| ())
        })
    }

    /// Reads a counter from `meta` (0 when absent).
    pub fn counter(&self, key: &str) -> Result<i64> {
        self.read(|tx| {
            tx.row("SELECT value FROM meta WHERE key = $1", &[P::T(key)])?
                .map_or(Ok(0), |r| r.int(0))
        })
    }

    /// Increments a counter in `meta` and returns the new value.
    pub fn bump_counter(&self, key: &str) -> Result<i64> {
        self.write(|tx| {
            tx.one(
                "INSERT INTO meta (key, value) VALUES ($1, 1) ON CONFLICT (key) DO UPDATE SET value = meta.value + 1 RETURNING value",
                &[P::T(key)],
            )?
            .int(0)
        })
    }

    /// Removes a node. One that attested with a certificate cannot attest
    /// again with any certificate issued before now (its host may still hold
    /// it, or an older one, or a re-encoding of it): the cutoff is recorded
    /// per node name.
    pub fn delete_node(&self, name: &str, now: i64) -> Result<bool> {
        self.write(|tx| {
            let by = tx
                .row("SELECT attested_by FROM nodes WHERE name = $1", &[P::T(name)])?
                .map(|r| r.text(0))
                .transpose()?;
            if by.as_deref().is_some_and(|b| b.starts_with("x509pop:")) {
                tx.exec(
                    "INSERT INTO x509pop_cutoffs (node, revoked_at) VALUES ($1, $2) ON CONFLICT (node) DO UPDATE SET revoked_at = excluded.revoked_at",
                    &[P::T(name), P::I(now)],
                )?;
            }
            Ok(tx.exec("DELETE FROM nodes WHERE name = $1", &[P::T(name)])? > 0)
        })
    }

    /// When node `name` was last deleted after attesting by certificate:
    /// certificates issued (notBefore) up to then no longer attest it.
    pub fn x509pop_cutoff(&self, name: &str) -> Result<Option<i64>> {
        self.read(|tx| {
            tx.row(
                "SELECT revoked_at FROM x509pop_cutoffs WHERE node = $1",
                &[P::T(name)],
            )?
            .map(|r| r.int(0))
            .transpose()
        })
    }

    /// Marks a token used, atomically: of two concurrent attempts (on any
    /// server) exactly one succeeds. Returns why it failed otherwise.
    pub fn consume_join_token(
        &self,
        token_hash: &str,
        node: &str,
        now: i64,
    ) -> Result<std::result::Result<(), &'static str>> {
        self.write(|tx| {
            let row = tx.row(
                &format!(
                    "SELECT expires_at, used_at, bound_node FROM join_tokens WHERE token_hash = $1{}",
                    tx.dialect().for_update()
                ),
                &[P::T(token_hash)],
            )?;
            let row = match row {
                Some(r) => Some((r.int(0)?, r.opt_int(1)?, r.opt_text(2)?)),
                None => None,
            };
            let existing = tx
                .row("SELECT name FROM nodes WHERE name = $1", &[P::T(node)])?
                .is_some();
            Ok(match row {
                None => Err("unknown join token"),
                Some((_, Some(_), _)) => Err("join token already used"),
                Some((exp, None, _)) if exp <= now => Err("join token expired"),
                Some((_, None, Some(b))) if b != node => {
                    Err("join token is bound to another node name")
                }
                // An unbound token may not take over a name an attested node holds.
                Some((_, None, None)) if existing => {
                    Err("a node with this name is already attested")
                }
                Some(_) => {
                    let n = tx.exec(
                        "UPDATE join_tokens SET used_at = $2, used_by = $3 WHERE token_hash = $1 AND used_at IS NULL",
                        &[P::T(token_hash), P::I(now), P::T(node)],
                    )?;
                    if n == 1 {
                        Ok(())
                    } else {
                        Err("join token already used")
                    }
                }
            })
        })
    }

    // ---- nodes -------------------------------------------------------------

    pub fn upsert_node(&self, n: &NodeRow) -> Result<()> {
        self.write(|tx| {
            tx.exec(
                "INSERT INTO nodes (name, spiffe_id, attested_at, svid_serial, svid_expires_at, last_seen, addresses, server, attested_by)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                 ON CONFLICT (name) DO UPDATE SET spiffe_id = excluded.spiffe_id, attested_at = excluded.attested_at,
                   svid_serial = excluded.svid_serial, svid_expires_at = excluded.svid_expires_at, last_seen = excluded.last_seen,
                   addresses = excluded.addresses, server = excluded.server, attested_by = excluded.attested_by",
                &[
                    P::T(&n.name),
                    P::T(&n.spiffe_id),
                    P::I(n.attested_at),
                    P::T(&n.svid_serial),
                    P::I(n.svid_expires_at),
                    P::I(n.last_seen),
                    P::T(&n.addresses),
                    P::T(&n.server),
                    P::T(&n.attested_by),
                ],
            )
            .map(|_| ())
        })
    }

    /// Notes that `name` is talking to `server` now, after being without
    /// any server since `offline_from` if that is given.
    pub fn node_seen(
        &self,
        name: &str,
        server: &str,
        now: i64,
        offline_from: Option<i64>,
    ) -> Result<()> {
        self.write(|tx| {
            tx.exec(
                "UPDATE nodes SET server = $2, last_seen = $3 WHERE name = $1",
                &[P::T(name), P::T(server), P::I(now)],
            )?;
            if let Some(from) = offline_from {
                tx.exec(
                    "UPDATE nodes SET offline_from = $2, offline_until = $3 WHERE name = $1",
                    &[P::T(name), P::I(from), P::I(now)],
                )?;
            }
            Ok(())
        })
    }

    pub fn node(&self, name: &str) -> Result<Option<NodeRow>> {
        self.read(|tx| {
            tx.row(
                "SELECT name, spiffe_id, attested_at, svid_serial, svid_expires_at, last_seen, addresses, server, offline_from, offline_until, attested_by FROM nodes WHERE name = $1",
                &[P::T(name)],
            )?
            .as_ref()
            .map(node_row)
            .transpose()
        })
    }

    pub fn nodes(&self) -> Result<Vec<NodeRow>> {
        self.read(|tx| {
            tx.rows(
                "SELECT name, spiffe_id, attested_at, svid_serial, svid_expires_at, last_seen, addresses, server, offline_from, offline_until, attested_by FROM nodes ORDER BY name",
                &[],
            )?
            .iter()
            .map(node_row)
            .collect()
        })
    }

    // ---- signing keys ------------------------------------------------------

    pub fn insert_ca(&self, c: &CaRow) -> Result<i64> {
        let (chain, anchors) = (hexes(&c.chain_der), hexes(&c.anchors_der));
        self.write(|tx| {
            tx.one(
                "INSERT INTO x509_cas (cert_der, key_pkcs8, chain_der, anchors_der, state, not_after, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                &[
                    P::B(&c.cert_der),
                    P::B(&c.key_pkcs8),
                    P::T(&chain),
                    P::T(&anchors),
                    P::T(c.state.as_str()),
                    P::I(c.not_after),
                    P::I(c.created_at),
                ],
            )?
            .int(0)
        })
    }

    pub fn cas(&self) -> Result<Vec<CaRow>> {
        self.read(|tx| {
            tx.rows(
                "SELECT id, cert_der, key_pkcs8, chain_der, anchors_der, state, not_after, created_at FROM x509_cas ORDER BY id",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(CaRow {
                    id: r.int(0)?,
                    cert_der: r.blob(1)?,
                    key_pkcs8: r.blob(2)?,
                    chain_der: unhexes(&r.text(3)?),
                    anchors_der: unhexes(&r.text(4)?),
                    state: KeyState::parse(&r.text(5)?),
                    not_after: r.int(6)?,
                    created_at: r.int(7)?,
                })
            })
            .collect()
        })
    }

    /// Makes `id` the only active CA; the previous active one is retired.
    pub fn activate_ca(&self, id: i64) -> Result<()> {
        self.write(|tx| {
            tx.exec(
                "UPDATE x509_cas SET state = 'retired' WHERE state = 'active'",
                &[],
            )?;
            let n = tx.exec(
                "UPDATE x509_cas SET state = 'active' WHERE id = $1",
                &[P::I(id)],
            )?;
            if n != 1 {
                return Err(StoreError::Conflict(format!("CA {id} does not exist")));
            }
            Ok(())
        })
    }

    /// Deletes keys that expired before `now`: they can no longer verify
    /// anything.
    pub fn prune_expired_keys(&self, now: i64) -> Result<usize> {
        self.write(|tx| {
            let a = tx.exec(
                "DELETE FROM x509_cas WHERE not_after <= $1 AND state != 'active'",
                &[P::I(now)],
            )?;
            let b = tx.exec(
                "DELETE FROM jwt_keys WHERE not_after <= $1 AND state != 'active'",
                &[P::I(now)],
            )?;
            Ok((a + b) as usize)
        })
    }

    pub fn insert_jwt_key(&self, k: &JwtKeyRow) -> Result<()> {
        self.write(|tx| {
            tx.exec(
                "INSERT INTO jwt_keys (kid, key_pkcs8, state, not_after, created_at) VALUES ($1, $2, $3, $4, $5)",
                &[
                    P::T(&k.kid),
                    P::B(&k.key_pkcs8),
                    P::T(k.state.as_str()),
                    P::I(k.not_after),
                    P::I(k.created_at),
                ],
            )
            .map(|_| ())
        })
    }

    pub fn jwt_keys(&self) -> Result<Vec<JwtKeyRow>> {
        self.read(|tx| {
            tx.rows(
                "SELECT kid, key_pkcs8, state, not_after, created_at FROM jwt_keys ORDER BY created_at, kid",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(JwtKeyRow {
                    kid: r.text(0)?,
                    key_pkcs8: r.blob(1)?,
                    state: KeyState::parse(&r.text(2)?),
                    not_after: r.int(3)?,
                    created_at: r.int(4)?,
                })
            })
            .collect()
        })
    }

    /// Makes `kid` the signing key and retires the active one. A retired
    /// key never signs again, so once every token it signed has expired it
    /// is useless to relying parties: `retire_until`, when known, shortens
    /// its life (and so its stay in the bundle and the OIDC JWKS) to then.
    pub fn activate_jwt_key(&self, kid: &str, retire_until: Option<i64>) -> Result<()> {
        self.write(|tx| {
            if let Some(t) = retire_until {
                tx.exec(
                    "UPDATE jwt_keys SET not_after = $1 WHERE state = 'active' AND not_after > $1",
                    &[P::I(t)],
                )?;
            }
            tx.exec(
                "UPDATE jwt_keys SET state = 'retired' WHERE state = 'active'",
                &[],
            )?;
            let n = tx.exec(
                "UPDATE jwt_keys SET state = 'active' WHERE kid = $1",
                &[P::T(kid)],
            )?;
            if n != 1 {
                return Err(StoreError::Conflict(format!(
                    "JWT key {kid} does not exist"
                )));
            }
            Ok(())
        })
    }
}

fn notify(tx: &mut dyn Tx, topic: Topic, payload: &str) -> Result<()> {
    if tx.dialect() == Dialect::Postgres {
        // exec, not rows: the result is a void column.
        tx.exec(
            "SELECT pg_notify($1, $2)",
            &[P::T(topic.channel()), P::T(payload)],
        )?;
    }
    Ok(())
}

fn resource_row(r: &Row) -> Result<ResourceRow> {
    Ok(ResourceRow {
        kind: r.text(0)?,
        name: r.text(1)?,
        spec: r.text(2)?,
        revision: r.int(3)?,
    })
}

fn node_row(r: &Row) -> Result<NodeRow> {
    Ok(NodeRow {
        name: r.text(0)?,
        spiffe_id: r.text(1)?,
        attested_at: r.int(2)?,
        svid_serial: r.text(3)?,
        svid_expires_at: r.int(4)?,
        last_seen: r.int(5)?,
        addresses: r.text(6)?,
        server: r.text(7)?,
        offline: (r.int(8)?, r.int(9)?),
        attested_by: r.text(10)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_test_support::pg::Cluster;

    /// A fresh store on each backend: SQLite in memory and a new database
    /// on the tests' PostgreSQL.
    fn stores() -> Vec<Store> {
        let pg = Store::open_postgres(&Cluster::shared().database(), None)
            .expect("open the PostgreSQL store");
        assert_eq!(pg.dialect(), Dialect::Postgres);
        vec![Store::open_in_memory().unwrap(), pg]
    }

    fn up(name: &str, spec: &str) -> Change {
        Change::Upsert {
            kind: "WorkloadIdentity".into(),
            name: name.into(),
            spec: spec.into(),
        }
    }

    #[test]
    fn apply_is_idempotent_and_bumps_revision_only_on_change() {
        for s in stores() {
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
    }

    #[test]
    fn join_tokens_are_single_use_and_expire() {
        for s in stores() {
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
        for s in stores() {
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

    /// Two servers on one database: of many concurrent attempts to use one
    /// token, exactly one succeeds; concurrent applies each get their own
    /// revision.
    #[test]
    fn postgres_join_tokens_and_revisions_hold_across_servers() {
        let url = Cluster::shared().database();
        let a = Arc::new(Store::open_postgres(&url, None).unwrap());
        let b = Arc::new(Store::open_postgres(&url, None).unwrap());
        for round in 0..5 {
            let h = format!("h{round}");
            a.create_join_token(&h, 0, 100, None).unwrap();
            let wins: usize = std::thread::scope(|sc| {
                let hs: Vec<_> = (0..6)
                    .map(|i| {
                        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
                        let h = h.clone();
                        sc.spawn(move || {
                            s.consume_join_token(&h, &format!("n{round}-{i}"), 1)
                                .unwrap()
                                .is_ok() as usize
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).sum()
            });
            assert_eq!(wins, 1, "round {round}: one token, {wins} nodes");
        }
        let revs: Vec<i64> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..8)
                .map(|i| {
                    let s = if i % 2 == 0 { a.clone() } else { b.clone() };
                    sc.spawn(move || {
                        s.apply(&[up(&format!("w{i}"), "{}")], 1).unwrap();
                        s.get("WorkloadIdentity", &format!("w{i}"))
                            .unwrap()
                            .unwrap()
                            .revision
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut sorted = revs.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 8, "revisions were shared: {revs:?}");
        assert_eq!(a.revision().unwrap(), 8);
        assert_eq!(b.schema_version().unwrap(), MIGRATIONS.len() as i64);
    }

    /// Over TCP the store insists on TLS and verifies the server: with no
    /// sslmode it requires TLS (never falling back to plaintext), a server
    /// certificate it does not trust is refused, and `prefer` is refused.
    #[test]
    fn postgres_requires_and_verifies_tls() {
        let c = Cluster::shared();
        let url = c.database();
        let bare = url.replace("?sslmode=disable", "");
        let config = |pem: &[u8]| {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(pem) {
                roots.add(cert.unwrap()).unwrap();
            }
            Arc::new(
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::aws_lc_rs::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
            )
        };
        let s =
            Store::open_postgres(&bare, Some(config(&c.cert()))).expect("TLS with the right root");
        s.apply(&[up("tls", "{}")], 1).unwrap();
        let tls_sessions = c.sql(
            "postgres",
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE ssl AND application_name = 'tether-server'",
        );
        assert_ne!(tls_sessions, "0", "the store's sessions use TLS");
        // Another root: refused, not downgraded.
        let other = {
            let k = unrelated_self_signed();
            config(&k)
        };
        let e = Store::open_postgres(&bare, Some(other))
            .err()
            .expect("an untrusted server is refused");
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
        let e = Store::open_postgres(&bare, None)
            .err()
            .expect("no roots, no TLS, no store");
        assert!(e.to_string().contains("needs TLS"), "{e}");
        let e = Store::open_postgres(&format!("{bare}?sslmode=prefer"), Some(config(&c.cert())))
            .err()
            .expect("prefer is refused");
        assert!(e.to_string().contains("plaintext"), "{e}");
    }

    /// A self-signed certificate (PEM) for 127.0.0.1 nobody uses.
    fn unrelated_self_signed() -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let (crt, _) = tether_test_support::pg::server_cert(dir.path(), "IP:127.0.0.1", 0, 0);
        std::fs::read(crt).unwrap()
    }

    /// Many callers at once share at most four connections, and a panic in
    /// the middle of a transaction frees its connection.
    #[test]
    fn postgres_pool_stays_within_its_cap() {
        let c = Cluster::shared();
        let url = c.database();
        let db = url
            .rsplit('/')
            .next()
            .unwrap()
            .split('?')
            .next()
            .unwrap()
            .to_owned();
        let s = Store::open_postgres(&url, None).unwrap();
        let peak = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|sc| {
            for i in 0..16 {
                let (s, peak, c, db) = (&s, &peak, &c, &db);
                sc.spawn(move || {
                    for j in 0..5 {
                        s.apply(&[up(&format!("p{i}-{j}"), "{}")], 1).unwrap();
                        if j == 2 {
                            let n: usize = c
                                .sql(
                                    "postgres",
                                    &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}'"),
                                )
                                .parse()
                                .unwrap();
                            peak.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let peak = peak.into_inner();
        assert!((1..=4).contains(&peak), "{peak} connections");
        for _ in 0..6 {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let _ = s.write(|_tx| -> Result<()> { panic!("a bug midway") });
            }));
            assert!(r.is_err());
        }
        assert_eq!(
            s.list("WorkloadIdentity").unwrap().len(),
            80,
            "the pool still serves"
        );
    }

    /// A database that goes away is a clear, retryable error, and the
    /// store works again once it is back, without reopening.
    #[test]
    fn postgres_outage_is_unavailable_then_recovers() {
        let url = Cluster::shared().database();
        let s = Store::open_postgres(&url, None).unwrap();
        s.apply(&[up("a", "{}")], 1).unwrap();
        // Every connection of this store's database cut, as a restart would.
        let db = url
            .rsplit('/')
            .next()
            .unwrap()
            .split('?')
            .next()
            .unwrap()
            .to_owned();
        Cluster::shared().sql(
            "postgres",
            &format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'"
            ),
        );
        // The first use of a cut connection fails as unavailable; the next
        // opens a new one.
        let mut ok = false;
        for _ in 0..3 {
            match s.list("WorkloadIdentity") {
                Ok(rows) => {
                    assert_eq!(rows.len(), 1);
                    ok = true;
                    break;
                }
                Err(e) => assert!(
                    matches!(e, StoreError::Unavailable(_) | StoreError::Postgres(_)),
                    "{e:?}"
                ),
            }
        }
        assert!(ok, "the store did not reconnect");
        let e = Store::open_postgres(
            &url.replace(tether_test_support::pg::PASSWORD, "wrong"),
            None,
        )
        .err()
        .expect("a wrong password is refused");
        assert!(e.to_string().contains("password"), "{e}");
    }
}
