//! PostgreSQL injection, sans-IO: the client's startup packet (read and
//! re-written with the configured user), the server's messages during
//! authentication, and the client side of SCRAM-SHA-256 (RFC 5802/7677),
//! md5 and cleartext, with aws-lc-rs. `inject` does the I/O: it answers the
//! server's authentication exchange on the client's behalf, then forwards
//! everything from AuthenticationOk on unchanged.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use zeroize::Zeroizing;

/// PostgreSQL's own bound on a startup packet.
pub const MAX_STARTUP: usize = 10_000;
/// Longest server message accepted while authenticating.
pub const MAX_AUTH_MESSAGE: usize = 64 * 1024;
/// PBKDF2 iterations a server may ask for (PostgreSQL's default is 4096):
/// a hostile count cannot pin a core.
const MAX_ITERATIONS: u32 = 1_000_000;

pub const SSL_REQUEST: u32 = 80_877_103;
pub const GSSENC_REQUEST: u32 = 80_877_104;
pub const CANCEL_REQUEST: u32 = 80_877_102;

/// Why the exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PgError {
    #[error("startup packet: {0}")]
    Startup(String),
    #[error("the server: {0}")]
    Server(String),
    /// The server refused the credential (its ErrorResponse message).
    #[error("the server refused: {0}")]
    Refused(String),
    #[error("the server asked for {0}, which the agent does not answer")]
    Unsupported(String),
}

/// The first packet a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum First {
    /// SSLRequest or GSSENCRequest: answered `N` (the client's leg is
    /// loopback plaintext); the client then sends its startup packet.
    Encryption,
    /// A cancel request, passed on as it is.
    Cancel(Vec<u8>),
    /// A startup packet: protocol version and parameters in order.
    Startup {
        version: u32,
        params: Vec<(String, String)>,
    },
}

/// Reads the client's first packet from `buf`: `Ok(None)` until it is
/// complete, then the packet and its length.
pub fn first_packet(buf: &[u8]) -> Result<Option<(First, usize)>, PgError> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if !(8..=MAX_STARTUP).contains(&len) {
        return Err(PgError::Startup(format!(
            "length {len} (between 8 and {MAX_STARTUP})"
        )));
    }
    let code = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    // The length is known from the first 8 bytes: a special request with
    // the wrong one is refused before waiting for more.
    match code {
        SSL_REQUEST | GSSENC_REQUEST if len != 8 => {
            return Err(PgError::Startup(
                "encryption request of the wrong length".into(),
            ));
        }
        CANCEL_REQUEST if len != 16 => {
            return Err(PgError::Startup(
                "cancel request of the wrong length".into(),
            ));
        }
        _ => {}
    }
    if buf.len() < len {
        return Ok(None);
    }
    let body = &buf[8..len];
    let first = match code {
        SSL_REQUEST | GSSENC_REQUEST => First::Encryption,
        CANCEL_REQUEST => First::Cancel(buf[..len].to_vec()),
        v if v >> 16 == 3 => First::Startup {
            version: v,
            params: params(body)?,
        },
        v => {
            return Err(PgError::Startup(format!(
                "protocol {}.{} (only 3.x)",
                v >> 16,
                v & 0xffff
            )));
        }
    };
    Ok(Some((first, len)))
}

fn params(mut body: &[u8]) -> Result<Vec<(String, String)>, PgError> {
    let mut out = Vec::new();
    loop {
        let (name, rest) =
            cstr(body).ok_or_else(|| PgError::Startup("unterminated parameter".into()))?;
        if name.is_empty() {
            if !rest.is_empty() {
                return Err(PgError::Startup("bytes after the parameters".into()));
            }
            return Ok(out);
        }
        let (value, rest) =
            cstr(rest).ok_or_else(|| PgError::Startup("unterminated value".into()))?;
        let text = |b: &[u8]| {
            String::from_utf8(b.to_vec())
                .map_err(|_| PgError::Startup("a parameter is not UTF-8".into()))
        };
        out.push((text(name)?, text(value)?));
        body = rest;
    }
}

fn cstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let at = b.iter().position(|c| *c == 0)?;
    Some((&b[..at], &b[at + 1..]))
}

