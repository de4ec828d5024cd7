//! HTTP/1.1 injection, sans-IO: frames every request the client sends on a
//! connection (keep-alive and pipelined alike), removes the configured
//! header wherever the client put it, and adds it with the credential.
//! Responses are not touched (they are copied as they come).
//!
//! Framing follows RFC 9112 strictly, because a request the agent frames
//! differently from the server is a request the credential could be
//! smuggled into: a body is `Transfer-Encoding: chunked` (exactly that,
//! last) or one `Content-Length`, never both, never anything else; no
//! obsolete line folding; no protocol switch (`Upgrade`, `CONNECT`), after
//! which the bytes would no longer be requests. Anything else is refused
//! before a byte of that request is forwarded.

use base64::Engine;
use zeroize::Zeroizing;

use tether_manifest::HttpScheme;

/// Longest request head (request line and headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in one request.
const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (size and extensions).
const MAX_CHUNK_LINE: usize = 1024;
/// Longest trailer section.
const MAX_TRAILERS: usize = 16 * 1024;

/// Why a request was refused; the connection is closed there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("not an HTTP/1.x request: {0}")]
    Malformed(String),
    #[error("request head longer than {MAX_HEAD} bytes")]
    HeadTooLong,
    #[error("both Content-Length and Transfer-Encoding (request smuggling)")]
    Smuggling,
    #[error("Content-Length: {0}")]
    BadLength(String),
    #[error("Transfer-Encoding other than chunked: {0:?}")]
    BadEncoding(String),
    #[error("a protocol switch ({0}) cannot be injected into")]
    ProtocolSwitch(String),
    #[error("chunked body: {0}")]
    BadChunk(String),
    #[error("the credential cannot be a header value (control characters)")]
    BadCredential,
    #[error("{0} would reflect the credential back to the client")]
    Reflecting(String),
    #[error("the request's Host is not {0} (exactly one, naming the binding's authority)")]
    WrongAuthority(String),
    #[error("cannot be signed again: {0}")]
    Unsignable(String),
}

/// What is added to every request: a header's name and full value, or an
/// AWS SigV4 signature made with the source's credentials.
pub struct Inject {
    name: String,
    lower: String,
    value: Zeroizing<Vec<u8>>,
    sigv4: Option<SigV4>,
    /// When not empty, every request's one `Host` must be one of these.
    authorities: Vec<String>,
}

impl Inject {
    /// The header `name` carrying `secret` as `scheme` says. Surrounding
    /// whitespace (a file's final newline) is not part of a credential.
    pub fn new(name: &str, scheme: HttpScheme, secret: &[u8]) -> Result<Self, Refusal> {
        let secret = secret.trim_ascii();
        let mut value = Zeroizing::new(Vec::with_capacity(secret.len() + 16));
        match scheme {
            HttpScheme::Bearer => {
                value.extend_from_slice(b"Bearer ");
                value.extend_from_slice(secret);
            }
            HttpScheme::Basic => {
                value.extend_from_slice(b"Basic ");
                let enc = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(secret));
                value.extend_from_slice(enc.as_bytes());
            }
            HttpScheme::Raw => value.extend_from_slice(secret),
        }
        // A CR or LF would end the header and start another (or a request).
        if secret.is_empty() || value.iter().any(|b| b.is_ascii_control() && *b != b'\t') {
            return Err(Refusal::BadCredential);
        }
        Ok(Inject {
            name: name.to_owned(),
            lower: name.to_ascii_lowercase(),
            value,
            sigv4: None,
            authorities: Vec::new(),
        })
    }

    /// Every request signed again (SigV4, headers) with these credentials
    /// for `region` and `service`: the client's own `Authorization`,
    /// `X-Amz-Date` and `X-Amz-Security-Token` are removed, its
    /// `X-Amz-Content-Sha256` (the payload's hash, which no key enters)
    /// is kept and signed.
    pub fn sigv4(
        access_key: &str,
        secret_key: &str,
        session_token: Option<&str>,
        region: &str,
        service: &str,
    ) -> Self {
        let creds = aws_credential_types::Credentials::new(
            access_key,
            secret_key,
            session_token.map(str::to_owned),
            None,
            "tether",
        );
        Inject {
            name: "Authorization".into(),
            lower: "authorization".into(),
            value: Zeroizing::new(Vec::new()),
            sigv4: Some(SigV4 {
                identity: creds.into(),
                region: region.to_owned(),
                service: service.to_owned(),
            }),
            authorities: Vec::new(),
        }
    }

    /// Requests must name `authority` in `Host` (ASCII case-insensitive).
    pub fn with_authority(mut self, authority: Option<String>) -> Self {
        self.authorities.extend(authority);
        self
    }

    /// Requests must name one of these in `Host`, unless an authority was
    /// already configured (that one is exact).
    pub fn or_authorities(mut self, allowed: Vec<String>) -> Self {
        if self.authorities.is_empty() {
            self.authorities = allowed;
        }
        self
    }
}

