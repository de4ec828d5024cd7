//! Token exchange for the credential filesystem: AWS STS
//! `AssumeRoleWithWebIdentity` and OAuth2 token endpoints (client
//! credentials with an RFC 7523 client assertion, RFC 8693 token exchange),
//! performed by the agent with the reading process's identity.
//!
//! Why the agent and not the server: the result is a credential of one
//! process instance, cached next to it and dropped when it exits; the call
//! leaves from the node the workload runs on (its egress, its network
//! policy), and exchanges scale with nodes instead of converging on the
//! control plane. The server only signs what proves the identity (the
//! JWT-SVID, the client assertion), on an entitled node's request, and never
//! sees the cloud or OAuth credential it is exchanged for. The JWT-SVID
//! used here stays in the agent: a process receives it only through a
//! jwtSvid binding of its own.
//!
//! Every response is untrusted: bodies are bounded, parsed by a real XML or
//! JSON parser, and a value that does not parse, or parses to nothing
//! usable, is an error that names the endpoint and field. Nothing of a bad
//! response is ever delivered.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use zeroize::Zeroizing;

/// Longest response body read from a token endpoint.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Longest token or key accepted from a response.
const MAX_VALUE_BYTES: usize = 16 * 1024;
/// Connect, TLS, request and response together.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// A token response without `expires_in` is refreshed after this long.
const DEFAULT_TOKEN_SECS: i64 = 300;

pub const STS_VERSION: &str = "2011-06-15";
pub const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const ASSERTION_TYPE_JWT_BEARER: &str =
    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Why an exchange failed. `Refused` is the upstream's considered no (an
/// error document in a 4xx answer that is not about load or a passing
/// failure): the last value goes at once. The others keep the last good
/// value until it expires.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("{endpoint}: unreachable: {msg}")]
    Unreachable { endpoint: String, msg: String },
    #[error("{endpoint}: refused ({status}): {code}: {message}")]
    Refused {
        endpoint: String,
        status: u16,
        code: String,
        message: String,
    },
    /// Throttled or passing trouble upstream, said in a 4xx (STS answers
    /// `Throttling` with 400).
    #[error("{endpoint}: unavailable for now ({status}): {code}: {message}")]
    Transient {
        endpoint: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error("{endpoint}: bad response ({status}): {msg}")]
    BadResponse {
        endpoint: String,
        status: u16,
        msg: String,
    },
}

impl ExchangeError {
    pub fn refused(&self) -> bool {
        matches!(self, ExchangeError::Refused { .. })
    }
}

pub use tether_tls::system_roots;

/// An HTTP/1.1 client for token endpoints: one request per connection (a
/// refresh is rare), https with the system's roots (`SSL_CERT_FILE` and
/// `SSL_CERT_DIR` are honoured), or http to loopback, which manifest
/// validation alone allows.
pub struct Upstream {
    tls: tokio_rustls::TlsConnector,
}

impl Upstream {
    pub fn new() -> Result<Self, rustls::Error> {
        let roots = system_roots();
        let cfg = rustls::ClientConfig::builder_with_provider(tether_tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Upstream {
            tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
        })
    }

    /// POSTs a form to `url`, asking for `accept` (AWS query APIs answer
    /// JSON instead of XML when asked for it); the status and body (at most
    /// [`MAX_RESPONSE_BYTES`]).
    pub async fn post_form(
        &self,
        url: &str,
        form: &[(&str, &str)],
        accept: &'static str,
    ) -> Result<(u16, Bytes), ExchangeError> {
        match tokio::time::timeout(EXCHANGE_TIMEOUT, self.post(url, form, accept)).await {
            Ok(r) => r,
            Err(_) => Err(unreachable(
                url,
                format!("no answer in {EXCHANGE_TIMEOUT:?}"),
            )),
        }
    }