/// The startup packet as the server gets it: the client's parameters with
/// `user` replaced by the configured one (and a database named after the
/// client's user, PostgreSQL's default, kept as it was).
pub fn startup_for(version: u32, params: &[(String, String)], user: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&version.to_be_bytes());
    let client_user = params
        .iter()
        .find(|(k, _)| k == "user")
        .map(|(_, v)| v.as_str());
    let has_db = params.iter().any(|(k, _)| k == "database");
    let mut put = |k: &str, v: &str| {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    };
    put("user", user);
    if !has_db && let Some(u) = client_user {
        put("database", u);
    }
    for (k, v) in params {
        if k != "user" {
            put(k, v);
        }
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// A message's type, payload and whole length.
pub type Message<'a> = (u8, &'a [u8], usize);

/// One server message: its type and payload (`Ok(None)` until complete),
/// and its full length.
pub fn message(buf: &[u8]) -> Result<Option<Message<'_>>, PgError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if !(4..=MAX_AUTH_MESSAGE).contains(&len) {
        return Err(PgError::Server(format!("message length {len}")));
    }
    if buf.len() < len + 1 {
        return Ok(None);
    }
    Ok(Some((buf[0], &buf[5..len + 1], len + 1)))
}

/// The `M` field of an ErrorResponse, cut to printable text.
pub fn error_message(payload: &[u8]) -> String {
    let mut rest = payload;
    while let Some((&code, r)) = rest.split_first() {
        if code == 0 {
            break;
        }
        let Some((v, r)) = cstr(r) else { break };
        if code == b'M' {
            return String::from_utf8_lossy(v)
                .chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect();
        }
        rest = r;
    }
    "no message".into()
}

