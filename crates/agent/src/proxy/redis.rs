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
        } else if buf.contains(&b'\n') {
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

/// Commands never relayed on an injected connection: each can hand the
/// injected password back (`CONFIG GET requirepass`), replace it with one
/// the client knows (`CONFIG SET`, `ACL SETUSER`), log in as someone else
/// (`AUTH`, `HELLO ... AUTH`), or send credentials to a host the client
/// names (`REPLICAOF`: the server authenticates there with `masterauth`).
const REFUSED: &[&str] = &[
    "ACL",
    "AUTH",
    // CLUSTER MEET/REPLICATE make the node replicate from a host the client
    // names (authenticating there with masterauth); SENTINEL SET changes
    // the credentials a sentinel uses.
    "CLUSTER",
    "CONFIG",
    "DEBUG",
    "FAILOVER",
    "MODULE",
    "PSYNC",
    "REPLICAOF",
    "SENTINEL",
    "SLAVEOF",
    "SYNC",
];
/// Longest inline command line (Redis's own limit is 64 KiB).
const MAX_INLINE: usize = 64 * 1024;
/// Longest `*N` or `$L` line.
const MAX_LEN_LINE: usize = 32;
/// Redis's own bounds: arguments per command, bytes per argument.
const MAX_ARGS: u64 = 1024 * 1024;
const MAX_BULK: u64 = 512 * 1024 * 1024;
/// Arguments read whole to be judged (a command name, HELLO's options).
const MAX_JUDGED: u64 = 64;

/// Why a client command was not relayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandRefused {
    #[error("{0} is not relayed on an injected connection")]
    Command(String),
    #[error("not a Redis command: {0}")]
    Malformed(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Start,
    /// `$L` of argument `index` of a command with `left` arguments to go.
    BulkLen {
        index: u64,
        left: u64,
    },
    /// Argument bytes (and the CRLF) to pass on unjudged.
    Skip {
        rest: u64,
        left: u64,
        index: u64,
    },
}

/// The client's command stream, judged command by command: arrays of bulk
/// strings (what clients send) and inline commands, each passed on
/// unchanged unless its name is [`REFUSED`] (or it is `HELLO` with
/// `AUTH`).
pub struct CommandFilter {
    st: St,
    /// The command being passed on is HELLO (its arguments are judged).
    hello: bool,
}

impl Default for CommandFilter {
    fn default() -> Self {
        CommandFilter {
            st: St::Start,
            hello: false,
        }
    }
}

fn line(buf: &[u8], max: usize) -> Result<Option<usize>, CommandRefused> {
    match buf.iter().position(|b| *b == b'\n') {
        Some(i) if i < max => Ok(Some(i + 1)),
        Some(_) => Err(CommandRefused::Malformed("line too long")),
        None if buf.len() >= max => Err(CommandRefused::Malformed("line too long")),
        None => Ok(None),
    }
}

fn number(l: &[u8]) -> Option<i64> {
    std::str::from_utf8(l.strip_suffix(b"\r\n")?)
        .ok()?
        .parse()
        .ok()
}

impl CommandFilter {
    /// Consumes what can be judged from `input`, appending what is relayed
    /// to `out`; 0 with input left means more is needed (bounded by the
    /// longest line or judged argument, so the caller's buffer stays small).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, CommandRefused> {
        let mut used = 0;
        loop {
            let rest = &input[used..];
            if rest.is_empty() {
                return Ok(used);
            }
            let n = self.step(rest)?;
            if n == 0 {
                return Ok(used);
            }
            out.extend_from_slice(&rest[..n]);
            used += n;
        }
    }

    /// How many unconsumed bytes may wait in the caller's buffer.
    pub fn limit(&self) -> usize {
        match self.st {
            St::Start => MAX_INLINE,
            _ => MAX_LEN_LINE + MAX_JUDGED as usize + 2,
        }
    }

    fn judge(&mut self, name: &[u8], index: u64) -> Result<(), CommandRefused> {
        let upper = String::from_utf8_lossy(name).to_ascii_uppercase();
        if index == 0 {
            self.hello = upper == "HELLO";
            if REFUSED.contains(&upper.as_str()) {
                return Err(CommandRefused::Command(upper));
            }
        } else if self.hello && upper == "AUTH" {
            return Err(CommandRefused::Command("HELLO with AUTH".into()));
        }
        Ok(())
    }

    /// One unit: a header line, a judged argument, skipped bytes or an
    /// inline command. How many bytes of `rest` it passes on (0: needs more).
    fn step(&mut self, rest: &[u8]) -> Result<usize, CommandRefused> {
        match self.st {
            St::Start if rest[0] == b'*' => {
                let Some(n) = line(rest, MAX_LEN_LINE)? else {
                    return Ok(0);
                };
                let count =
                    number(&rest[1..n]).ok_or(CommandRefused::Malformed("bad array length"))?;
                if count > MAX_ARGS as i64 {
                    return Err(CommandRefused::Malformed("too many arguments"));
                }
                if count > 0 {
                    self.st = St::BulkLen {
                        index: 0,
                        left: count as u64,
                    };
                }
                Ok(n)
            }
            St::Start => {
                // An inline command: the whole line, its first word judged.
                let Some(n) = line(rest, MAX_INLINE)? else {
                    return Ok(0);
                };
                let text = &rest[..n];
                let text = text.strip_suffix(b"\n").unwrap_or(text);
                let text = text.strip_suffix(b"\r").unwrap_or(text);
                // Quotes, and any control byte but a tab, would need Redis's
                // own splitter to read the same way (it skips more kinds of
                // space than ours would): refused.
                if text
                    .iter()
                    .any(|b| *b == b'"' || *b == b'\'' || (*b < 0x20 && *b != b'\t') || *b == 0x7f)
                {
                    return Err(CommandRefused::Malformed(
                        "inline command with quotes or control bytes",
                    ));
                }
                let words: Vec<&[u8]> = text
                    .split(|b| *b == b' ' || *b == b'\t')
                    .filter(|w| !w.is_empty())
                    .collect();
                for (i, w) in words.iter().enumerate() {
                    self.judge(w, i as u64)?;
                    if !self.hello {
                        break;
                    }
                }
                self.hello = false;
                Ok(n)
            }
            St::BulkLen { index, left } => {
                if rest[0] != b'$' {
                    return Err(CommandRefused::Malformed("expected a bulk string"));
                }
                let Some(n) = line(rest, MAX_LEN_LINE)? else {
                    return Ok(0);
                };
                let len = number(&rest[1..n])
                    .filter(|l| (0..=MAX_BULK as i64).contains(l))
                    .ok_or(CommandRefused::Malformed("bad bulk length"))?
                    as u64;
                let judged = index == 0 || self.hello;
                if judged && len <= MAX_JUDGED {
                    // The argument whole, with its CRLF, before passing any
                    // of it on.
                    let need = n + len as usize + 2;
                    if rest.len() < need {
                        return Ok(0);
                    }
                    if &rest[need - 2..need] != b"\r\n" {
                        return Err(CommandRefused::Malformed("bulk string not ended by CRLF"));
                    }
                    self.judge(&rest[n..need - 2], index)?;
                    self.next(index, left);
                    return Ok(need);
                }
                // Too long to be a refused name: passed on as it comes.
                self.st = St::Skip {
                    rest: len + 2,
                    left,
                    index,
                };
                Ok(n)
            }
            St::Skip {
                rest: r,
                left,
                index,
            } => {
                let n = usize::try_from(r).unwrap_or(usize::MAX).min(rest.len());
                let r = r - n as u64;
                if r == 0 {
                    self.next(index, left);
                } else {
                    self.st = St::Skip {
                        rest: r,
                        left,
                        index,
                    };
                }
                Ok(n)
            }
        }
    }

    fn next(&mut self, index: u64, left: u64) {
        self.st = if left <= 1 {
            self.hello = false;
            St::Start
        } else {
            St::BulkLen {
                index: index + 1,
                left: left - 1,
            }
        };
    }
}

