//! The PostgreSQL backend: a small pool of tokio-postgres connections whose
//! connection tasks run on a runtime thread of their own, driven from the
//! store's synchronous methods with a deadline. The store's callers are
//! async handlers and the key manager under a lock; a dedicated runtime
//! keeps the database's I/O off theirs, and the deadline keeps a stalled
//! database from holding a caller forever (its connection is then dropped).

use std::future::Future;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Config, GenericClient, Socket};

use crate::sql::{Dialect, P, Row, Tx, Val};
use crate::{Result, StoreError};

/// How long one statement (or connecting) may take.
const DEADLINE: Duration = Duration::from_secs(15);
/// Connections per store: the server's handlers are short, and PostgreSQL
/// pays a process per connection.
const POOL: usize = 4;

pub(crate) struct Pg {
    rt: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    cfg: Config,
    tls: Option<Arc<rustls::ClientConfig>>,
    pool: Mutex<PoolState>,
    freed: Condvar,
}

struct PoolState {
    idle: Vec<Client>,
    open: usize,
}

impl Drop for Pg {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Polls `f` on this thread until it is ready or the deadline passes. The
/// futures of tokio-postgres's client only wait on channels to their
/// connection task, which runs on the store's own runtime.
fn block_on<F: Future>(f: F) -> Result<F::Output> {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return Ok(v);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(StoreError::Unavailable(format!(
                "the database did not answer within {}s",
                DEADLINE.as_secs()
            )));
        }
        std::thread::park_timeout(left);
    }
}

fn pg_err(e: tokio_postgres::Error) -> StoreError {
    // Name the server's own message (and its SQLSTATE) when it sent one.
    match e.as_db_error() {
        Some(db) => StoreError::Postgres(format!("{} ({})", db.message(), db.code().code())),
        None if e.is_closed() => StoreError::Unavailable(format!("the database connection: {e}")),
        None => StoreError::Unavailable(e.to_string()),
    }
}

