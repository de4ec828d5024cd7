//! Fetching credentials for one process instance, shared by every way of
//! delivering them: the credential filesystem (a file) and the injecting
//! proxy (a connection). Values are cached per instance and binding (and
//! the form they are wanted in), refreshed after their refresh time,
//! backed off per source when the upstream fails (one backoff for every
//! process bound to it), and dropped when the process exits ([`Held`] is a
//! [`ProcessObserver`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tether_manifest::{CredentialSourceSpec, FileFormat, OAuthGrant};
use tether_proto::tether::FetchSecretRequest;
use tether_proto::tether::node_client::NodeClient;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use super::exchange::{self, ExchangeError, Upstream};
use crate::audit::AuditLog;
use crate::clock::unix_now;
use crate::identity::ProcSvid;
use crate::identity::node::NodeConn;
use crate::metrics::Metrics;
use crate::state::registry::AgentBinding;
use crate::state::tracker::{Current, ProcessObserver, Tracker};

/// A whole fetch (JWT-SVID, client assertion and token endpoint together)
/// longer than this fails: a FUSE worker or a connection waits on it.
pub const FETCH_BUDGET: Duration = Duration::from_secs(8);
/// A static secret is fetched again after this long, to follow re-applies.
const STATIC_REFRESH_SECS: i64 = 60;
/// Backoff after a failed refresh, doubling to this.
const MAX_BACKOFF_SECS: i64 = 30;
/// Failing sources remembered at once (one per binding in force).
const MAX_FAILING_SOURCES: usize = 4096;

/// Fetches and caches the values of bindings for process instances.
pub struct Fetcher {
    tracker: Arc<Tracker>,
    held: Arc<Held>,
    node: Arc<NodeConn>,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    /// Token endpoints' client (None: no TLS configuration could be built;
    /// every exchange then fails, audited).
    upstream: Option<Upstream>,
}

impl Fetcher {
    pub fn new(
        tracker: Arc<Tracker>,
        held: Arc<Held>,
        node: Arc<NodeConn>,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Fetcher {
            tracker,
            held,
            node,
            audit,
            metrics,
            upstream: Upstream::new()
                .map_err(|e| tracing::error!(error = %e, "no TLS client for token endpoints"))
                .ok(),
        }
    }

    /// When the cached value of `b` for instance `c` was fetched.
    pub fn fetched_at(&self, c: &Current, b: &AgentBinding, format: FileFormat) -> Option<i64> {
        self.held
            .lock()
            .get(&c.pid)
            .filter(|i| i.start_time == c.start_time)
            .and_then(|i| i.by_binding.get(&cache_key(b, format)))
            .map(|h| h.at)
    }
}

/// Per-process credentials fetched so far. Shared by the filesystem and the
/// tracker (as an observer, to drop them at exit) and read by `tether
/// credentials`.
#[derive(Default)]
pub struct Held {
    procs: Mutex<HashMap<i32, Instance>>,
    /// Sources that failed recently, by cache key, shared by every process
    /// bound to them (see [`Failing`]).
    failing: Mutex<HashMap<String, Failing>>,
}

/// A source whose last fetch failed: not asked again, for any process,
/// before `retry_at` (backoff doubling with each failure in a row).
struct Failing {
    retry_at: i64,
    failures: u32,
    why: String,
}

struct Instance {
    start_time: u64,
    by_binding: HashMap<String, Fetched>,
}

struct Fetched {
    value: Zeroizing<Vec<u8>>,
    /// When it was fetched (unix seconds); the file's mtime.
    at: i64,
    /// A read after this fetches it again.
    refresh_at: i64,
    /// Never served after this (None: does not expire).
    expires_at: Option<i64>,
}

impl Fetched {
    /// Whether the value may be served at `now`.
    fn live(&self, now: i64) -> bool {
        self.expires_at.is_none_or(|e| now < e)
    }