/// A frontend message: type, length, payload.
pub fn frontend(ty: u8, payload: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(payload.len() + 5));
    out.push(ty);
    out.extend_from_slice(&((payload.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// PasswordMessage with the cleartext password.
pub fn cleartext(password: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut p = Zeroizing::new(password.to_vec());
    p.push(0);
    frontend(b'p', &p)
}

/// PasswordMessage for md5: `md5` + hex(md5(hex(md5(password || user)) || salt)).
pub fn md5_password(password: &[u8], user: &str, salt: &[u8; 4]) -> Zeroizing<Vec<u8>> {
    let mut inner = Zeroizing::new(password.to_vec());
    inner.extend_from_slice(user.as_bytes());
    let mut first = Zeroizing::new(hex::encode(md5(&inner)).into_bytes());
    first.extend_from_slice(salt);
    let mut p = Zeroizing::new(format!("md5{}", hex::encode(md5(&first))).into_bytes());
    p.push(0);
    frontend(b'p', &p)
}

fn md5(data: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    // SAFETY: MD5 reads `len` bytes from `data` and writes 16 to `out`,
    // both valid for the call. aws-lc is the one crypto provider; its Rust
    // API has no MD5 (only this legacy PostgreSQL method needs it).
    unsafe { aws_lc_sys::MD5(data.as_ptr(), data.len(), out.as_mut_ptr()) };
    out
}

/// The client side of one SCRAM-SHA-256 exchange.
pub struct Scram {
    password: Zeroizing<Vec<u8>>,
    nonce: String,
    client_first_bare: String,
    /// After the server's first message: the expected server signature.
    server_signature: Option<[u8; 32]>,
    verified: bool,
}

pub const SCRAM: &str = "SCRAM-SHA-256";

impl Scram {
    /// A new exchange with a fresh nonce. PostgreSQL takes the user from
    /// the startup packet, so the SCRAM user name is empty.
    pub fn new(password: &[u8]) -> Result<Scram, PgError> {
        let mut raw = [0u8; 18];
        aws_lc_rs::rand::fill(&mut raw).map_err(|_| PgError::Server("no randomness".into()))?;
        let nonce = B64.encode(raw);
        Ok(Scram {
            password: Zeroizing::new(password.to_vec()),
            client_first_bare: format!("n=,r={nonce}"),
            nonce,
            server_signature: None,
            verified: false,
        })
    }

    /// SASLInitialResponse: mechanism, then `n,,` and the bare message.
    pub fn initial(&self) -> Zeroizing<Vec<u8>> {
        let first = format!("n,,{}", self.client_first_bare);
        let mut p = Vec::new();
        p.extend_from_slice(SCRAM.as_bytes());
        p.push(0);
        p.extend_from_slice(&(first.len() as u32).to_be_bytes());
        p.extend_from_slice(first.as_bytes());
        frontend(b'p', &p)
    }

    /// The answer to the server's first message (SASLContinue's data):
    /// SASLResponse with the proof.
    pub fn respond(&mut self, server_first: &[u8]) -> Result<Zeroizing<Vec<u8>>, PgError> {
        use aws_lc_rs::{digest, hmac, pbkdf2};
        let text = std::str::from_utf8(server_first)
            .map_err(|_| PgError::Server("SCRAM message is not UTF-8".into()))?;
        // RFC 5802: r= first; a mandatory extension (m=) is refused.
        if !text.starts_with("r=") {
            return Err(PgError::Server(
                "SCRAM server-first-message: not r= first".into(),
            ));
        }
        let (mut nonce, mut salt, mut iter) = (None, None, None);
        for attr in text.split(',') {
            if attr.starts_with("m=") {
                return Err(PgError::Server(
                    "SCRAM: unsupported mandatory extension".into(),
                ));
            }
            match attr.split_once('=') {
                Some(("r", v)) => nonce = Some(v),
                Some(("s", v)) => salt = B64.decode(v).ok(),
                Some(("i", v)) => iter = v.parse::<u32>().ok(),
                _ => {}
            }
        }
        let bad = |what: &str| PgError::Server(format!("SCRAM server-first-message: {what}"));
        let nonce = nonce
            .filter(|n| n.len() > self.nonce.len() && n.starts_with(&self.nonce))
            .ok_or_else(|| bad("the nonce does not extend ours"))?;
        let salt = salt
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("no salt"))?;
        let iter = iter
            .filter(|i| (1..=MAX_ITERATIONS).contains(i))
            .and_then(std::num::NonZeroU32::new)
            .ok_or_else(|| bad("iteration count missing or above 1000000"))?;
        let mut salted = Zeroizing::new([0u8; 32]);
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            iter,
            &salt,
            &self.password,
            &mut salted[..],
        );
        let key = hmac::Key::new(hmac::HMAC_SHA256, &salted[..]);
        let client_key = Zeroizing::new(hmac::sign(&key, b"Client Key").as_ref().to_vec());
        let stored = digest::digest(&digest::SHA256, &client_key);
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{text},{without_proof}", self.client_first_bare);
        let client_sig = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, stored.as_ref()),
            auth_message.as_bytes(),
        );
        let proof: Vec<u8> = client_key
            .iter()
            .zip(client_sig.as_ref())
            .map(|(a, b)| a ^ b)
            .collect();
        let server_key = hmac::sign(&key, b"Server Key");
        let server_sig = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, server_key.as_ref()),
            auth_message.as_bytes(),
        );
        let mut expect = [0u8; 32];
        expect.copy_from_slice(server_sig.as_ref());
        self.server_signature = Some(expect);
        let msg = format!("{without_proof},p={}", B64.encode(proof));
        Ok(frontend(b'p', msg.as_bytes()))
    }

    /// Checks the server's final message (SASLFinal's data): the server
    /// proves it knew the password too.
    pub fn verify(&self, server_final: &[u8]) -> Result<(), PgError> {
        let want = self
            .server_signature
            .ok_or_else(|| PgError::Server("SASLFinal before SASLContinue".into()))?;
        let text = std::str::from_utf8(server_final)
            .map_err(|_| PgError::Server("SCRAM final message is not UTF-8".into()))?;
        if let Some(e) = text.strip_prefix("e=") {
            return Err(PgError::Refused(format!(
                "SCRAM: {}",
                e.chars().take(100).collect::<String>()
            )));
        }
        let got = text
            .split(',')
            .find_map(|a| a.strip_prefix("v="))
            .and_then(|v| B64.decode(v).ok())
            .ok_or_else(|| PgError::Server("SCRAM final message without a signature".into()))?;
        // Not secret: compared in constant time anyway.
        if got.len() != 32
            || aws_lc_rs::constant_time::verify_slices_are_equal(&got, &want).is_err()
        {
            return Err(PgError::Server(
                "the server's SCRAM signature is wrong: it does not know the password".into(),
            ));
        }
        Ok(())
    }
}