impl Pg {
    /// Connects once (so a wrong URL or password fails at start, clearly).
    pub(crate) fn connect(url: &str, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Pg> {
        let mut cfg: Config = url
            .parse()
            .map_err(|e| StoreError::Config(format!("database URL: {e}")))?;
        cfg.connect_timeout(Duration::from_secs(5))
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .application_name("tether-server");
        use tokio_postgres::config::{Host, SslMode};
        // `prefer` (libpq's default, and tokio-postgres's) falls back to
        // plaintext when the server says no, so anyone on the path can take
        // the password or relay the login: over TCP, TLS is required unless
        // the URL turns it off outright.
        if url.contains("sslmode=prefer") {
            return Err(StoreError::Config(
                "database URL: sslmode=prefer falls back to plaintext; use require (or disable on a link you trust)".into(),
            ));
        }
        let tcp = cfg.get_hosts().iter().all(|h| matches!(h, Host::Tcp(_)));
        if tcp && cfg.get_ssl_mode() == SslMode::Prefer {
            cfg.ssl_mode(SslMode::Require);
        }
        if cfg.get_ssl_mode() == SslMode::Require && tls.is_none() {
            return Err(StoreError::Config(
                "database URL needs TLS (sslmode=require, the default over TCP), and no TLS roots were given".into(),
            ));
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (htx, hrx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("tether-pg".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = htx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = htx.send(Ok(rt.handle().clone()));
                rt.block_on(async move {
                    let _ = rx.await;
                });
            })
            .map_err(|e| StoreError::Unavailable(format!("database thread: {e}")))?;
        let rt = hrx
            .recv()
            .map_err(|_| StoreError::Unavailable("database thread died".into()))?
            .map_err(|e| StoreError::Unavailable(format!("database runtime: {e}")))?;
        let pg = Pg {
            rt,
            stop: Some(tx),
            cfg,
            tls,
            pool: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
        };
        // Connect once now, so a wrong URL or password fails at start.
        pg.take()?.healthy = true;
        Ok(pg)
    }

    /// A new connection (its pool slot already counted by the caller).
    fn open(&self) -> Result<Client> {
        let cfg = self.cfg.clone();
        let task = match self.tls.clone() {
            Some(t) => self.rt.spawn(connect(cfg, crate::pg_tls::Rustls(t))),
            None => self.rt.spawn(connect(cfg, tokio_postgres::NoTls)),
        };
        block_on(task)?
            .map_err(|e| StoreError::Unavailable(format!("database task: {e}")))?
            .map_err(pg_err)
    }

    /// Follows `channels` (LISTEN) on a connection of its own, for as long
    /// as the store lives, reconnecting after a second when it drops.
    /// `on(None)` after every (re)connection: notifications may have been
    /// missed, so the caller catches up by reading; `on(Some(channel))` for
    /// each notification.
    pub(crate) fn listen(
        &self,
        channels: &'static [&'static str],
        on: Box<dyn Fn(Option<&str>) + Send + Sync>,
    ) {
        let cfg = self.cfg.clone();
        let tls = self.tls.clone();
        let on: Arc<dyn Fn(Option<&str>) + Send + Sync> = on.into();
        self.rt.spawn(async move {
            loop {
                let r = match tls.clone() {
                    Some(t) => listen_once(&cfg, crate::pg_tls::Rustls(t), channels, &on).await,
                    None => listen_once(&cfg, tokio_postgres::NoTls, channels, &on).await,
                };
                if let Err(e) = r {
                    tracing::warn!(error = %e, "following the database's change feed; reconnecting");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    /// An idle connection, a new one while under the cap, or the next one
    /// given back. The slot is counted before connecting, so the pool
    /// never exceeds its cap.
    fn take(&self) -> Result<Lease<'_>> {
        let mut st = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            while let Some(c) = st.idle.pop() {
                if !c.is_closed() {
                    return Ok(Lease::new(self, c));
                }
                st.open -= 1;
            }
            if st.open < POOL {
                st.open += 1;
                drop(st);
                return match self.open() {
                    Ok(c) => Ok(Lease::new(self, c)),
                    Err(e) => {
                        self.release_slot();
                        Err(e)
                    }
                };
            }
            let (g, timeout) = self
                .freed
                .wait_timeout(st, DEADLINE)
                .unwrap_or_else(|p| p.into_inner());
            st = g;
            if timeout.timed_out() && st.idle.is_empty() && st.open >= POOL {
                return Err(StoreError::Unavailable(
                    "every database connection stayed busy".into(),
                ));
            }
        }
    }

    fn release_slot(&self) {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).open -= 1;
        self.freed.notify_one();
    }

    /// Runs `f` holding the session advisory lock `key`: every server on
    /// this database waits for it. If this connection dies meanwhile the
    /// database releases the lock (a dead server never blocks the others).
    pub(crate) fn locked<R>(&self, key: i64, f: impl FnOnce() -> R) -> Result<R> {
        let mut lease = self.take()?;
        block_on(
            lease
                .client()
                .execute("SELECT pg_advisory_lock($1)", &[&key]),
        )?
        .map_err(pg_err)?;
        // Should `f` panic, the lease drops the connection, and with it
        // the lock.
        let r = f();
        let freed = block_on(
            lease
                .client()
                .execute("SELECT pg_advisory_unlock($1)", &[&key]),
        )
        .and_then(|r| r.map_err(pg_err));
        // A lock not surely released goes with its connection.
        lease.healthy = freed.is_ok();
        Ok(r)
    }

    /// Runs `f` in a transaction; commits if it returns Ok.
    pub(crate) fn tx<R>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<R>) -> Result<R> {
        let mut lease = self.take()?;
        let out = (|| {
            let tx = block_on(lease.client().transaction())?.map_err(pg_err)?;
            let r = f(&mut PgConn(&tx))?;
            block_on(tx.commit())?.map_err(pg_err)?;
            Ok(r)
        })();
        // A transaction that failed on the server (not a verdict of the
        // caller's) leaves the connection usable after its rollback; one
        // cut off by the deadline does not.
        lease.healthy = !matches!(out, Err(StoreError::Unavailable(_)));
        out
    }

    /// Runs `f`'s statements as they come, outside a transaction: for reads
    /// of one statement, which then cost one round trip instead of three.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<R>) -> Result<R> {
        let mut lease = self.take()?;
        let out = f(&mut PgConn(&*lease.client()));
        lease.healthy = !matches!(out, Err(StoreError::Unavailable(_)));
        out
    }
}

/// A pooled connection on loan. Dropped, it goes back to the pool if the
/// borrower marked it healthy, and is closed otherwise (a panic midway
/// included), freeing its slot either way.
struct Lease<'p> {
    pg: &'p Pg,
    client: Option<Client>,
    healthy: bool,
}

impl<'p> Lease<'p> {
    fn new(pg: &'p Pg, c: Client) -> Self {
        Lease {
            pg,
            client: Some(c),
            healthy: false,
        }
    }