/// A field value without the optional whitespace RFC 9110 allows around
/// it (spaces and tabs, nothing else).
fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| *b != b' ' && *b != b'\t')
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(start, |e| e + 1);
    &v[start..end.max(start)]
}

/// SigV4 re-signing: the credentials (as the signer's identity) and scope.
struct SigV4 {
    identity: aws_smithy_runtime_api::client::identity::Identity,
    region: String,
    service: String,
}

/// Headers the client signed with its placeholder keys: replaced.
const SIGV4_OWN: [&str; 3] = ["authorization", "x-amz-date", "x-amz-security-token"];

impl SigV4 {
    /// The signing headers for a request (`headers` are the ones it keeps).
    fn sign(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
    ) -> Result<Vec<(String, String)>, Refusal> {
        use aws_sigv4::http_request::{
            PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest,
            SigningSettings, UriPathNormalizationMode, sign,
        };
        let hash = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("x-amz-content-sha256"))
            .map(|(_, v)| v.trim());
        let body = match hash {
            Some("UNSIGNED-PAYLOAD") => SignableBody::UnsignedPayload,
            Some("STREAMING-UNSIGNED-PAYLOAD-TRAILER") => {
                SignableBody::StreamingUnsignedPayloadTrailer
            }
            // Chunk signatures chain from the request's signature and the
            // key: the agent would have to re-sign every chunk.
            Some(h) if h.starts_with("STREAMING-") => {
                return Err(Refusal::Unsignable(format!(
                    "x-amz-content-sha256 {h} (signed chunks) is not re-signed; use unsigned or trailer checksums"
                )));
            }
            // Lowercase only: what is signed is exactly what is forwarded.
            Some(h)
                if h.len() == 64
                    && h.bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
            {
                SignableBody::Precomputed(h.to_owned())
            }
            Some(h) => {
                return Err(Refusal::Unsignable(format!(
                    "x-amz-content-sha256 {:?}",
                    h.chars().take(80).collect::<String>()
                )));
            }
            None => {
                return Err(Refusal::Unsignable(
                    "no x-amz-content-sha256: the payload's hash is needed to sign".into(),
                ));
            }
        };
        // The target is forwarded as sent, so it must canonicalize one way
        // only: unreserved characters, `/ ? = &`, and uppercase `%XX`
        // escapes (what the SDKs send). Anything else could be read
        // differently by the server, whose `SignatureDoesNotMatch` answer
        // would show the client the signed request, session token included.
        canonical_target(target)?;
        let mut names: Vec<String> = headers
            .iter()
            .map(|(n, _)| n.to_ascii_lowercase())
            .collect();
        names.sort();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err(Refusal::Unsignable("a header appears twice".into()));
        }
        let mut settings = SigningSettings::default();
        settings.payload_checksum_kind = PayloadChecksumKind::NoHeader;
        // Hop-by-hop in practice: servers and proxies answer or drop
        // `Expect` before the request is verified (the SDKs leave it out too).
        if let Some(x) = settings.excluded_headers.as_mut() {
            x.push(std::borrow::Cow::Borrowed("expect"));
        }
        if self.service == "s3" {
            // S3 signs the path as sent: no second encoding, no normalizing.
            settings.percent_encoding_mode = PercentEncodingMode::Single;
            settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        }
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&self.identity)
            .region(&self.region)
            .name(&self.service)
            .time(std::time::SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| Refusal::Unsignable(e.to_string()))?
            .into();
        let request = SignableRequest::new(method, target, headers.iter().copied(), body)
            .map_err(|e| Refusal::Unsignable(format!("request: {e}")))?;
        let (instructions, _) = sign(request, &params)
            .map_err(|e| Refusal::Unsignable(e.to_string()))?
            .into_parts();
        Ok(instructions
            .headers()
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .collect())
    }
}