    fn value(&self) -> Value {
        Value {
            bytes: self.value.clone(),
            expires_at: self.expires_at,
        }
    }
}

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Instance>> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn failing(&self) -> std::sync::MutexGuard<'_, HashMap<String, Failing>> {
        self.failing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// For `tether credentials`: each live process with bindings, what it
    /// holds and until when. Never a value.
    pub fn listing(&self, tracker: &Tracker) -> serde_json::Value {
        let reg = tracker.registry.borrow().clone();
        let failing = self.failing();
        let procs = self.lock();
        let mut out = Vec::new();
        for (info, svids) in tracker.snapshot() {
            let mut bindings = Vec::new();
            for b in reg
                .bindings
                .iter()
                .filter(|b| svids.iter().any(|s| s.identity == b.identity))
            {
                let key = cache_key(b, delivered_format(b));
                let fetched = procs
                    .get(&info.pid)
                    .filter(|i| i.start_time == info.start_time)
                    .and_then(|i| i.by_binding.get(&key));
                let expires = match &b.source_spec {
                    CredentialSourceSpec::X509Svid {} => svids
                        .iter()
                        .find(|s| s.identity == b.identity)
                        .map(|s| s.expires_at),
                    _ => fetched.and_then(|f| f.expires_at),
                };
                bindings.push(json!({
                    "binding": b.name,
                    "identity": b.identity,
                    "source": b.source,
                    "kind": b.source_spec.kind(),
                    "files": super::credfs::file_names(b),
                    "inject": b.inject.as_ref().map(|i| json!({
                        "service": i.service, "protocol": i.protocol.name(),
                    })),
                    "fetched": fetched.map(|f| f.at),
                    "expiresAt": expires,
                    "lastError": failing.get(&key).map(|f| f.why.as_str()),
                }));
            }
            if !bindings.is_empty() {
                out.push(json!({
                    "pid": info.pid,
                    "exe": info.exe_path,
                    "uid": info.uid,
                    "bindings": bindings,
                }));
            }
        }
        json!({ "processes": out })
    }
}

impl ProcessObserver for Held {
    fn process_removed(&self, pid: i32) {
        self.lock().remove(&pid);
    }

    fn shutdown(&self) {
        self.lock().clear();
        self.failing().clear();
    }
}

/// A value just fetched: refreshed on a read after `refresh_at`, never
/// served after `expires_at`.
struct Fresh {
    value: Zeroizing<Vec<u8>>,
    refresh_at: i64,
    expires_at: Option<i64>,
}

/// Why a fetch failed; `refused` when the server said no (then the last
/// value goes at once) rather than could not be reached.
struct FetchError {
    msg: String,
    refused: bool,
}

impl FetchError {
    fn upstream(msg: impl Into<String>) -> Self {
        FetchError {
            msg: msg.into(),
            refused: false,
        }
    }
}

impl From<ExchangeError> for FetchError {
    fn from(e: ExchangeError) -> Self {
        FetchError {
            refused: e.refused(),
            msg: e.to_string(),
        }
    }
}

/// A server answer: refusals (binding or entitlement gone) end the value.
fn server_error(s: tonic::Status) -> FetchError {
    FetchError {
        refused: matches!(
            s.code(),
            tonic::Code::PermissionDenied | tonic::Code::NotFound | tonic::Code::FailedPrecondition
        ),
        msg: format!("server: {}", s.message()),
    }
}

/// A value valid until `exp`, refreshed at half its life (with jitter, so a
/// fleet's refreshes spread out).
fn expiring(value: Zeroizing<Vec<u8>>, now: i64, exp: i64) -> Fresh {
    let life = (exp - now).max(2);
    Fresh {
        value,
        refresh_at: now + life / 2 - jitter(life / 10 + 1),
        expires_at: Some(exp),
    }
}

/// Where a fetched value is cached for a process: the binding and what it
/// said when fetched, so a re-applied binding or source fetches anew.
fn cache_key(b: &AgentBinding, format: FileFormat) -> String {
    format!(
        "{}\0{}\0{}\0{:?}\0{format:?}",
        b.name, b.identity, b.source, b.source_spec
    )
}

/// A fetched value as served: its bytes and when it expires.
pub struct Value {
    pub bytes: Zeroizing<Vec<u8>>,
    pub expires_at: Option<i64>,
}

