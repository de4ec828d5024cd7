//! Credential resources: where a credential comes from (`CredentialSource`)
//! and which identity receives it, how (`CredentialBinding`).
//!
//! Validation is local to each document, like every other kind; whether a
//! binding's identity and source exist is checked by the server at apply.

use serde::{Deserialize, Serialize};

use crate::{parse_duration, validate_name};

/// Longest static secret accepted (it is held in memory on every node that
/// has an entitled process).
pub const MAX_STATIC_BYTES: usize = 64 * 1024;
/// AWS STS bounds for AssumeRoleWithWebIdentity's DurationSeconds.
const STS_MIN_SECS: i64 = 900;
const STS_MAX_SECS: i64 = 43_200;

/// Where a credential comes from. Exactly one kind per source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CredentialSourceSpec {
    /// A secret stored by the control plane. `value` is the secret as
    /// applied; the server seals it before storing and never returns it.
    Static { value: String },
    /// The process's own X.509-SVID, key and bundle.
    X509Svid {},
    /// A JWT-SVID for these audiences.
    JwtSvid { audience: Vec<String> },
    /// AWS STS AssumeRoleWithWebIdentity with the process's JWT-SVID.
    #[serde(rename_all = "camelCase")]
    AwsSts {
        role_arn: String,
        audience: String,
        duration_secs: i64,
        endpoint: String,
        region: String,
    },
    /// An OAuth2 token endpoint.
    #[serde(rename = "oauth2", rename_all = "camelCase")]
    OAuth2 {
        token_endpoint: String,
        grant: OAuthGrant,
        /// The client (client credentials with a Tether-signed RFC 7523
        /// assertion); for token exchange, optional client authentication.
        client_id: String,
        audience: String,
        scope: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OAuthGrant {
    /// RFC 6749 client credentials, authenticated with an RFC 7523 client
    /// assertion signed by Tether for the process's identity.
    ClientCredentials,
    /// RFC 8693 token exchange with the JWT-SVID as subject token.
    TokenExchange,
}

impl CredentialSourceSpec {
    /// The kind's manifest key (what errors and listings name).
    pub fn kind(&self) -> &'static str {
        match self {
            CredentialSourceSpec::Static { .. } => "static",
            CredentialSourceSpec::X509Svid {} => "x509Svid",
            CredentialSourceSpec::JwtSvid { .. } => "jwtSvid",
            CredentialSourceSpec::AwsSts { .. } => "awsSts",
            CredentialSourceSpec::OAuth2 { .. } => "oauth2",
        }
    }

    /// The spec as a manifest writes it (so `tether get -o yaml` applies
    /// again), with a static secret's value left out: it is never output.
    pub fn manifest_value(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            CredentialSourceSpec::Static { .. } => json!({ "static": { "value": REDACTED } }),
            CredentialSourceSpec::X509Svid {} => json!({ "x509Svid": {} }),
            CredentialSourceSpec::JwtSvid { audience } => {
                json!({ "jwtSvid": { "audience": audience } })
            }
            CredentialSourceSpec::AwsSts {
                role_arn,
                audience,
                duration_secs,
                endpoint,
                region,
            } => json!({ "awsSts": {
                "roleArn": role_arn, "audience": audience,
                "duration": format!("{duration_secs}s"), "endpoint": endpoint, "region": region,
            }}),
            CredentialSourceSpec::OAuth2 {
                token_endpoint,
                grant,
                client_id,
                audience,
                scope,
            } => json!({ "oauth2": {
                "tokenEndpoint": token_endpoint,
                "grant": match grant {
                    OAuthGrant::ClientCredentials => "clientCredentials",
                    OAuthGrant::TokenExchange => "tokenExchange",
                },
                "clientId": client_id, "audience": audience, "scope": scope,
            }}),
        }
    }
}

/// What output shows instead of a static secret's value.
pub const REDACTED: &str = "<redacted>";

