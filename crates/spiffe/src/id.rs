//! SPIFFE IDs and trust domain names (SPIFFE-ID.md, section 2).
//!
//! The accepted grammar is deliberately narrower than a generic RFC 3986 URI:
//!
//! ```text
//! spiffe-id    = "spiffe://" trust-domain [ path ]
//! trust-domain = 1*255( a-z / 0-9 / "." / "-" / "_" )
//! path         = 1*( "/" segment )
//! segment      = 1*( A-Z / a-z / 0-9 / "." / "-" / "_" ), not "." or ".."
//! ```
//!
//! with at most 2048 bytes in total. There is no normalisation: a string is
//! either already canonical or rejected, so two IDs are equal exactly when
//! their strings are equal, and an ID can be compared byte-for-byte in
//! policy code without surprises.

use std::fmt;
use std::str::FromStr;

/// The longest SPIFFE ID accepted, in bytes (SPIFFE-ID.md, section 2.3).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// The longest trust domain name accepted, in bytes (RFC 3986 host limit).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME_PREFIX: &str = "spiffe://";

/// Longest part of a rejected input quoted back in an error message, so that
/// a hostile multi-kilobyte value cannot flood logs.
const ERROR_EXCERPT_CHARS: usize = 256;

/// Why a string is not a SPIFFE ID or trust domain name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The input is not a valid SPIFFE ID.
    #[error("invalid SPIFFE ID {input:?}: {problem}")]
    InvalidId {
        /// The rejected input (truncated if very long).
        input: String,
        /// What is wrong with it.
        problem: IdProblem,
    },
    /// The input is not a valid trust domain name.
    #[error("invalid trust domain {input:?}: {problem}")]
    InvalidTrustDomain {
        /// The rejected input (truncated if very long).
        input: String,
        /// What is wrong with it.
        problem: IdProblem,
    },
}

impl IdError {
    /// The specific rule the input broke.
    pub fn problem(&self) -> &IdProblem {
        match self {
            IdError::InvalidId { problem, .. } | IdError::InvalidTrustDomain { problem, .. } => {
                problem
            }
        }
    }

    fn id(input: &str, problem: IdProblem) -> Self {
        IdError::InvalidId {
            input: clip(input),
            problem,
        }
    }

    fn trust_domain(input: &str, problem: IdProblem) -> Self {
        IdError::InvalidTrustDomain {
            input: clip(input),
            problem,
        }
    }
}

/// The individual rules of the SPIFFE ID grammar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdProblem {
    #[error("it is empty")]
    Empty,
    #[error("it is {len} bytes long (at most {MAX_SPIFFE_ID_LEN} allowed)")]
    TooLong { len: usize },
    #[error("the scheme must be lowercase \"spiffe\"")]
    SchemeNotLowercase,
    #[error("it must start with \"spiffe://\"")]
    WrongScheme,
    #[error("the trust domain is missing")]
    MissingTrustDomain,
    #[error("trust domain is {len} bytes long (at most {MAX_TRUST_DOMAIN_LEN} allowed)")]
    TrustDomainTooLong { len: usize },
    #[error(
        "trust domain contains uppercase character {ch:?} (only a-z, 0-9, '.', '-', '_' allowed)"
    )]
    TrustDomainUppercase { ch: char },
    #[error("trust domain contains a port (':' is not allowed)")]
    Port,
    #[error("trust domain contains userinfo ('@' is not allowed)")]
    Userinfo,
    #[error(
        "trust domain contains invalid character {ch:?} (only a-z, 0-9, '.', '-', '_' allowed)"
    )]
    TrustDomainChar { ch: char },
    #[error("a trust domain name must not have a path")]
    TrustDomainHasPath,
    #[error("it contains a query ('?' is not allowed)")]
    Query,
    #[error("it contains a fragment ('#' is not allowed)")]
    Fragment,
    #[error("it contains percent-encoding ('%' is not allowed)")]
    PercentEncoding,
    #[error("path must be empty or start with '/'")]
    PathNoLeadingSlash,
    #[error("path contains an empty segment (\"//\")")]
    EmptySegment,
    #[error("path ends with '/'")]
    TrailingSlash,
    #[error("path contains the dot segment {segment:?} (\".\" and \"..\" are not allowed)")]
    DotSegment { segment: String },
    #[error("path contains invalid character {ch:?} (only A-Z, a-z, 0-9, '.', '-', '_' allowed)")]
    PathChar { ch: char },
}

/// A validated trust domain name such as `example.org`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a trust domain name, given either bare (`example.org`) or as
    /// the trust domain's own SPIFFE ID (`spiffe://example.org`).
    pub fn new(name: &str) -> Result<Self, IdError> {
        let bare = match strip_scheme(name) {
            Ok(Some(rest)) => rest,
            Ok(None) if name.contains("://") => {
                return Err(IdError::trust_domain(name, IdProblem::WrongScheme));
            }
            Ok(None) => name,
            Err(problem) => return Err(IdError::trust_domain(name, problem)),
        };
        check_trust_domain(bare).map_err(|p| IdError::trust_domain(name, p))?;
        Ok(TrustDomain(bare.to_owned()))
    }

    /// The bare name, e.g. `example.org`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's SPIFFE ID as a string, e.g. `spiffe://example.org`.
    pub fn id_string(&self) -> String {
        format!("{SCHEME_PREFIX}{}", self.0)
    }

    /// The trust domain's own SPIFFE ID (no path).
    pub fn to_spiffe_id(&self) -> SpiffeId {
        SpiffeId {
            id: self.id_string(),
            td: self.clone(),
        }
    }
}

