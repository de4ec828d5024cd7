//! Redis injection: the agent authenticates the upstream connection (`AUTH
//! [user] password`) before relaying any byte of the client, so the client
//! needs no password and never sees one. Sans-IO: the command's bytes and
//! the parser of the server's one-line answer; `inject` does the I/O.

use zeroize::Zeroizing;

/// Longest answer line read to an AUTH (an error message included).
pub const MAX_REPLY: usize = 512;

/// Why the server did not accept the injected AUTH.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthRefused {
    /// The server answered with an error (`-WRONGPASS ...`, `-ERR ...`).
    #[error("the server refused the credential: {0}")]
    Error(String),
    #[error("the server's answer to AUTH is not a RESP status line")]
    Malformed,
    #[error("the server's answer to AUTH is longer than {MAX_REPLY} bytes")]
    TooLong,
}

/// `AUTH [user] password` as a RESP array of bulk strings (binary-safe: any
/// byte of the password is sent as it is).
pub fn auth_command(user: Option<&str>, password: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut args: Vec<&[u8]> = vec![b"AUTH"];
    if let Some(u) = user {
        args.push(u.as_bytes());
    }
    args.push(password);
    let mut out = Zeroizing::new(format!("*{}\r\n", args.len()).into_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The server's answer to AUTH: `Ok(Some(n))` once `+OK\r\n` (or any
/// simple string) is complete in `buf`, `n` bytes long; `Ok(None)` while
/// more is needed. The error text is the server's (it never contains the
/// password: Redis does not echo it), cut to printable ASCII.
pub fn parse_auth_reply(buf: &[u8]) -> Result<Option<usize>, AuthRefused> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= MAX_REPLY {
            Err(AuthRefused::TooLong)
        } else if buf.iter().any(|b| *b == b'\n') {
            Err(AuthRefused::Malformed)
        } else {
            Ok(None)
        };
    };
    if end + 2 > MAX_REPLY {
        return Err(AuthRefused::TooLong);
    }
    let line = &buf[..end];
    match line.first() {
        Some(b'+') => Ok(Some(end + 2)),
        Some(b'-') => Err(AuthRefused::Error(
            line[1..]
                .iter()
                .map(|b| {
                    if b.is_ascii_graphic() || *b == b' ' {
                        char::from(*b)
                    } else {
                        '?'
                    }
                })
                .take(200)
                .collect(),
        )),
        _ => Err(AuthRefused::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_is_a_resp_array_of_bulk_strings() {
        assert_eq!(
            &auth_command(None, b"p w\r\n")[..],
            b"*2\r\n$4\r\nAUTH\r\n$5\r\np w\r\n\r\n"
        );
        assert_eq!(
            &auth_command(Some("app"), b"pw")[..],
            b"*3\r\n$4\r\nAUTH\r\n$3\r\napp\r\n$2\r\npw\r\n"
        );
    }

    #[test]
    fn answers_are_ok_error_incomplete_or_refused() {
        assert_eq!(parse_auth_reply(b"+OK\r\n+PONG"), Ok(Some(5)));
        assert_eq!(parse_auth_reply(b"+OK\r"), Ok(None));
        assert_eq!(
            parse_auth_reply(b"-WRONGPASS invalid username-password pair\r\n"),
            Err(AuthRefused::Error(
                "WRONGPASS invalid username-password pair".into()
            ))
        );
        assert_eq!(parse_auth_reply(b":1\r\n"), Err(AuthRefused::Malformed));
        assert_eq!(parse_auth_reply(b"+OK\n"), Err(AuthRefused::Malformed));
        assert_eq!(
            parse_auth_reply(&[b'+'; MAX_REPLY]),
            Err(AuthRefused::TooLong)
        );
    }
}