impl Fetcher {
    /// The cached value of a fetched source for this process instance,
    /// fetched (or refreshed) now if due.
    pub async fn fetched(
        &self,
        c: &Current,
        b: &AgentBinding,
        svid: &ProcSvid,
        format: FileFormat,
    ) -> Result<Value, String> {
        let now = unix_now();
        let key = cache_key(b, format);
        // The value held for this instance while still good, and whether a
        // refresh is due.
        let held = self
            .held
            .lock()
            .get(&c.pid)
            .filter(|i| i.start_time == c.start_time)
            .and_then(|i| i.by_binding.get(&key))
            .filter(|h| h.live(now))
            .map(|h| (h.value(), now >= h.refresh_at));
        let kept = match held {
            Some((v, false)) => return Ok(v),
            Some((v, true)) => Some(v),
            None => None,
        };
        // A failing source is not asked again, for this process or any
        // other, before its backoff ends: a fleet of fresh processes cannot
        // hammer an upstream that is down. A value still good is served.
        if let Some(why) = self.backing_off(&key, now) {
            return kept.ok_or(why);
        }
        let kind = b.source_spec.kind();
        let started = Instant::now();
        // Checked against the time after the fetch, which may have taken
        // seconds: a value that expired meanwhile is not delivered.
        let result = self
            .fetch(c, b, svid, format)
            .await
            .and_then(|v| match v.expires_at {
                Some(e) if e <= unix_now() => Err(FetchError::upstream(
                    "the value expired before it could be delivered",
                )),
                _ => Ok(v),
            });
        self.metrics
            .credential_fetch_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(Fresh {
                value,
                refresh_at,
                expires_at,
            }) => {
                self.metrics.credential_fetch(kind, "ok");
                self.held.failing().remove(&key);
                // Kept only while the process is the one it was fetched for
                // (an exit observed meanwhile already dropped its entry).
                if let Some(inst) = self.instance(&mut self.held.lock(), c) {
                    inst.by_binding.insert(
                        key,
                        Fetched {
                            value: value.clone(),
                            at: now,
                            refresh_at,
                            expires_at,
                        },
                    );
                }
                Ok(Value {
                    bytes: value,
                    expires_at,
                })
            }
            Err(e) => {
                self.metrics.credential_fetch(kind, "error");
                self.note_failure(&key, now, &e.msg);
                // A refusal by the server or upstream (binding, entitlement
                // or grant gone) ends the value now; an unreachable or bad
                // upstream keeps the last good one until it expires.
                let kept =
                    kept.filter(|v| !e.refused && v.expires_at.is_none_or(|x| unix_now() < x));
                if kept.is_none()
                    && let Some(i) = self
                        .held
                        .lock()
                        .get_mut(&c.pid)
                        .filter(|i| i.start_time == c.start_time)
                {
                    i.by_binding.remove(&key);
                }
                self.audit.publish(json!({
                    "event": "credential",
                    "op": "fetch",
                    "verdict": "error",
                    "pid": c.pid,
                    "exe": c.exe_path,
                    "identity": b.identity,
                    "binding": b.name,
                    "source": b.source,
                    "sourceKind": kind,
                    "keptUntil": kept.as_ref().map(|k| k.expires_at),
                    "reason": e.msg,
                }));
                kept.ok_or(e.msg)
            }
        }
    }

    /// Why the source of cache key `key` is not asked now: it failed
    /// recently and its backoff has not ended.
    fn backing_off(&self, key: &str, now: i64) -> Option<String> {
        let failing = self.held.failing();
        let f = failing.get(key).filter(|f| now < f.retry_at)?;
        Some(format!(
            "no value: {} (the source is backing off; next try in {} s)",
            f.why,
            f.retry_at - now
        ))
    }

    /// Records a failed fetch of the source of `key`: backoff doubling from
    /// 2 s to [`MAX_BACKOFF_SECS`], jittered.
    fn note_failure(&self, key: &str, now: i64, why: &str) {
        let mut failing = self.held.failing();
        if failing.len() >= MAX_FAILING_SOURCES && !failing.contains_key(key) {
            failing.clear();
        }
        let f = failing.entry(key.to_owned()).or_insert(Failing {
            retry_at: 0,
            failures: 0,
            why: String::new(),
        });
        f.failures = f.failures.saturating_add(1);
        let backoff = (1i64 << f.failures.min(5)).min(MAX_BACKOFF_SECS);
        f.retry_at = now + backoff + jitter(backoff / 2 + 1);
        why.clone_into(&mut f.why);
    }

    /// The cache of process instance `c`, while the tracker still holds
    /// that instance (an exit observed meanwhile already dropped it; a
    /// reused pid starts empty).
    fn instance<'a>(
        &self,
        procs: &'a mut HashMap<i32, Instance>,
        c: &Current,
    ) -> Option<&'a mut Instance> {
        if self
            .tracker
            .current(c.pid)
            .is_none_or(|n| n.start_time != c.start_time)
        {
            return None;
        }
        let inst = procs.entry(c.pid).or_insert_with(|| Instance {
            start_time: c.start_time,
            by_binding: HashMap::new(),
        });
        if inst.start_time != c.start_time {
            inst.start_time = c.start_time;
            inst.by_binding.clear();
        }
        Some(inst)
    }

    /// Fetches a source's value for a process now.
    async fn fetch(
        &self,
        c: &Current,
        b: &AgentBinding,
        svid: &ProcSvid,
        format: FileFormat,
    ) -> Result<Fresh, FetchError> {
        let now = unix_now();
        let deadline = tokio::time::Instant::now() + FETCH_BUDGET;
        match &b.source_spec {
            CredentialSourceSpec::Static { .. } => {
                let r = self
                    .ask_server(
                        b,
                        deadline,
                        |mut c, r| async move { c.fetch_secret(r).await },
                    )
                    .await?;
                let value = Zeroizing::new(r.value);
                if value.len() > tether_manifest::MAX_STATIC_BYTES {
                    return Err(FetchError::upstream(format!(
                        "the server sent {} bytes for a static secret (at most {})",
                        value.len(),
                        tether_manifest::MAX_STATIC_BYTES
                    )));
                }
                Ok(Fresh {
                    value,
                    refresh_at: now + STATIC_REFRESH_SECS,
                    expires_at: None,
                })
            }
            CredentialSourceSpec::JwtSvid { audience } => {
                let (token, exp) = self.mint(svid, audience, deadline).await?;
                Ok(expiring(Zeroizing::new(token.into_bytes()), now, exp))
            }
            CredentialSourceSpec::AwsSts {
                role_arn,
                audience,
                duration_secs,
                endpoint,
                region,
            } => {
                // The JWT-SVID proves the identity to STS and stays here.
                let (token, _) = self
                    .mint(svid, std::slice::from_ref(audience), deadline)
                    .await?;
                let session = exchange::session_name(&b.identity, c.pid);
                let duration = duration_secs.to_string();
                let form = exchange::sts_form(role_arn, &session, &token, &duration);
                let (status, body) = self.post(endpoint, &form, "text/xml", deadline).await?;
                let creds = exchange::parse_sts(endpoint, status, &body)?;
                // Never past what was asked for, whatever the answer says.
                let exp = creds.expiration.min(now + duration_secs + 60);
                if exp <= now + 1 {
                    return Err(FetchError::upstream(format!(
                        "{endpoint}: the credentials expired already (Expiration {})",
                        creds.expiration
                    )));
                }
                Ok(expiring(aws_file(format, &creds, exp, region), now, exp))
            }
            CredentialSourceSpec::OAuth2 {
                token_endpoint,
                grant,
                client_id,
                audience,
                scope,
            } => {
                let scope = scope.join(" ");
                let mut form: Vec<(&str, &str)> = Vec::new();
                let subject;
                match grant {
                    OAuthGrant::ClientCredentials => {
                        form.push(("grant_type", "client_credentials"))
                    }
                    OAuthGrant::TokenExchange => {
                        // The subject token's audience is the token endpoint
                        // that consumes it.
                        subject = self
                            .mint(svid, std::slice::from_ref(token_endpoint), deadline)
                            .await?
                            .0;
                        form.extend([
                            ("grant_type", exchange::GRANT_TOKEN_EXCHANGE),
                            ("subject_token", subject.as_str()),
                            ("subject_token_type", exchange::TOKEN_TYPE_JWT),
                        ]);
                        if !audience.is_empty() {
                            form.push(("audience", audience));
                        }
                    }
                }
                // The client authenticates with an RFC 7523 assertion the
                // server signs for this source's client only.
                let assertion;
                if !client_id.is_empty() {
                    assertion = self.client_assertion(b, deadline).await?;
                    form.extend([
                        ("client_id", client_id.as_str()),
                        ("client_assertion_type", exchange::ASSERTION_TYPE_JWT_BEARER),
                        ("client_assertion", assertion.as_str()),
                    ]);
                }
                if !scope.is_empty() {
                    form.push(("scope", &scope));
                }
                let (status, body) = self
                    .post(token_endpoint, &form, "application/json", deadline)
                    .await?;
                let t = exchange::parse_token(token_endpoint, status, &body, now)?;
                Ok(expiring(
                    Zeroizing::new(t.access_token.as_bytes().to_vec()),
                    now,
                    t.expires_at,
                ))
            }
            // The tracker's own, never fetched.
            CredentialSourceSpec::X509Svid {} => Err(FetchError::upstream(
                "x509Svid sources are not fetched".to_owned(),
            )),
        }
    }

    /// A JWT-SVID of the file's SVID for `audience`, and its expiry.
    async fn mint(
        &self,
        svid: &ProcSvid,
        audience: &[String],
        deadline: tokio::time::Instant,
    ) -> Result<(String, i64), FetchError> {
        let token =
            tokio::time::timeout_at(deadline, self.tracker.mint_jwt(&svid.spiffe_id, audience))
                .await
                .map_err(|_| FetchError::upstream("the server did not answer in time"))?
                .map_err(FetchError::upstream)?;
        let exp = tether_spiffe::jwt::peek_expiry(&token)
            .map_err(|e| FetchError::upstream(format!("the server's JWT-SVID: {e}")))?;
        Ok((token, exp))
    }

    /// A client assertion for an oauth2 source, signed by the server.
    async fn client_assertion(
        &self,
        b: &AgentBinding,
        deadline: tokio::time::Instant,
    ) -> Result<String, FetchError> {
        let r = self
            .ask_server(b, deadline, |mut c, r| async move {
                c.mint_client_assertion(r).await
            })
            .await?;
        Ok(r.token)
    }

    /// A node API call about a binding (its identity and source), by the
    /// fetch's deadline.
    async fn ask_server<T, Fut>(
        &self,
        b: &AgentBinding,
        deadline: tokio::time::Instant,
        call: impl FnOnce(NodeClient<Channel>, FetchSecretRequest) -> Fut,
    ) -> Result<T, FetchError>
    where
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let req = FetchSecretRequest {
            identity: b.identity.clone(),
            source: b.source.clone(),
        };
        let fut = call(self.node.client(), req);
        tokio::time::timeout_at(deadline, fut)
            .await
            .map_err(|_| FetchError::upstream("the server did not answer in time"))?
            .map(tonic::Response::into_inner)
            .map_err(server_error)
    }

    /// POSTs a form to a token endpoint.
    async fn post(
        &self,
        endpoint: &str,
        form: &[(&str, &str)],
        accept: &'static str,
        deadline: tokio::time::Instant,
    ) -> Result<(u16, hyper::body::Bytes), FetchError> {
        let up = self.upstream.as_ref().ok_or_else(|| {
            FetchError::upstream("the agent has no TLS client for token endpoints")
        })?;
        let answer = tokio::time::timeout_at(deadline, up.post_form(endpoint, form, accept)).await;
        match answer {
            Ok(r) => Ok(r?),
            Err(_) => Err(FetchError::upstream(format!(
                "{endpoint}: unreachable: no answer within the fetch's {FETCH_BUDGET:?}"
            ))),
        }
    }
}