    fn client(&mut self) -> &mut Client {
        // Some from new() until drop.
        self.client
            .as_mut()
            .expect("a lease holds its client until dropped")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let Some(c) = self.client.take() else { return };
        let mut st = self.pg.pool.lock().unwrap_or_else(|p| p.into_inner());
        if self.healthy && !c.is_closed() {
            st.idle.push(c);
        } else {
            st.open -= 1;
        }
        drop(st);
        self.pg.freed.notify_one();
    }
}

/// Connects and drives the connection on this runtime.
async fn connect<T>(cfg: Config, tls: T) -> std::result::Result<Client, tokio_postgres::Error>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
{
    let (client, conn) = cfg.connect(tls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "a database connection ended");
        }
    });
    Ok(client)
}

/// One LISTEN session: returns when its connection ends.
async fn listen_once<T>(
    cfg: &Config,
    tls: T,
    channels: &[&str],
    on: &Arc<dyn Fn(Option<&str>) + Send + Sync>,
) -> std::result::Result<(), tokio_postgres::Error>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
{
    let (client, mut conn) = cfg.connect(tls).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // The connection yields notifications only to whoever polls it.
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    if tx.send(n.channel().to_owned()).is_err() {
                        return Ok(());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
    });
    let listen: String = channels.iter().map(|c| format!("LISTEN {c};")).collect();
    client.batch_execute(&listen).await?;
    on(None);
    while let Some(ch) = rx.recv().await {
        on(Some(&ch));
    }
    drop(client);
    match driver.await {
        Ok(r) => r,
        Err(_) => Ok(()),
    }
}

/// Statements on a transaction or, for single reads, on the connection.
struct PgConn<'c, C>(&'c C);

fn pg_params<'a>(p: &'a [P<'a>]) -> Vec<Box<dyn ToSql + Sync + 'a>> {
    p.iter()
        .map(|v| -> Box<dyn ToSql + Sync + 'a> {
            match *v {
                P::I(i) => Box::new(i),
                P::T(s) => Box::new(s),
                P::B(b) => Box::new(b),
                P::NullI => Box::new(None::<i64>),
                P::NullT => Box::new(None::<&str>),
            }
        })
        .collect()
}

fn pg_val(row: &tokio_postgres::Row, i: usize) -> Result<Val> {
    let ty = row.columns()[i].type_().clone();
    let bad = |e: tokio_postgres::Error| StoreError::Decode(format!("column {i}: {e}"));
    Ok(if ty == Type::INT8 {
        row.try_get::<_, Option<i64>>(i)
            .map_err(bad)?
            .map_or(Val::Null, Val::Int)
    } else if ty == Type::INT4 {
        row.try_get::<_, Option<i32>>(i)
            .map_err(bad)?
            .map_or(Val::Null, |v| Val::Int(v.into()))
    } else if ty == Type::BOOL {
        row.try_get::<_, Option<bool>>(i)
            .map_err(bad)?
            .map_or(Val::Null, |v| Val::Int(v.into()))
    } else if ty == Type::BYTEA {
        row.try_get::<_, Option<Vec<u8>>>(i)
            .map_err(bad)?
            .map_or(Val::Null, Val::Blob)
    } else {
        row.try_get::<_, Option<String>>(i)
            .map_err(bad)?
            .map_or(Val::Null, Val::Text)
    })
}

impl<C: GenericClient + Sync> Tx for PgConn<'_, C> {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }
    fn exec(&mut self, sql: &str, params: &[P<'_>]) -> Result<u64> {
        let p = pg_params(params);
        let refs: Vec<&(dyn ToSql + Sync)> = p.iter().map(|b| &**b as _).collect();
        block_on(self.0.execute(sql, &refs))?.map_err(pg_err)
    }
    fn rows(&mut self, sql: &str, params: &[P<'_>]) -> Result<Vec<Row>> {
        let p = pg_params(params);
        let refs: Vec<&(dyn ToSql + Sync)> = p.iter().map(|b| &**b as _).collect();
        let rows = block_on(self.0.query(sql, &refs))?.map_err(pg_err)?;
        rows.iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| pg_val(r, i))
                    .collect::<Result<Vec<_>>>()
                    .map(Row)
            })
            .collect()
    }
    fn batch(&mut self, sql: &str) -> Result<()> {
        block_on(self.0.batch_execute(sql))?.map_err(pg_err)
    }
}