/// A validated SPIFFE ID such as `spiffe://example.org/ns/prod/sa/web`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    // `id` comes first so the derived ordering is plain string ordering.
    id: String,
    td: TrustDomain,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID string.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::id(s, IdProblem::Empty));
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdError::id(s, IdProblem::TooLong { len: s.len() }));
        }
        let rest = match strip_scheme(s) {
            Ok(Some(rest)) => rest,
            Ok(None) => return Err(IdError::id(s, IdProblem::WrongScheme)),
            Err(problem) => return Err(IdError::id(s, problem)),
        };
        // Query and fragment are looked for first so that the message names
        // them rather than the first odd character inside them.
        if rest.contains('?') {
            return Err(IdError::id(s, IdProblem::Query));
        }
        if rest.contains('#') {
            return Err(IdError::id(s, IdProblem::Fragment));
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        check_trust_domain(td).map_err(|p| IdError::id(s, p))?;
        check_path(path).map_err(|p| IdError::id(s, p))?;
        Ok(SpiffeId {
            id: s.to_owned(),
            td: TrustDomain(td.to_owned()),
        })
    }

    /// Builds the SPIFFE ID `spiffe://<td><path>`; `path` is either empty
    /// (the trust domain's own ID) or starts with `/`.
    pub fn new(td: &TrustDomain, path: &str) -> Result<Self, IdError> {
        let id = format!("{SCHEME_PREFIX}{}{path}", td.as_str());
        if id.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdError::id(&id, IdProblem::TooLong { len: id.len() }));
        }
        if !path.is_empty() && !path.starts_with('/') {
            return Err(IdError::id(&id, IdProblem::PathNoLeadingSlash));
        }
        if path.contains('?') {
            return Err(IdError::id(&id, IdProblem::Query));
        }
        if path.contains('#') {
            return Err(IdError::id(&id, IdProblem::Fragment));
        }
        check_path(path).map_err(|p| IdError::id(&id, p))?;
        Ok(SpiffeId { id, td: td.clone() })
    }

    /// The trust domain the ID belongs to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    /// The path, including its leading `/`; empty for a trust domain's ID.
    pub fn path(&self) -> &str {
        let start = SCHEME_PREFIX.len() + self.td.as_str().len();
        self.id.get(start..).unwrap_or("")
    }

    /// Whether the ID has a non-root path (required for workload SVIDs).
    pub fn has_path(&self) -> bool {
        !self.path().is_empty()
    }

    /// The full ID string.
    pub fn as_str(&self) -> &str {
        &self.id
    }
}

/// Returns the text after a lowercase `spiffe://`, `None` if there is no
/// scheme of that name at all, or an error if the scheme is `spiffe` in the
/// wrong case (a common mistake worth naming precisely).
fn strip_scheme(s: &str) -> Result<Option<&str>, IdProblem> {
    if let Some(rest) = s.strip_prefix(SCHEME_PREFIX) {
        return Ok(Some(rest));
    }
    let bytes = s.as_bytes();
    if bytes.len() >= SCHEME_PREFIX.len()
        && bytes[..SCHEME_PREFIX.len()].eq_ignore_ascii_case(SCHEME_PREFIX.as_bytes())
    {
        return Err(IdProblem::SchemeNotLowercase);
    }
    Ok(None)
}

fn check_trust_domain(td: &str) -> Result<(), IdProblem> {
    if td.is_empty() {
        return Err(IdProblem::MissingTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdProblem::TrustDomainTooLong { len: td.len() });
    }
    // '@' is checked before the character scan so "user:pw@host" is
    // reported as userinfo rather than as a port.
    if td.contains('@') {
        return Err(IdProblem::Userinfo);
    }
    for ch in td.chars() {
        match ch {
            'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
            'A'..='Z' => return Err(IdProblem::TrustDomainUppercase { ch }),
            ':' => return Err(IdProblem::Port),
            '%' => return Err(IdProblem::PercentEncoding),
            '?' => return Err(IdProblem::Query),
            '#' => return Err(IdProblem::Fragment),
            '/' => return Err(IdProblem::TrustDomainHasPath),
            _ => return Err(IdProblem::TrustDomainChar { ch }),
        }
    }
    Ok(())
}

fn check_path(path: &str) -> Result<(), IdProblem> {
    if path.is_empty() {
        return Ok(());
    }
    let Some(segments) = path.strip_prefix('/') else {
        return Err(IdProblem::PathNoLeadingSlash);
    };
    let mut iter = segments.split('/').peekable();
    while let Some(segment) = iter.next() {
        if segment.is_empty() {
            return Err(if iter.peek().is_none() {
                IdProblem::TrailingSlash
            } else {
                IdProblem::EmptySegment
            });
        }
        for ch in segment.chars() {
            match ch {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => {}
                '%' => return Err(IdProblem::PercentEncoding),
                _ => return Err(IdProblem::PathChar { ch }),
            }
        }
        if segment == "." || segment == ".." {
            return Err(IdProblem::DotSegment {
                segment: segment.to_owned(),
            });
        }
    }
    Ok(())
}

/// Shortens attacker-supplied text quoted in error messages.
pub(crate) fn clip(s: &str) -> String {
    match s.char_indices().nth(ERROR_EXCERPT_CHARS) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_owned(),
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TrustDomain::new(s)
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

impl AsRef<str> for TrustDomain {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for SpiffeId {
    fn as_ref(&self) -> &str {
        &self.id
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.id)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        TrustDomain::new(&s).map_err(serde::de::Error::custom)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        SpiffeId::parse(&s).map_err(serde::de::Error::custom)
    }
}