/// Refuses a request target a server might canonicalize differently from
/// the signer, or one carrying query-string authentication of its own.
fn canonical_target(target: &str) -> Result<(), Refusal> {
    let b = target.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let ok = b.get(i + 1..i + 3).is_some_and(|h| {
                    h.iter()
                        .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c))
                });
                if !ok {
                    return Err(Refusal::Unsignable(
                        "a percent escape that is not %XX in uppercase".into(),
                    ));
                }
                i += 3;
            }
            c if c.is_ascii_alphanumeric() || b"-._~/?=&".contains(&c) => i += 1,
            c => {
                return Err(Refusal::Unsignable(format!(
                    "the request target has {:?}, which servers canonicalize differently",
                    char::from(c)
                )));
            }
        }
    }
    let query = target.split_once('?').map_or("", |(_, q)| q);
    if query
        .split('&')
        .any(|p| p.to_ascii_lowercase().starts_with("x-amz-"))
    {
        return Err(Refusal::Unsignable(
            "query-string authentication (X-Amz-*) in the request".into(),
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for a request head.
    Head,
    /// Copying this many bytes of a Content-Length body.
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    Trailers,
}

/// The request stream of one connection.
pub struct Rewriter {
    inject: Inject,
    state: State,
    /// Bytes of the pending head or trailer section already searched for
    /// its end: a head arriving a byte at a time is parsed once, not once
    /// per byte.
    scanned: usize,
    /// Requests whose head was rewritten.
    pub requests: u64,
}

impl Rewriter {
    pub fn new(inject: Inject) -> Self {
        Rewriter {
            inject,
            state: State::Head,
            scanned: 0,
            requests: 0,
        }
    }

    /// Between requests: nothing of a request is pending.
    #[cfg(test)]
    pub fn idle(&self) -> bool {
        self.state == State::Head
    }

    /// Consumes what can be decided from `input`, appending what goes to the
    /// server to `out`; returns how much was consumed. 0 with input left
    /// means more bytes are needed (the caller bounds how many it buffers:
    /// [`Rewriter::limit`]).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, Refusal> {
        let mut used = 0;
        loop {
            let rest = &input[used..];
            if rest.is_empty() {
                return Ok(used);
            }
            let n = match self.state {
                State::Head => self.head(rest, out)?,
                State::Body(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(rest.len());
                    out.extend_from_slice(&rest[..n]);
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::Head
                    } else {
                        State::Body(left)
                    };
                    n
                }
                State::ChunkSize => self.chunk_size(rest, out)?,
                State::ChunkData(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(rest.len());
                    out.extend_from_slice(&rest[..n]);
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::ChunkEnd
                    } else {
                        State::ChunkData(left)
                    };
                    n
                }
                State::ChunkEnd => {
                    if rest.len() < 2 {
                        0
                    } else if &rest[..2] == b"\r\n" {
                        out.extend_from_slice(b"\r\n");
                        self.state = State::ChunkSize;
                        2
                    } else {
                        return Err(Refusal::BadChunk("no CRLF after chunk data".into()));
                    }
                }
                State::Trailers => self.trailers(rest, out)?,
            };
            if n == 0 {
                return Ok(used);
            }
            used += n;
        }
    }

    /// How many unconsumed bytes may wait in the caller's buffer before the
    /// request is refused as too long.
    pub fn limit(&self) -> usize {
        match self.state {
            State::Head => MAX_HEAD,
            State::ChunkSize => MAX_CHUNK_LINE,
            State::Trailers => MAX_TRAILERS,
            _ => 16,
        }
    }

    /// A refusal for a buffer past [`Rewriter::limit`].
    pub fn overflow(&self) -> Refusal {
        match self.state {
            State::Head => Refusal::HeadTooLong,
            State::Trailers => Refusal::BadChunk(format!("trailers longer than {MAX_TRAILERS}")),
            _ => Refusal::BadChunk(format!("chunk-size line longer than {MAX_CHUNK_LINE}")),
        }
    }

    /// Whether `rest` (the pending section, from its start) holds its end:
    /// CRLF CRLF, or LF LF (which the parser then judges); only bytes not
    /// searched before are searched.
    fn section_ended(&mut self, rest: &[u8]) -> bool {
        let tail = &rest[self.scanned.saturating_sub(3)..];
        let ended =
            tail.windows(4).any(|w| w == b"\r\n\r\n") || tail.windows(2).any(|w| w == b"\n\n");
        self.scanned = if ended { 0 } else { rest.len() };
        ended
    }

    fn head(&mut self, rest: &[u8], out: &mut Vec<u8>) -> Result<usize, Refusal> {
        if !self.section_ended(rest) {
            // Still refuse garbage early: a head must start with a token.
            if rest.len() >= 16
                && httparse::Request::new(&mut [])
                    .parse(&rest[..16])
                    .is_err_and(|e| e != httparse::Error::TooManyHeaders)
            {
                return Err(Refusal::Malformed("not a request line".into()));
            }
            return Ok(0);
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let len = match req.parse(rest) {
            // However it arrived: the bound is the head's, not a read's.
            Ok(httparse::Status::Complete(n)) if n > MAX_HEAD => return Err(Refusal::HeadTooLong),
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(0),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Refusal::Malformed(format!(
                    "more than {MAX_HEADERS} header fields"
                )));
            }
            Err(e) => return Err(Refusal::Malformed(e.to_string())),
        };
        let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
            return Err(Refusal::Malformed("incomplete request line".into()));
        };
        if method.eq_ignore_ascii_case("CONNECT") {
            return Err(Refusal::ProtocolSwitch("CONNECT".into()));
        }
        // A server that answers TRACE echoes the request, credential
        // included, back to the client.
        if method.eq_ignore_ascii_case("TRACE") || method.eq_ignore_ascii_case("TRACK") {
            return Err(Refusal::Reflecting(method.to_ascii_uppercase()));
        }
        // Origin-form only (or `*`): an absolute-form target would let the
        // client pick another virtual host than the one the binding is for.
        if !(path.starts_with('/') || path == "*") {
            return Err(Refusal::Malformed(
                "request target is not origin-form (absolute-form is refused)".into(),
            ));
        }
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut encodings = 0;
        for h in req.headers.iter() {
            let name = h.name;
            if name.eq_ignore_ascii_case("upgrade") {
                return Err(Refusal::ProtocolSwitch("Upgrade".into()));
            }
            if name.eq_ignore_ascii_case("content-length") {
                // Only ASCII spaces and tabs are optional whitespace: a
                // Unicode space another parser ignores is not ours to skip.
                let v = std::str::from_utf8(trim_ows(h.value))
                    .ok()
                    .filter(|v| {
                        !v.is_empty() && v.len() <= 19 && v.bytes().all(|b| b.is_ascii_digit())
                    })
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| {
                        Refusal::BadLength(
                            String::from_utf8_lossy(h.value).chars().take(40).collect(),
                        )
                    })?;
                if length.is_some_and(|l| l != v) {
                    return Err(Refusal::BadLength("two different values".into()));
                }
                length = Some(v);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                encodings += 1;
                if encodings > 1 || !trim_ows(h.value).eq_ignore_ascii_case(b"chunked") {
                    let v = String::from_utf8_lossy(h.value);
                    return Err(Refusal::BadEncoding(v.chars().take(40).collect()));
                }
                chunked = true;
            }
        }
        if chunked && length.is_some() {
            return Err(Refusal::Smuggling);
        }
        if !self.inject.authorities.is_empty() {
            let mut hosts = req
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("host"));
            let ok = match (hosts.next(), hosts.next()) {
                (Some(h), None) => self
                    .inject
                    .authorities
                    .iter()
                    .any(|a| trim_ows(h.value).eq_ignore_ascii_case(a.as_bytes())),
                _ => false,
            };
            if !ok {
                return Err(Refusal::WrongAuthority(
                    self.inject.authorities.join(" or "),
                ));
            }
        }
        if chunked && version == 0 {
            return Err(Refusal::BadEncoding("chunked in HTTP/1.0".into()));
        }
        out.extend_from_slice(method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(path.as_bytes());
        out.extend_from_slice(if version == 0 {
            b" HTTP/1.0\r\n"
        } else {
            b" HTTP/1.1\r\n"
        });
        let start = out.len();
        let added = match &self.inject.sigv4 {
            Some(v4) => {
                let kept: Vec<(&str, &str)> = req
                    .headers
                    .iter()
                    .filter(|h| !SIGV4_OWN.iter().any(|o| h.name.eq_ignore_ascii_case(o)))
                    .map(|h| std::str::from_utf8(h.value).map(|v| (h.name, v)))
                    .collect::<Result<_, _>>()
                    .map_err(|_| Refusal::Unsignable("a header value is not UTF-8".into()))?;
                let signing = v4
                    .sign(method, path, &kept)
                    .inspect_err(|_| out.truncate(start))?;
                Some((kept, signing))
            }
            None => None,
        };
        match added {
            Some((kept, signing)) => {
                for (n, v) in kept
                    .iter()
                    .copied()
                    .chain(signing.iter().map(|(n, v)| (n.as_str(), v.as_str())))
                {
                    out.extend_from_slice(n.as_bytes());
                    out.extend_from_slice(b": ");
                    out.extend_from_slice(v.as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"\r\n");
            }
            None => {
                for h in req.headers.iter() {
                    if h.name.eq_ignore_ascii_case(&self.inject.lower) {
                        continue; // the client's own value never reaches the server
                    }
                    out.extend_from_slice(h.name.as_bytes());
                    out.extend_from_slice(b": ");
                    out.extend_from_slice(h.value);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(self.inject.name.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(&self.inject.value);
                out.extend_from_slice(b"\r\n\r\n");
            }
        }
        self.requests += 1;
        self.state = if chunked {
            State::ChunkSize
        } else {
            match length {
                Some(n) if n > 0 => State::Body(n),
                _ => State::Head,
            }
        };
        Ok(len)
    }

    fn chunk_size(&mut self, rest: &[u8], out: &mut Vec<u8>) -> Result<usize, Refusal> {
        let Some(end) = rest.windows(2).position(|w| w == b"\r\n") else {
            if rest.contains(&b'\n') {
                return Err(Refusal::BadChunk("bare LF in chunk-size line".into()));
            }
            return Ok(0);
        };
        let line = &rest[..end];
        // size [; ext]: the size alone decides the framing; extensions are
        // passed on, but must be plain text.
        let size_text = line.split(|b| *b == b';').next().unwrap_or_default();
        let size_text = size_text.trim_ascii_end();
        if size_text.is_empty()
            || size_text.len() > 16
            || !size_text.iter().all(u8::is_ascii_hexdigit)
            || line.iter().any(|b| b.is_ascii_control() && *b != b'\t')
        {
            return Err(Refusal::BadChunk("bad chunk-size line".into()));
        }
        let size = std::str::from_utf8(size_text)
            .ok()
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .ok_or_else(|| Refusal::BadChunk("bad chunk size".into()))?;
        out.extend_from_slice(&rest[..end + 2]);
        self.state = if size == 0 {
            State::Trailers
        } else {
            State::ChunkData(size)
        };
        Ok(end + 2)
    }

    /// Trailer fields up to the empty line; one named like the injected
    /// header is refused (a server merging trailers would take it as the
    /// credential).
    fn trailers(&mut self, rest: &[u8], out: &mut Vec<u8>) -> Result<usize, Refusal> {
        if rest.starts_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
            self.state = State::Head;
            return Ok(2);
        }
        if !self.section_ended(rest) {
            return Ok(0);
        }
        let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") else {
            return Err(Refusal::BadChunk(
                "trailer section not ended by CRLF CRLF".into(),
            ));
        };
        let section = &rest[..end + 4];
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match httparse::parse_headers(section, &mut headers) {
            Ok(httparse::Status::Complete((n, hs))) if n == section.len() => {
                if hs.iter().any(|h| {
                    h.name.eq_ignore_ascii_case(&self.inject.lower)
                        || h.name.eq_ignore_ascii_case("content-length")
                        || h.name.eq_ignore_ascii_case("transfer-encoding")
                }) {
                    return Err(Refusal::BadChunk(
                        "a trailer names a framing or the injected header".into(),
                    ));
                }
            }
            _ => return Err(Refusal::BadChunk("bad trailer section".into())),
        }
        out.extend_from_slice(section);
        self.state = State::Head;
        Ok(section.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw() -> Rewriter {
        Rewriter::new(
            Inject::new("Authorization", HttpScheme::Bearer, b"s3cret\n").expect("inject"),
        )
    }

    /// Feeds `input` in pieces of `step` bytes, as a socket might deliver it.
    fn run(r: &mut Rewriter, input: &[u8], step: usize) -> Result<Vec<u8>, Refusal> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        for piece in input.chunks(step.max(1)) {
            buf.extend_from_slice(piece);
            let n = r.feed(&buf, &mut out)?;
            buf.drain(..n);
            if buf.len() > r.limit() {
                return Err(r.overflow());
            }
        }
        assert!(
            buf.is_empty(),
            "left over: {:?}",
            String::from_utf8_lossy(&buf)
        );
        Ok(out)
    }

    #[test]
    fn every_pipelined_request_gets_the_header_and_loses_the_clients() {
        let input = b"GET /a HTTP/1.1\r\nHost: x\r\nauthorization: Bearer mine\r\n\r\n\
POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
PUT /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nX-T: 1\r\n\r\n\
GET /d HTTP/1.0\r\n\r\n";
        for step in [1, 3, 7, input.len()] {
            let mut r = rw();
            let out = String::from_utf8(run(&mut r, input, step).expect("ok")).expect("utf8");
            assert_eq!(r.requests, 4, "step {step}");
            assert!(r.idle());
            assert_eq!(out.matches("Authorization: Bearer s3cret\r\n").count(), 4);
            assert!(!out.contains("mine"), "{out}");
            assert!(out.contains("\r\n\r\nhello"), "{out}");
            assert!(out.contains("3;x=y\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"), "{out}");
        }
    }

    #[test]
    fn what_cannot_be_framed_one_way_is_refused() {
        for (input, want) in [
            (
                &b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
                Refusal::Smuggling,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                Refusal::BadLength("two different values".into()),
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
                Refusal::BadLength("+3".into()),
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Refusal::BadEncoding("gzip, chunked".into()),
            ),
            (
                b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
                Refusal::ProtocolSwitch("Upgrade".into()),
            ),
            (
                b"CONNECT a:443 HTTP/1.1\r\n\r\n",
                Refusal::ProtocolSwitch("CONNECT".into()),
            ),
            (
                b"TRACE / HTTP/1.1\r\nHost: x\r\n\r\n",
                Refusal::Reflecting("TRACE".into()),
            ),
            (
                b"GET http://other/ HTTP/1.1\r\nHost: x\r\n\r\n",
                Refusal::Malformed("request target is not origin-form (absolute-form is refused)".into()),
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\u{a0}\r\n\r\n".as_bytes(),
                Refusal::BadEncoding("chunked\u{a0}".into()),
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\u{a0}\r\n\r\n".as_bytes(),
                Refusal::BadLength("5\u{a0}".into()),
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                Refusal::BadChunk("bad chunk-size line".into()),
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc",
                Refusal::BadChunk("no CRLF after chunk data".into()),
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nAuthorization: x\r\n\r\n",
                Refusal::BadChunk("a trailer names a framing or the injected header".into()),
            ),
        ] {
            assert_eq!(run(&mut rw(), input, input.len()), Err(want), "{}", String::from_utf8_lossy(input));
        }
        assert!(matches!(
            run(&mut rw(), b"\x16\x03\x01\x02\x00garbage\r\n\r\n", 64),
            Err(Refusal::Malformed(_))
        ));
        assert!(matches!(
            run(&mut rw(), b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", 64),
            Err(Refusal::Malformed(_))
        ));
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD + 10, b'a');
        assert_eq!(run(&mut rw(), &big, 4096), Err(Refusal::HeadTooLong));
        // Complete in one piece just past the limit: refused all the same.
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(run(&mut rw(), &big, big.len()), Err(Refusal::HeadTooLong));
    }

    #[test]
    fn with_an_authority_only_that_host_gets_the_credential() {
        let inject = || {
            Inject::new("Authorization", HttpScheme::Bearer, b"t")
                .expect("inject")
                .with_authority(Some("api.example:8443".into()))
        };
        let ok = b"GET / HTTP/1.1\r\nHost: API.example:8443\r\n\r\n";
        assert!(run(&mut Rewriter::new(inject()), ok, 64).is_ok());
        for bad in [
            &b"GET / HTTP/1.1\r\nHost: other.example\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: api.example:8443\r\nHost: other\r\n\r\n",
        ] {
            assert_eq!(
                run(&mut Rewriter::new(inject()), bad, 64),
                Err(Refusal::WrongAuthority("api.example:8443".into()))
            );
        }
    }

    #[test]
    fn sigv4_re_signs_and_refuses_what_it_cannot() {
        let inject = || Inject::sigv4("AKIDEXAMPLE", "secret", Some("tok"), "us-east-1", "s3");
        let req = b"GET /b/k?list-type=2 HTTP/1.1\r\nHost: s3.local\r\nX-Amz-Date: 20200101T000000Z\r\nX-Amz-Content-Sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\r\nAuthorization: AWS4-HMAC-SHA256 Credential=PLACEHOLDER/x, SignedHeaders=host, Signature=00\r\n\r\n";
        let out = String::from_utf8(run(&mut Rewriter::new(inject()), req, 7).expect("signed"))
            .expect("utf8");
        assert!(
            !out.contains("PLACEHOLDER") && !out.contains("20200101T000000Z"),
            "{out}"
        );
        assert!(
            out.contains("authorization: AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"),
            "{out}"
        );
        assert!(out.contains("x-amz-security-token: tok\r\n"), "{out}");
        assert!(out.contains("X-Amz-Content-Sha256: e3b0c442"), "{out}");
        let hash = "X-Amz-Content-Sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let upper = "X-Amz-Content-Sha256: E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855";
        for bad in [
            "PUT /b/k HTTP/1.1\r\nHost: s3.local\r\nX-Amz-Content-Sha256: STREAMING-AWS4-HMAC-SHA256-PAYLOAD\r\nContent-Length: 0\r\n\r\n".to_string(),
            "GET /b/k HTTP/1.1\r\nHost: s3.local\r\n\r\n".to_string(),
            format!("GET /b/k HTTP/1.1\r\nHost: s3.local\r\n{upper}\r\n\r\n"),
            format!("GET /b/a+b HTTP/1.1\r\nHost: s3.local\r\n{hash}\r\n\r\n"),
            format!("GET /b/k?x=%2f HTTP/1.1\r\nHost: s3.local\r\n{hash}\r\n\r\n"),
            format!("GET /b/k?X-Amz-Signature=1 HTTP/1.1\r\nHost: s3.local\r\n{hash}\r\n\r\n"),
            format!("GET /b/k HTTP/1.1\r\nHost: s3.local\r\n{hash}\r\nX-A: 1\r\nx-a: 2\r\n\r\n"),
        ] {
            let bad = bad.as_bytes();
            assert!(matches!(
                run(&mut Rewriter::new(inject()), bad, 64),
                Err(Refusal::Unsignable(_))
            ));
        }
    }

    #[test]
    fn credentials_that_would_split_a_header_are_refused() {
        for bad in [&b"a\r\nX-Evil: 1"[..], b"", b"a\0b"] {
            assert!(Inject::new("Authorization", HttpScheme::Raw, bad).is_err());
        }
        let basic = Inject::new("Authorization", HttpScheme::Basic, b"u:p").expect("basic");
        assert_eq!(&basic.value[..], b"Basic dTpw");
    }
}