    async fn post(
        &self,
        url: &str,
        form: &[(&str, &str)],
        accept: &'static str,
    ) -> Result<(u16, Bytes), ExchangeError> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| unreachable(url, format!("not a URL: {e}")))?;
        let host = uri
            .host()
            .ok_or_else(|| unreachable(url, "no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(unreachable(url, "scheme must be https or http".into())),
        };
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| unreachable(url, format!("connecting: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let authority = uri.authority().map_or(host.clone(), |a| a.to_string());
        let req = hyper::Request::post(path)
            .header(hyper::header::HOST, authority)
            .header(
                hyper::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(hyper::header::ACCEPT, accept)
            .header(hyper::header::USER_AGENT, "tether-agent")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| unreachable(url, format!("building the request: {e}")))?;
        if tls {
            let name = rustls_pki_types::ServerName::try_from(host.clone())
                .map_err(|e| unreachable(url, format!("server name {host:?}: {e}")))?;
            let stream = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|e| unreachable(url, format!("TLS: {e}")))?;
            send(url, TokioIo::new(stream), req).await
        } else {
            send(url, TokioIo::new(tcp), req).await
        }
    }
}

async fn send<T>(
    url: &str,
    io: T,
    req: hyper::Request<Full<Bytes>>,
) -> Result<(u16, Bytes), ExchangeError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| unreachable(url, format!("HTTP: {e}")))?;
    let conn = tokio::spawn(conn);
    let resp = sender.send_request(req).await;
    let result = async {
        let resp = resp.map_err(|e| unreachable(url, format!("HTTP: {e}")))?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| ExchangeError::BadResponse {
                endpoint: url.to_owned(),
                status,
                msg: format!("body: {e} (at most {MAX_RESPONSE_BYTES} bytes)"),
            })?
            .to_bytes();
        Ok((status, body))
    }
    .await;
    conn.abort();
    result
}

fn unreachable(url: &str, msg: String) -> ExchangeError {
    ExchangeError::Unreachable {
        endpoint: url.to_owned(),
        msg,
    }
}

/// The first element named `name` at or under `node`.
fn find_in<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.descendants()
        .find(|n| n.is_element() && n.tag_name().name() == name)
}

/// Temporary AWS credentials from STS.
#[derive(Clone, PartialEq, Eq)]
pub struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: Zeroizing<String>,
    pub session_token: Zeroizing<String>,
    /// Unix seconds.
    pub expiration: i64,
}

impl std::fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("expiration", &self.expiration)
            .finish_non_exhaustive()
    }
}

/// The form of an `AssumeRoleWithWebIdentity` call (unsigned: the token is
/// the authentication).
pub fn sts_form<'a>(
    role_arn: &'a str,
    session_name: &'a str,
    token: &'a str,
    duration: &'a str,
) -> [(&'static str, &'a str); 6] {
    [
        ("Action", "AssumeRoleWithWebIdentity"),
        ("Version", STS_VERSION),
        ("RoleArn", role_arn),
        ("RoleSessionName", session_name),
        ("WebIdentityToken", token),
        ("DurationSeconds", duration),
    ]
}

/// A RoleSessionName (2 to 64 of `[\w+=,.@-]`) naming the identity and
/// process, so CloudTrail shows which process assumed the role.
pub fn session_name(identity: &str, pid: i32) -> String {
    let mut s: String = format!("tether-{identity}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(50)
        .collect();
    s.push_str(&format!("-{pid}"));
    s
}

/// Parses an STS answer: the credentials of a 200, or the error document
/// of a 4xx as [`ExchangeError::Refused`].
pub fn parse_sts(
    endpoint: &str,
    status: u16,
    body: &[u8],
) -> Result<AwsCredentials, ExchangeError> {
    let bad = |msg: String| ExchangeError::BadResponse {
        endpoint: endpoint.to_owned(),
        status,
        msg,
    };
    let text = std::str::from_utf8(body).map_err(|_| bad("body is not UTF-8".into()))?;
    let doc = roxmltree::Document::parse_with_options(
        text,
        roxmltree::ParsingOptions {
            allow_dtd: false,
            ..Default::default()
        },
    )
    .map_err(|e| bad(format!("body is not XML: {e}")))?;
    let find = |name: &str| find_in(doc.root(), name);
    let creds = || find("Credentials");
    let text_of = |name: &'static str| -> Result<&str, ExchangeError> {
        let v = creds()
            .and_then(|c| find_in(c, name))
            .and_then(|n| n.text())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| bad(format!("{name} is missing")))?;
        if v.len() > MAX_VALUE_BYTES {
            return Err(bad(format!("{name} is over {MAX_VALUE_BYTES} bytes")));
        }
        Ok(v)
    };
    if status != 200 {
        let code = find("Code").and_then(|n| n.text()).map(str::trim);
        let message = find("Message").and_then(|n| n.text()).map(str::trim);
        return match code {
            Some(code) if (400..500).contains(&status) => Err(client_error(
                endpoint,
                status,
                code,
                message.unwrap_or(""),
                STS_TRANSIENT.contains(&code),
            )),
            _ => Err(bad(format!(
                "error {}: {}",
                clip(code.unwrap_or("(no code)")),
                clip(message.unwrap_or(""))
            ))),
        };
    }
    if creds().is_none() {
        return Err(bad("Credentials is missing".into()));
    }
    let access_key_id = text_of("AccessKeyId")?;
    if !access_key_id.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(bad("AccessKeyId is not alphanumeric".into()));
    }
    let secret = text_of("SecretAccessKey")?;
    let token = text_of("SessionToken")?;
    for (name, v) in [("SecretAccessKey", secret), ("SessionToken", token)] {
        if v.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(bad(format!(
                "{name} holds whitespace or control characters"
            )));
        }
    }
    let exp = text_of("Expiration")?;
    let expiration =
        time::OffsetDateTime::parse(exp, &time::format_description::well_known::Rfc3339)
            .map_err(|e| bad(format!("Expiration {:?}: {e}", clip(exp))))?
            .unix_timestamp();
    Ok(AwsCredentials {
        access_key_id: access_key_id.to_owned(),
        secret_access_key: Zeroizing::new(secret.to_owned()),
        session_token: Zeroizing::new(token.to_owned()),
        expiration,
    })
}