impl Scram {
    /// Whether the server's proof was checked ([`Scram::verify`]).
    pub fn verified(&self) -> bool {
        self.verified
    }

    pub fn mark_verified(&mut self) {
        self.verified = true;
    }
}

/// The mechanisms an AuthenticationSASL message offers.
pub fn mechanisms(data: &[u8]) -> Vec<String> {
    data.split(|b| *b == 0)
        .filter(|m| !m.is_empty())
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(params: &[(&str, &str)]) -> Vec<u8> {
        let p: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        startup_for(196_608, &p, params[0].1)
    }

    #[test]
    fn startup_packets_parse_and_get_the_configured_user() {
        let pkt = startup(&[
            ("user", "root"),
            ("database", "postgres"),
            ("application_name", "psql"),
        ]);
        let Some((First::Startup { version, params }, n)) = first_packet(&pkt).expect("ok") else {
            panic!("not a startup");
        };
        assert_eq!((version, n), (196_608, pkt.len()));
        let out = startup_for(version, &params, "app");
        let Some((First::Startup { params, .. }, _)) = first_packet(&out).expect("ok") else {
            panic!("not a startup");
        };
        assert_eq!(params[0], ("user".into(), "app".into()));
        assert!(params.contains(&("database".into(), "postgres".into())));
        assert!(!params.iter().any(|(_, v)| v == "root"));
        // Without a database: the client's user's, as PostgreSQL would pick.
        let out = startup_for(version, &[("user".into(), "root".into())], "app");
        let Some((First::Startup { params, .. }, _)) = first_packet(&out).expect("ok") else {
            panic!("not a startup");
        };
        assert!(params.contains(&("database".into(), "root".into())));
        // Incomplete, absurd, special.
        assert_eq!(first_packet(&pkt[..pkt.len() - 1]), Ok(None));
        assert!(first_packet(&[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0]).is_err());
        assert!(first_packet(&[0, 0, 0, 4, 0, 3, 0, 0]).is_err());
        let ssl = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        assert_eq!(first_packet(&ssl), Ok(Some((First::Encryption, 8))));
        assert!(first_packet(&[0, 0, 0, 9, 0x04, 0xd2, 0x16, 0x2f]).is_err());
        assert!(first_packet(&[0, 0, 0, 9, 0, 2, 0, 0, 0]).is_err());
    }

    #[test]
    fn md5_matches_postgresql() {
        // pg: 'md5' || md5(md5('secret' || 'app') || salt), salt 01020304.
        let m = md5_password(b"secret", "app", &[1, 2, 3, 4]);
        let text = String::from_utf8_lossy(&m[5..m.len() - 1]).into_owned();
        assert_eq!(text.len(), 35);
        assert!(text.starts_with("md5"));
        assert_eq!(hex::encode(md5(b"")), "d41d8cd98f00b204e9800998ecf8427e");
    }

    /// RFC 7677's SCRAM-SHA-256 example, with its client nonce.
    #[test]
    fn scram_follows_rfc_7677() {
        let mut s = Scram::new(b"pencil").expect("scram");
        s.nonce = "rOprNGfwEbeRWgbNEkqO".into();
        s.client_first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO".into();
        let resp = s
            .respond(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
            .expect("respond");
        let text = String::from_utf8_lossy(&resp[5..]).into_owned();
        assert_eq!(
            text,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        s.verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .expect("server signature");
        assert!(
            s.verify(b"v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
                .is_err()
        );
        assert!(matches!(
            s.verify(b"e=invalid-proof"),
            Err(PgError::Refused(_))
        ));
        // A nonce that does not extend ours, and an absurd iteration count.
        let mut t = Scram::new(b"pencil").expect("scram");
        assert!(t.respond(b"r=other,s=QSXCR+Q6sek8bf92,i=4096").is_err());
        let r = format!("r={}x,s=QSXCR+Q6sek8bf92,i=4000000000", t.nonce);
        assert!(t.respond(r.as_bytes()).is_err());
    }
}