#[cfg(test)]
mod filter_tests {
    use super::*;

    fn cmd(args: &[&str]) -> Vec<u8> {
        let mut v = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            v.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
        }
        v
    }

    fn run(input: &[u8], step: usize) -> Result<Vec<u8>, CommandRefused> {
        let mut f = CommandFilter::default();
        let (mut out, mut buf) = (Vec::new(), Vec::new());
        for p in input.chunks(step) {
            buf.extend_from_slice(p);
            let n = f.feed(&buf, &mut out)?;
            buf.drain(..n);
            assert!(buf.len() <= f.limit());
        }
        assert!(buf.is_empty());
        Ok(out)
    }

    #[test]
    fn ordinary_commands_pass_unchanged_in_any_pieces() {
        let big = "v".repeat(1000);
        let mut input = cmd(&["SET", "k", &big]);
        input.extend(cmd(&["GET", "k"]));
        input.extend(b"PING\r\n");
        input.extend(cmd(&["HELLO", "3", "SETNAME", "app"]));
        input.extend(b"*0\r\n");
        for step in [1, 5, 64, input.len()] {
            assert_eq!(run(&input, step).expect("passes"), input, "step {step}");
        }
    }

    #[test]
    fn commands_that_expose_or_replace_the_credential_are_refused() {
        for (input, what) in [
            (cmd(&["CONFIG", "GET", "requirepass"]), "CONFIG"),
            (cmd(&["config", "set", "requirepass", "x"]), "CONFIG"),
            (cmd(&["ACL", "SETUSER", "x", "on", ">pw"]), "ACL"),
            (cmd(&["AUTH", "other", "pw"]), "AUTH"),
            (cmd(&["HELLO", "3", "AUTH", "u", "p"]), "HELLO with AUTH"),
            (cmd(&["REPLICAOF", "10.0.0.1", "6379"]), "REPLICAOF"),
            (cmd(&["CLUSTER", "MEET", "10.0.0.1", "6379"]), "CLUSTER"),
            (b"CONFIG GET requirepass\r\n".to_vec(), "CONFIG"),
            (b"hello 3 auth u p\r\n".to_vec(), "HELLO with AUTH"),
        ] {
            let mut stream = cmd(&["PING"]);
            stream.extend(input);
            assert_eq!(
                run(&stream, 3),
                Err(CommandRefused::Command(what.into())),
                "{}",
                String::from_utf8_lossy(&stream)
            );
        }
        assert!(run(b"\"CONFIG\" GET x\r\n", 64).is_err());
        assert!(run(b"\x0bCONFIG GET requirepass\r\n", 64).is_err());
        assert!(run(b"HELLO 3 \x0bAUTH u p\r\n", 64).is_err());
        assert!(run(b"CONFIG\x0cGET x\r\n", 64).is_err());
        assert!(run(b"*1\r\n:5\r\n", 64).is_err());
        assert!(run(b"*1\r\n$-5\r\n", 64).is_err());
        assert!(run(b"*1\r\n$4\r\nPINGxx", 64).is_err());
    }
}