impl CredentialBindingSpec {
    /// The spec as a manifest writes it.
    pub fn manifest_value(&self) -> serde_json::Value {
        let mut v = serde_json::json!({ "identity": self.identity, "source": self.source });
        if let Some(i) = &self.inject {
            let proto = match &i.protocol {
                InjectProtocol::Http {
                    header,
                    scheme,
                    authority,
                } => {
                    let mut h = serde_json::json!({ "header": header, "scheme": scheme.as_str() });
                    if let Some(a) = authority {
                        h["authority"] = serde_json::json!(a);
                    }
                    serde_json::json!({ "http": h })
                }
                InjectProtocol::Redis { user } => match user {
                    Some(u) => serde_json::json!({ "redis": { "user": u } }),
                    None => serde_json::json!({ "redis": {} }),
                },
                InjectProtocol::Postgresql { user } => {
                    serde_json::json!({ "postgresql": { "user": user } })
                }
                InjectProtocol::AwsSigV4 {
                    region,
                    service,
                    authority,
                } => {
                    let mut a = serde_json::json!({ "region": region, "service": service });
                    if let Some(x) = authority {
                        a["authority"] = serde_json::json!(x);
                    }
                    serde_json::json!({ "awsSigV4": a })
                }
            };
            let mut inject = serde_json::json!({ "service": i.service });
            if let Some(t) = &i.tls {
                inject["tls"] = serde_json::to_value(t).unwrap_or_default();
            }
            if let Some(x) = &i.intercept {
                inject["intercept"] = serde_json::json!({ "caFile": x.ca_file });
            }
            if let (Some(o), serde_json::Value::Object(p)) = (inject.as_object_mut(), proto) {
                o.extend(p);
            }
            v["inject"] = inject;
        }
        if let Some(f) = &self.file {
            v["file"] = serde_json::json!({
                "name": f.name,
                "format": match f.format {
                    FileFormat::Raw => "raw",
                    FileFormat::Pem => "pem",
                    FileFormat::Json => "json",
                    FileFormat::Env => "env",
                },
                "mode": format!("{:04o}", f.mode),
            });
        }
        v
    }
}

/// How a bound credential is written into the credential filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FileFormat {
    /// The credential's bytes as they are.
    Raw,
    Pem,
    Json,
    /// `NAME=value` lines.
    Env,
}

/// A file in the credential filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialFile {
    pub name: String,
    pub format: FileFormat,
    pub mode: u32,
}

/// Which identity receives which source, and how: as a file, injected into
/// its connections to a Service, or both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialBindingSpec {
    /// A WorkloadIdentity name.
    pub identity: String,
    /// A CredentialSource name.
    pub source: String,
    pub file: Option<CredentialFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inject: Option<Injection>,
}

/// Connections of the bound identity's processes to `service` are carried
/// by the agent, which adds the credential on the way out: the process
/// never holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Injection {
    /// A Service name.
    pub service: String,
    pub protocol: InjectProtocol,
    /// The agent originates TLS to the upstream (the client speaks
    /// plaintext to the agent, on loopback). For PostgreSQL, negotiated with
    /// SSLRequest; otherwise from the first byte.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
    /// HTTPS from the client: the agent terminates it with a leaf from the
    /// node's intercepting CA (name-constrained to the Service's
    /// hostnames), delivered to bound processes only as this file in the
    /// credential filesystem; then TLS again to the upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intercept: Option<Intercept>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Intercept {
    /// The CA bundle's file name in the credential filesystem.
    pub ca_file: String,
}

/// How the agent verifies the upstream's certificate: against `ca` (PEM)
/// when given, else the system roots; for `server_name` when given, else
/// the destination's IP address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamTls {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
}

/// What the agent speaks to add the credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum InjectProtocol {
    /// HTTP/1.1: `header` is set on every request (any value the client
    /// sent in it is removed). With `authority`, a request whose `Host` is
    /// not exactly it is refused: on a shared front end the client cannot
    /// pick the virtual host the credential goes to.
    Http {
        header: String,
        scheme: HttpScheme,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        authority: Option<String>,
    },
    /// Redis: AUTH (with `user`, an ACL user, when given) before any client
    /// byte is relayed.
    Redis { user: Option<String> },
    /// AWS SigV4: every request is signed again with the source's AWS
    /// credentials (an `awsSts` source, or a static one holding the
    /// `credential_process` JSON); the client signs with placeholder keys.
    #[serde(rename = "awsSigV4")]
    AwsSigV4 {
        region: String,
        service: String,
        /// As for `http`: only requests whose `Host` is this are signed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        authority: Option<String>,
    },
    /// PostgreSQL: the agent answers the server's authentication exchange
    /// (SCRAM-SHA-256, md5 or cleartext) as `user`, whatever user the
    /// client named, then relays the session unchanged.
    Postgresql { user: String },
}

impl InjectProtocol {
    pub fn name(&self) -> &'static str {
        match self {
            InjectProtocol::Http { .. } => "http",
            InjectProtocol::Redis { .. } => "redis",
            InjectProtocol::Postgresql { .. } => "postgresql",
            InjectProtocol::AwsSigV4 { .. } => "awsSigV4",
        }
    }
}

/// How an HTTP header carries the credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum HttpScheme {
    /// `Bearer <value>`.
    Bearer,
    /// `Basic <base64(value)>`; the value is `user:password`.
    Basic,
    /// The value as it is.
    Raw,
}