/// A random offset in [0, span) seconds, so refreshes of many processes do
/// not line up.
pub(super) fn jitter(span: i64) -> i64 {
    let mut b = [0u8; 4];
    if span <= 0 || aws_lc_rs::rand::fill(&mut b).is_err() {
        return 0;
    }
    i64::from(u32::from_le_bytes(b)) % span
}

/// An env-file variable name from a source name: `db-password` becomes
/// `DB_PASSWORD`.
pub(super) fn env_name(source: &str) -> String {
    source
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// A value for an env file, single-quoted unless it is plainly safe.
pub(super) fn env_value(v: &str) -> String {
    if !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:@+=,".contains(c))
    {
        return v.to_owned();
    }
    format!("'{}'", v.replace('\'', r"'\''"))
}

/// STS credentials as the binding's format asks: `json` is the
/// `credential_process` document (Version 1), `env` the SDKs' variables,
/// and `raw` (or `pem`) a shared credentials file (`[default]` profile),
/// for `AWS_SHARED_CREDENTIALS_FILE`.
fn aws_file(
    format: FileFormat,
    c: &exchange::AwsCredentials,
    expires_at: i64,
    region: &str,
) -> Zeroizing<Vec<u8>> {
    // When Tether stops serving it (capped at the duration asked for), not
    // what the upstream said.
    let expiration = time::OffsetDateTime::from_unix_timestamp(expires_at)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    Zeroizing::new(match format {
        FileFormat::Json => {
            let mut s = json!({
                "Version": 1,
                "AccessKeyId": c.access_key_id,
                "SecretAccessKey": c.secret_access_key.as_str(),
                "SessionToken": c.session_token.as_str(),
                "Expiration": expiration,
            })
            .to_string();
            s.push('\n');
            s.into_bytes()
        }
        FileFormat::Env => format!(
            "AWS_ACCESS_KEY_ID={}\nAWS_SECRET_ACCESS_KEY={}\nAWS_SESSION_TOKEN={}\nAWS_REGION={}\n",
            env_value(&c.access_key_id),
            env_value(&c.secret_access_key),
            env_value(&c.session_token),
            env_value(region),
        )
        .into_bytes(),
        FileFormat::Raw | FileFormat::Pem => format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\naws_session_token = {}\n",
            c.access_key_id,
            c.secret_access_key.as_str(),
            c.session_token.as_str(),
        )
        .into_bytes(),
    })
}

/// The form a binding's value is cached in for `tether credentials`: its
/// file's, or JSON when it is only injected.
fn delivered_format(b: &AgentBinding) -> FileFormat {
    b.file.as_ref().map_or(FileFormat::Json, |f| f.format)
}