/// An OAuth2 access token and when it expires (unix seconds).
pub struct OAuthToken {
    pub access_token: Zeroizing<String>,
    pub expires_at: i64,
}

impl std::fmt::Debug for OAuthToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthToken")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
    error: Option<String>,
    error_description: Option<String>,
}

/// Parses a token endpoint's answer (RFC 6749 5.1 and 5.2, RFC 8693 2.2):
/// the token of a 200, or the error of a 4xx as [`ExchangeError::Refused`].
pub fn parse_token(
    endpoint: &str,
    status: u16,
    body: &[u8],
    now: i64,
) -> Result<OAuthToken, ExchangeError> {
    let bad = |msg: String| ExchangeError::BadResponse {
        endpoint: endpoint.to_owned(),
        status,
        msg,
    };
    let r: TokenResponse = serde_json::from_slice(body)
        .map_err(|e| bad(format!("body is not a token response: {e}")))?;
    if status != 200 {
        return match r.error {
            Some(code) if (400..500).contains(&status) => Err(client_error(
                endpoint,
                status,
                &code,
                r.error_description.as_deref().unwrap_or(""),
                code == "temporarily_unavailable",
            )),
            _ => Err(bad(format!(
                "error {}",
                clip(r.error.as_deref().unwrap_or("(none)"))
            ))),
        };
    }
    let token = Zeroizing::new(
        r.access_token
            .ok_or_else(|| bad("access_token is missing".into()))?,
    );
    if token.is_empty() || token.len() > MAX_VALUE_BYTES {
        return Err(bad(format!(
            "access_token must be 1 to {MAX_VALUE_BYTES} bytes"
        )));
    }
    // RFC 6750 token characters (b64token), so the value is safe in a header
    // or an env file.
    if !token
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-._~+/=".contains(c))
    {
        return Err(bad(
            "access_token holds characters outside RFC 6750's b64token".into(),
        ));
    }
    match r.token_type.as_deref() {
        Some(t) if t.eq_ignore_ascii_case("bearer") || t.eq_ignore_ascii_case("n_a") => {}
        Some(t) => return Err(bad(format!("token_type {:?} is not Bearer", clip(t)))),
        None => return Err(bad("token_type is missing".into())),
    }
    let life = match r.expires_in {
        None => DEFAULT_TOKEN_SECS,
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .filter(|s| (1..=86_400 * 366).contains(s))
            .ok_or_else(|| {
                bad(format!(
                    "expires_in {} is not a positive number of seconds",
                    clip(&v.to_string())
                ))
            })?,
    };
    Ok(OAuthToken {
        access_token: token,
        expires_at: now + life,
    })
}

/// STS error codes that say "not now" rather than "no".
const STS_TRANSIENT: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "IDPCommunicationError",
    "ServiceUnavailable",
    "InternalFailure",
];