impl HttpScheme {
    fn as_str(self) -> &'static str {
        match self {
            HttpScheme::Bearer => "bearer",
            HttpScheme::Basic => "basic",
            HttpScheme::Raw => "raw",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawSource {
    #[serde(rename = "static")]
    static_: Option<RawStatic>,
    x509_svid: Option<RawEmpty>,
    jwt_svid: Option<RawJwt>,
    aws_sts: Option<RawSts>,
    oauth2: Option<RawOAuth>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEmpty {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStatic {
    value: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawJwt {
    #[serde(default)]
    audience: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawSts {
    role_arn: Option<String>,
    audience: Option<String>,
    duration: Option<String>,
    endpoint: Option<String>,
    region: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawOAuth {
    token_endpoint: Option<String>,
    grant: Option<String>,
    client_id: Option<String>,
    audience: Option<String>,
    #[serde(default)]
    scope: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBinding {
    identity: Option<String>,
    source: Option<String>,
    file: Option<RawFile>,
    inject: Option<RawInject>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawInject {
    service: Option<String>,
    http: Option<RawHttp>,
    redis: Option<RawRedis>,
    postgresql: Option<RawPostgres>,
    #[serde(rename = "awsSigV4")]
    aws_sig_v4: Option<RawSigV4>,
    tls: Option<RawTls>,
    intercept: Option<RawIntercept>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawIntercept {
    ca_file: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSigV4 {
    region: Option<String>,
    service: Option<String>,
    authority: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPostgres {
    user: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawTls {
    server_name: Option<String>,
    ca: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHttp {
    header: Option<String>,
    scheme: Option<String>,
    authority: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRedis {
    user: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFile {
    name: Option<String>,
    format: Option<String>,
    mode: Option<String>,
}

type FieldError = (String, String);

/// Longest OAuth client id accepted.
const MAX_CLIENT_ID: usize = 255;

/// Whether Tether may sign client assertions as `client_id`. Never a
/// SPIFFE ID: the assertion is signed with the trust domain's JWT-SVID key
/// and its `sub` is the client id, so a SPIFFE ID there would make it a
/// JWT-SVID of that identity. The server checks this again before signing.
pub fn client_id_allowed(client_id: &str) -> Result<(), String> {
    if client_id.len() > MAX_CLIENT_ID || client_id.chars().any(char::is_control) {
        return Err(format!(
            "at most {MAX_CLIENT_ID} bytes, no control characters"
        ));
    }
    if client_id
        .get(..9)
        .is_some_and(|p| p.eq_ignore_ascii_case("spiffe://"))
    {
        return Err(format!(
            "{client_id:?} is a SPIFFE ID; a client assertion for it would be a JWT-SVID of that identity"
        ));
    }
    Ok(())
}

fn missing(field: &str) -> FieldError {
    (field.to_owned(), "missing".into())
}

/// An endpoint the agent or server calls: https, or http to a loopback
/// host only (a local test server or a sidecar never leaves the machine).
fn endpoint(field: &str, url: Option<String>) -> Result<String, FieldError> {
    let url = url.ok_or_else(|| missing(field))?;
    let bad = |why: &str| (field.to_owned(), format!("{url:?}: {why}"));
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("not a URL (scheme://host[:port]/path)"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') {
        return Err(bad("needs a host, and no user info"));
    }
    // [v6]:port, host:port or host.
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback());
    match scheme {
        "https" => Ok(url),
        "http" if loopback => Ok(url),
        "http" => Err(bad("plain http only to a loopback host; use https")),
        _ => Err(bad("use https")),
    }
}

fn nonempty(field: &str, v: Option<String>) -> Result<String, FieldError> {
    match v {
        Some(s) if !s.trim().is_empty() => Ok(s),
        Some(_) => Err((field.to_owned(), "must not be empty".into())),
        None => Err(missing(field)),
    }
}

pub(crate) fn validate_source(raw: RawSource) -> Result<CredentialSourceSpec, FieldError> {
    let given = [
        raw.static_.is_some(),
        raw.x509_svid.is_some(),
        raw.jwt_svid.is_some(),
        raw.aws_sts.is_some(),
        raw.oauth2.is_some(),
    ]
    .iter()
    .filter(|g| **g)
    .count();
    if given != 1 {
        return Err((
            "spec".into(),
            format!("give exactly one of static, x509Svid, jwtSvid, awsSts, oauth2 (got {given})"),
        ));
    }
    if let Some(s) = raw.static_ {
        let value = s.value.ok_or_else(|| missing("spec.static.value"))?;
        if value.is_empty() || value.len() > MAX_STATIC_BYTES {
            return Err((
                "spec.static.value".into(),
                format!("must be 1 to {MAX_STATIC_BYTES} bytes"),
            ));
        }
        return Ok(CredentialSourceSpec::Static { value });
    }
    if raw.x509_svid.is_some() {
        return Ok(CredentialSourceSpec::X509Svid {});
    }
    if let Some(j) = raw.jwt_svid {
        if j.audience.is_empty() {
            return Err(missing("spec.jwtSvid.audience"));
        }
        if let Some(i) = j.audience.iter().position(|a| a.trim().is_empty()) {
            return Err((
                format!("spec.jwtSvid.audience[{i}]"),
                "must not be empty".into(),
            ));
        }
        return Ok(CredentialSourceSpec::JwtSvid {
            audience: j.audience,
        });
    }
    if let Some(s) = raw.aws_sts {
        let role_arn = nonempty("spec.awsSts.roleArn", s.role_arn)?;
        if !role_arn.starts_with("arn:") || !role_arn.contains(":role/") {
            return Err((
                "spec.awsSts.roleArn".into(),
                format!("{role_arn:?} is not a role ARN (arn:PARTITION:iam::ACCOUNT:role/NAME)"),
            ));
        }
        let duration_secs = match s.duration {
            None => 3600,
            Some(d) => parse_duration(&d).map_err(|m| ("spec.awsSts.duration".into(), m))?,
        };
        if !(STS_MIN_SECS..=STS_MAX_SECS).contains(&duration_secs) {
            return Err((
                "spec.awsSts.duration".into(),
                "must be between 15m and 12h (what STS accepts)".into(),
            ));
        }
        return Ok(CredentialSourceSpec::AwsSts {
            role_arn,
            audience: s.audience.unwrap_or_else(|| "sts.amazonaws.com".into()),
            duration_secs,
            endpoint: endpoint("spec.awsSts.endpoint", s.endpoint)?,
            region: nonempty("spec.awsSts.region", s.region)?,
        });
    }
    let Some(o) = raw.oauth2 else {
        return Err(("spec".into(), "no source given".into()));
    };
    let token_endpoint = endpoint("spec.oauth2.tokenEndpoint", o.token_endpoint)?;
    let grant = match o.grant.as_deref() {
        Some("clientCredentials") => OAuthGrant::ClientCredentials,
        Some("tokenExchange") => OAuthGrant::TokenExchange,
        Some(other) => {
            return Err((
                "spec.oauth2.grant".into(),
                format!("{other:?}: use clientCredentials or tokenExchange"),
            ));
        }
        None => return Err(missing("spec.oauth2.grant")),
    };
    let client_id = match grant {
        OAuthGrant::ClientCredentials => nonempty("spec.oauth2.clientId", o.client_id)?,
        OAuthGrant::TokenExchange => o.client_id.unwrap_or_default(),
    };
    client_id_allowed(&client_id).map_err(|m| ("spec.oauth2.clientId".to_owned(), m))?;
    if let Some(i) = o.scope.iter().position(|s| s.is_empty() || s.contains(' ')) {
        return Err((
            format!("spec.oauth2.scope[{i}]"),
            "one scope token per entry, without spaces".into(),
        ));
    }
    Ok(CredentialSourceSpec::OAuth2 {
        token_endpoint,
        grant,
        client_id,
        audience: o.audience.unwrap_or_default(),
        scope: o.scope,
    })
}

pub(crate) fn validate_binding(raw: RawBinding) -> Result<CredentialBindingSpec, FieldError> {
    let identity = raw.identity.ok_or_else(|| missing("spec.identity"))?;
    validate_name(&identity).map_err(|m| ("spec.identity".to_owned(), m))?;
    let source = raw.source.ok_or_else(|| missing("spec.source"))?;
    validate_name(&source).map_err(|m| ("spec.source".to_owned(), m))?;
    let inject = raw.inject.map(validate_inject).transpose()?;
    let file = match raw.file {
        Some(f) => Some(validate_file(f)?),
        None if inject.is_some() => None,
        None => {
            return Err((
                "spec".into(),
                "a binding delivers by file, inject, or both: give at least one".into(),
            ));
        }
    };
    Ok(CredentialBindingSpec {
        identity,
        source,
        file,
        inject,
    })
}

/// Longest header name or ACL user name accepted.
const MAX_TOKEN: usize = 128;

fn validate_inject(raw: RawInject) -> Result<Injection, FieldError> {
    let service = raw.service.ok_or_else(|| missing("spec.inject.service"))?;
    validate_name(&service).map_err(|m| ("spec.inject.service".to_owned(), m))?;
    let tls = raw.tls.map(validate_tls).transpose()?;
    let intercept = match raw.intercept {
        None => None,
        Some(_) if raw.http.is_none() => {
            return Err((
                "spec.inject.intercept".into(),
                "only HTTP is intercepted (with http)".into(),
            ));
        }
        Some(x) => {
            let name = x
                .ca_file
                .ok_or_else(|| missing("spec.inject.intercept.caFile"))?;
            file_name("spec.inject.intercept.caFile", &name)?;
            Some(Intercept { ca_file: name })
        }
    };
    let given = [
        raw.http.is_some(),
        raw.redis.is_some(),
        raw.postgresql.is_some(),
        raw.aws_sig_v4.is_some(),
    ];
    if given.iter().filter(|g| **g).count() > 1 {
        return Err((
            "spec.inject".into(),
            "exactly one protocol (http, redis, postgresql or awsSigV4)".into(),
        ));
    }
    if let Some(a) = raw.aws_sig_v4 {
        let word = |field: &str, v: Option<String>| -> Result<String, FieldError> {
            let v = v.ok_or_else(|| missing(field))?;
            if v.is_empty()
                || v.len() > 64
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err((
                    field.into(),
                    format!("{v:?}: lowercase letters, digits and '-'"),
                ));
            }
            Ok(v)
        };
        let region = word("spec.inject.awsSigV4.region", a.region)?;
        let svc = word("spec.inject.awsSigV4.service", a.service)?;
        // Services whose answers are credentials: a bound process could
        // have the agent sign a request that mints keys it then reads.
        if [
            "sts",
            "iam",
            "sso",
            "sso-oauth",
            "s3express",
            "signin",
            "cognito-identity",
        ]
        .contains(&svc.as_str())
        {
            return Err((
                "spec.inject.awsSigV4.service".into(),
                format!("{svc:?} answers with credentials; it is not signed for a workload"),
            ));
        }
        return Ok(Injection {
            service,
            protocol: InjectProtocol::AwsSigV4 {
                region,
                service: svc,
                authority: checked_authority("spec.inject.awsSigV4.authority", a.authority)?,
            },
            tls,
            intercept,
        });
    }
    if let Some(p) = raw.postgresql {
        let user = p
            .user
            .ok_or_else(|| missing("spec.inject.postgresql.user"))?;
        // NAMEDATALEN - 1; a NUL would end the startup packet's string.
        if user.is_empty() || user.len() > 63 || user.contains('\0') {
            return Err((
                "spec.inject.postgresql.user".into(),
                format!("{user:?}: 1 to 63 bytes, no NUL"),
            ));
        }
        return Ok(Injection {
            service,
            protocol: InjectProtocol::Postgresql { user },
            tls,
            intercept,
        });
    }
    let protocol = match (raw.http, raw.redis) {
        (Some(h), None) => {
            let header = h.header.unwrap_or_else(|| "Authorization".into());
            // An RFC 9110 token; never a header that frames the message or
            // names the hop, which would let the credential rewrite them.
            let token = !header.is_empty()
                && header.len() <= MAX_TOKEN
                && header
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            let framing = [
                "content-length",
                "transfer-encoding",
                "host",
                "connection",
                "upgrade",
                "te",
                "trailer",
                "expect",
            ]
            .contains(&header.to_ascii_lowercase().as_str());
            if !token || framing {
                return Err((
                    "spec.inject.http.header".into(),
                    format!(
                        "{header:?}: a header name (RFC 9110 token), not one that frames the message"
                    ),
                ));
            }
            let scheme = match h.scheme.as_deref().unwrap_or("bearer") {
                "bearer" => HttpScheme::Bearer,
                "basic" => HttpScheme::Basic,
                "raw" => HttpScheme::Raw,
                other => {
                    return Err((
                        "spec.inject.http.scheme".into(),
                        format!("{other:?}: use bearer, basic or raw"),
                    ));
                }
            };
            InjectProtocol::Http {
                header,
                scheme,
                authority: checked_authority("spec.inject.http.authority", h.authority)?,
            }
        }
        (None, Some(r)) => {
            if let Some(u) = &r.user
                && (u.is_empty()
                    || u.len() > MAX_TOKEN
                    || u.bytes()
                        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control()))
            {
                return Err((
                    "spec.inject.redis.user".into(),
                    format!("{u:?}: 1 to {MAX_TOKEN} bytes, no spaces or control characters"),
                ));
            }
            InjectProtocol::Redis { user: r.user }
        }
        (None, None) => {
            return Err((
                "spec.inject".into(),
                "name the protocol: http, redis or postgresql".into(),
            ));
        }
        _ => {
            return Err((
                "spec.inject".into(),
                "exactly one protocol (http, redis or postgresql)".into(),
            ));
        }
    };
    Ok(Injection {
        service,
        protocol,
        tls,
        intercept,
    })
}

/// A `Host` value (host[:port]) requests must carry.
fn checked_authority(field: &str, a: Option<String>) -> Result<Option<String>, FieldError> {
    if let Some(v) = &a
        && (v.is_empty()
            || v.len() > 261
            || !v
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b)))
    {
        return Err((
            field.into(),
            format!("{v:?}: host[:port], as the Host header carries it"),
        ));
    }
    Ok(a)
}

/// Longest CA bundle accepted in a binding.
const MAX_CA_PEM: usize = 64 * 1024;

fn validate_tls(raw: RawTls) -> Result<UpstreamTls, FieldError> {
    if let Some(n) = &raw.server_name {
        let ok = !n.is_empty()
            && n.len() <= 253
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b));
        if !ok {
            return Err((
                "spec.inject.tls.serverName".into(),
                format!("{n:?}: a DNS name or an IP address"),
            ));
        }
    }
    if let Some(ca) = &raw.ca
        && (ca.len() > MAX_CA_PEM || !ca.contains("-----BEGIN CERTIFICATE-----"))
    {
        return Err((
            "spec.inject.tls.ca".into(),
            format!("PEM certificates, at most {MAX_CA_PEM} bytes"),
        ));
    }
    Ok(UpstreamTls {
        server_name: raw.server_name,
        ca: raw.ca,
    })
}

/// A name in the credential filesystem's one directory.
fn file_name(field: &str, name: &str) -> Result<(), FieldError> {
    if name.is_empty()
        || name.len() > 255
        || name == "."
        || name == ".."
        || name.contains(['/', '\0'])
    {
        return Err((
            field.into(),
            format!("{name:?}: a file name of 1 to 255 bytes, without '/'"),
        ));
    }
    Ok(())
}

fn validate_file(f: RawFile) -> Result<CredentialFile, FieldError> {
    let name = f.name.ok_or_else(|| missing("spec.file.name"))?;
    file_name("spec.file.name", &name)?;
    let format = match f.format.as_deref().unwrap_or("raw") {
        "raw" => FileFormat::Raw,
        "pem" => FileFormat::Pem,
        "json" => FileFormat::Json,
        "env" => FileFormat::Env,
        other => {
            return Err((
                "spec.file.format".into(),
                format!("{other:?}: use raw, pem, json or env"),
            ));
        }
    };
    let mode_text = f.mode.unwrap_or_else(|| "0400".into());
    let mode = u32::from_str_radix(mode_text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| {
            (
                "spec.file.mode".to_owned(),
                format!("{mode_text:?}: an octal mode such as \"0400\""),
            )
        })?;
    // A credential is read, never executed, and only its process may
    // write over it.
    if mode & 0o111 != 0 || mode & 0o022 != 0 || mode & 0o400 == 0 {
        return Err((
            "spec.file.mode".into(),
            format!(
                "{mode_text:?}: readable by the owner, no execute bits, no write for group or others"
            ),
        ));
    }
    Ok(CredentialFile { name, format, mode })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Resource, parse};

    fn doc(kind: &str, spec: &str) -> String {
        format!(
            "apiVersion: tether.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: c1}}\nspec:\n{spec}\n"
        )
    }

    /// The error's field path for `spec` of `kind`.
    fn field_of(kind: &str, spec: &str) -> String {
        match parse("t.yaml", doc(kind, spec).as_bytes()) {
            Ok(r) => panic!("accepted {r:?}"),
            Err(e) => e.field,
        }
    }

    fn one(kind: &str, spec: &str) -> Resource {
        parse("t.yaml", doc(kind, spec).as_bytes())
            .unwrap_or_else(|e| panic!("{e}"))
            .remove(0)
    }

    #[test]
    fn every_source_kind_parses_and_writes_back_as_a_manifest() {
        let cases = [
            "  static: {value: hunter2}",
            "  x509Svid: {}",
            "  jwtSvid: {audience: [sts.amazonaws.com]}",
            "  awsSts: {roleArn: 'arn:aws:iam::123456789012:role/app', duration: 1h, endpoint: 'http://127.0.0.1:5000', region: us-east-1}",
            "  oauth2: {tokenEndpoint: 'https://idp.example/token', grant: clientCredentials, clientId: app, scope: [read, write]}",
            "  oauth2: {tokenEndpoint: 'https://idp.example/token', grant: tokenExchange, audience: api}",
        ];
        for spec in cases {
            let r = one("CredentialSource", spec);
            let yaml = r.to_yaml();
            assert!(
                !yaml.contains("hunter2"),
                "a static value is never output:\n{yaml}"
            );
            if !spec.contains("static") {
                let again = parse("out.yaml", yaml.as_bytes())
                    .unwrap_or_else(|e| panic!("{e}\n{yaml}"))
                    .remove(0);
                assert_eq!(again, r, "{yaml}");
            }
            let stored = Resource::from_stored(r.kind(), r.name(), &r.spec_json()).expect("stored");
            assert_eq!(stored, r);
        }
        match one("CredentialSource", cases[3]) {
            Resource::CredentialSource {
                spec:
                    CredentialSourceSpec::AwsSts {
                        duration_secs,
                        audience,
                        ..
                    },
                ..
            } => assert_eq!(
                (duration_secs, audience.as_str()),
                (3600, "sts.amazonaws.com")
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_sources_name_the_field() {
        let cases = [
            ("  x509Svid: {}\n  jwtSvid: {audience: [a]}", "spec"),
            ("  {}", "spec"),
            ("  static: {}", "spec.static.value"),
            ("  static: {value: ''}", "spec.static.value"),
            ("  jwtSvid: {audience: []}", "spec.jwtSvid.audience"),
            (
                "  jwtSvid: {audience: [a, ' ']}",
                "spec.jwtSvid.audience[1]",
            ),
            (
                "  awsSts: {roleArn: 'arn:aws:iam::1:user/x', endpoint: 'https://sts', region: r}",
                "spec.awsSts.roleArn",
            ),
            (
                "  awsSts: {roleArn: 'arn:aws:iam::1:role/x', duration: 5m, endpoint: 'https://sts', region: r}",
                "spec.awsSts.duration",
            ),
            (
                "  awsSts: {roleArn: 'arn:aws:iam::1:role/x', endpoint: 'http://sts.example', region: r}",
                "spec.awsSts.endpoint",
            ),
            (
                "  awsSts: {roleArn: 'arn:aws:iam::1:role/x', endpoint: 'ftp://x', region: r}",
                "spec.awsSts.endpoint",
            ),
            (
                "  awsSts: {roleArn: 'arn:aws:iam::1:role/x', endpoint: 'https://u@sts', region: r}",
                "spec.awsSts.endpoint",
            ),
            (
                "  awsSts: {roleArn: 'arn:aws:iam::1:role/x', endpoint: 'https://sts'}",
                "spec.awsSts.region",
            ),
            (
                "  oauth2: {tokenEndpoint: 'https://idp/token', grant: password}",
                "spec.oauth2.grant",
            ),
            (
                "  oauth2: {tokenEndpoint: 'https://idp/token', grant: clientCredentials}",
                "spec.oauth2.clientId",
            ),
            (
                "  oauth2: {tokenEndpoint: 'https://idp/token', grant: tokenExchange, scope: ['a b']}",
                "spec.oauth2.scope[0]",
            ),
            (
                "  oauth2: {tokenEndpoint: 'https://idp/token', grant: clientCredentials, clientId: 'SPIFFE://example.org/admin'}",
                "spec.oauth2.clientId",
            ),
            ("  static: {value: x, extra: 1}", "spec"),
        ];
        for (spec, want) in cases {
            assert_eq!(field_of("CredentialSource", spec), want, "{spec}");
        }
        // Loopback http is allowed (a local server never leaves the host).
        for ok in [
            "http://localhost:5000/",
            "http://[::1]:5000",
            "http://127.0.0.9",
        ] {
            let spec = format!(
                "  awsSts: {{roleArn: 'arn:aws:iam::1:role/x', endpoint: '{ok}', region: r}}"
            );
            one("CredentialSource", &spec);
        }
    }

    #[test]
    fn injection_bindings_parse_write_back_and_name_bad_fields() {
        for (spec, want) in [
            (
                "  identity: app\n  source: tok\n  inject: {service: web, http: {}}",
                InjectProtocol::Http {
                    header: "Authorization".into(),
                    scheme: HttpScheme::Bearer,
                    authority: None,
                },
            ),
            (
                "  identity: app\n  source: tok\n  inject: {service: web, http: {}, intercept: {caFile: web-ca}}",
                InjectProtocol::Http {
                    header: "Authorization".into(),
                    scheme: HttpScheme::Bearer,
                    authority: None,
                },
            ),
            (
                "  identity: app\n  source: tok\n  inject: {service: web, http: {header: X-Api-Key, scheme: raw, authority: 'api.example:8443'}}",
                InjectProtocol::Http {
                    header: "X-Api-Key".into(),
                    scheme: HttpScheme::Raw,
                    authority: Some("api.example:8443".into()),
                },
            ),
            (
                "  identity: app\n  source: aws\n  inject: {service: s3, awsSigV4: {region: us-east-1, service: s3, authority: 's3.internal:9000'}}",
                InjectProtocol::AwsSigV4 {
                    region: "us-east-1".into(),
                    service: "s3".into(),
                    authority: Some("s3.internal:9000".into()),
                },
            ),
            (
                "  identity: app\n  source: pw\n  inject: {service: cache, redis: {user: app}}",
                InjectProtocol::Redis {
                    user: Some("app".into()),
                },
            ),
            (
                "  identity: app\n  source: pw\n  inject: {service: db, postgresql: {user: app}, tls: {serverName: db.internal, ca: \"-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\\n\"}}",
                InjectProtocol::Postgresql { user: "app".into() },
            ),
        ] {
            let r = one("CredentialBinding", spec);
            let Resource::CredentialBinding { spec: got, .. } = &r else {
                panic!("{r:?}");
            };
            assert_eq!(got.inject.as_ref().map(|i| &i.protocol), Some(&want));
            assert!(got.file.is_none());
            // What `tether get -o yaml` prints applies again, unchanged.
            let again = crate::parse("again", r.to_yaml().as_bytes()).expect("reparse");
            assert_eq!(again, vec![r.clone()], "{}", r.to_yaml());
        }
        for (spec, want) in [
            (
                "  identity: app\n  source: tok\n  inject: {http: {}}",
                "spec.inject.service",
            ),
            (
                "  identity: app\n  source: tok\n  inject: {service: web}",
                "spec.inject",
            ),
            (
                "  identity: app\n  source: tok\n  inject: {service: web, http: {}, redis: {}}",
                "spec.inject",
            ),
            (
                "  identity: app\n  source: tok\n  inject: {service: web, http: {header: Content-Length}}",
                "spec.inject.http.header",
            ),
            (
                "  identity: app\n  source: tok\n  inject: {service: web, http: {header: 'X Y'}}",
                "spec.inject.http.header",
            ),
            (
                "  identity: app\n  source: tok\n  inject: {service: web, http: {scheme: digest}}",
                "spec.inject.http.scheme",
            ),
            (
                "  identity: app\n  source: tok\n  inject: {service: web, http: {authority: 'a b'}}",
                "spec.inject.http.authority",
            ),
            (
                "  identity: app\n  source: tok\n  inject: {service: web, redis: {user: 'a b'}}",
                "spec.inject.redis.user",
            ),
            (
                "  identity: app\n  source: tok\n  inject: {service: db, postgresql: {}}",
                "spec.inject.postgresql.user",
            ),
            (
                "  identity: app\n  source: tok\n  inject: {service: s3, awsSigV4: {region: us-east-1}}",
                "spec.inject.awsSigV4.service",
            ),
            (
                "  identity: app\n  source: tok\n  inject: {service: s3, awsSigV4: {region: us-east-1, service: sts}}",
                "spec.inject.awsSigV4.service",
            ),
            (
                "  identity: app\n  source: tok\n  inject: {service: db, redis: {}, intercept: {caFile: ca}}",
                "spec.inject.intercept",
            ),
            (
                "  identity: app\n  source: tok\n  inject: {service: web, http: {}, intercept: {caFile: ../ca}}",
                "spec.inject.intercept.caFile",
            ),
            (
                "  identity: app\n  source: tok\n  inject: {service: db, postgresql: {user: a}, tls: {ca: nope}}",
                "spec.inject.tls.ca",
            ),
            (
                "  identity: app\n  source: tok\n  inject: {service: db, postgresql: {user: a}, tls: {serverName: 'a b'}}",
                "spec.inject.tls.serverName",
            ),
        ] {
            assert_eq!(field_of("CredentialBinding", spec), want, "{spec}");
        }
    }

    #[test]
    fn bindings_validate_names_files_and_modes() {
        let r = one(
            "CredentialBinding",
            "  identity: app\n  source: db\n  file: {name: db-password, format: env, mode: '0440'}",
        );
        let Resource::CredentialBinding { spec, .. } = &r else {
            panic!("{r:?}")
        };
        let file = spec.file.clone().expect("file");
        assert_eq!((file.format, file.mode), (FileFormat::Env, 0o440));
        let again = parse("out.yaml", r.to_yaml().as_bytes())
            .expect("round trip")
            .remove(0);
        assert_eq!(again, r);
        let defaults = one(
            "CredentialBinding",
            "  identity: app\n  source: db\n  file: {name: pw}",
        );
        let Resource::CredentialBinding { spec, .. } = defaults else {
            panic!()
        };
        let file = spec.file.expect("file");
        assert_eq!((file.format, file.mode), (FileFormat::Raw, 0o400));

        let cases = [
            ("  source: db\n  file: {name: pw}", "spec.identity"),
            (
                "  identity: App_1\n  source: db\n  file: {name: pw}",
                "spec.identity",
            ),
            ("  identity: app\n  file: {name: pw}", "spec.source"),
            ("  identity: app\n  source: db", "spec"),
            (
                "  identity: app\n  source: db\n  file: {name: ../pw}",
                "spec.file.name",
            ),
            (
                "  identity: app\n  source: db\n  file: {name: '..'}",
                "spec.file.name",
            ),
            (
                "  identity: app\n  source: db\n  file: {name: pw, format: xml}",
                "spec.file.format",
            ),
            (
                "  identity: app\n  source: db\n  file: {name: pw, mode: '0755'}",
                "spec.file.mode",
            ),
            (
                "  identity: app\n  source: db\n  file: {name: pw, mode: '0666'}",
                "spec.file.mode",
            ),
            (
                "  identity: app\n  source: db\n  file: {name: pw, mode: '0200'}",
                "spec.file.mode",
            ),
            (
                "  identity: app\n  source: db\n  file: {name: pw, mode: rw}",
                "spec.file.mode",
            ),
        ];
        for (spec, want) in cases {
            assert_eq!(field_of("CredentialBinding", spec), want, "{spec}");
        }
    }
}