/// A 4xx error answer: transient (408, 429, or a code that says so) or a
/// refusal.
fn client_error(
    endpoint: &str,
    status: u16,
    code: &str,
    message: &str,
    transient: bool,
) -> ExchangeError {
    let (code, message) = (clip(code), clip(message));
    if transient || status == 408 || status == 429 {
        ExchangeError::Transient {
            endpoint: endpoint.to_owned(),
            status,
            code,
            message,
        }
    } else {
        ExchangeError::Refused {
            endpoint: endpoint.to_owned(),
            status,
            code,
            message,
        }
    }
}

/// Upstream text quoted in errors and audit: short, one line.
fn clip(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <Credentials>
      <SessionToken>FQoGZXIvYXdzEE0aDK+/token==</SessionToken>
      <SecretAccessKey>wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY</SecretAccessKey>
      <Expiration>2026-12-03T11:00:00Z</Expiration>
      <AccessKeyId>ASIAEXAMPLE1234</AccessKeyId>
    </Credentials>
  </AssumeRoleWithWebIdentityResult>
</AssumeRoleWithWebIdentityResponse>"#;

    #[test]
    fn sts_credentials_parse() {
        let c = parse_sts("e", 200, OK.as_bytes()).unwrap();
        assert_eq!(c.access_key_id, "ASIAEXAMPLE1234");
        assert_eq!(
            c.secret_access_key.as_str(),
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY"
        );
        assert_eq!(c.expiration, 1_796_295_600);
    }

    #[test]
    fn sts_errors_are_refusals_or_bad_responses() {
        let err = r#"<ErrorResponse><Error><Type>Sender</Type><Code>InvalidIdentityToken</Code><Message>no</Message></Error></ErrorResponse>"#;
        let e = parse_sts("e", 400, err.as_bytes()).unwrap_err();
        assert!(e.refused(), "{e}");
        assert!(e.to_string().contains("InvalidIdentityToken"), "{e}");
        let e = parse_sts("e", 500, err.as_bytes()).unwrap_err();
        assert!(!e.refused());
        let throttled = err.replace("InvalidIdentityToken", "Throttling");
        let e = parse_sts("e", 400, throttled.as_bytes()).unwrap_err();
        assert!(matches!(e, ExchangeError::Transient { .. }), "{e}");
        for body in [
            &b"\x00\xffjunk"[..],
            b"<a>",
            b"<?xml version='1.0'?><!DOCTYPE a [<!ENTITY b 'c'>]><a>&b;</a>",
        ] {
            let e = parse_sts("e", 200, body).unwrap_err();
            assert!(matches!(e, ExchangeError::BadResponse { .. }), "{e}");
        }
        let no_exp = OK.replace("<Expiration>2026-12-03T11:00:00Z</Expiration>", "");
        assert!(
            parse_sts("e", 200, no_exp.as_bytes())
                .unwrap_err()
                .to_string()
                .contains("Expiration")
        );
    }

    #[test]
    fn token_responses() {
        let t = parse_token(
            "e",
            200,
            br#"{"access_token":"abc.def","token_type":"Bearer","expires_in":60}"#,
            100,
        )
        .unwrap();
        assert_eq!((t.access_token.as_str(), t.expires_at), ("abc.def", 160));
        let e = parse_token(
            "e",
            400,
            br#"{"error":"invalid_client","error_description":"no"}"#,
            0,
        )
        .unwrap_err();
        assert!(e.refused());
        for (status, body) in [
            (429, &br#"{"error":"slow_down"}"#[..]),
            (400, br#"{"error":"temporarily_unavailable"}"#),
        ] {
            let e = parse_token("e", status, body, 0).unwrap_err();
            assert!(matches!(e, ExchangeError::Transient { .. }), "{e}");
        }
        for body in [
            &br#"{"token_type":"Bearer"}"#[..],
            br#"{"access_token":"a b","token_type":"Bearer"}"#,
            br#"{"access_token":"a","token_type":"MAC"}"#,
            br#"{"access_token":"a","token_type":"Bearer","expires_in":-1}"#,
            b"\x8a\x01random",
        ] {
            assert!(matches!(
                parse_token("e", 200, body, 0),
                Err(ExchangeError::BadResponse { .. })
            ));
        }
    }

    #[test]
    fn session_names_fit_sts_rules() {
        let s = session_name(&"x/y z".repeat(30), 123456);
        assert!(s.len() <= 64 && s.ends_with("-123456"), "{s}");
        assert!(
            s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c))
        );
    }
}
