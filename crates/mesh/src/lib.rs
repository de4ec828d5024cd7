//! What crosses the wire between agents, and from an agent to a service.
//!
//! A tunnel is one TLS 1.3 connection between two agents, opened for one
//! application connection and authenticated by the calling process's own
//! X.509-SVID. Inside it, before any application byte, the client agent
//! sends a [`Request`] naming the original destination; the server agent
//! answers with one [`Status`] byte and, when it is [`Status::Ok`], both
//! sides copy bytes until each direction is closed. Everything here rides
//! inside TLS: the destination is never visible on the network.
//!
//! Pure encoding and parsing, no I/O, so the parsers can be fuzzed.

pub mod proxy_v2;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// First bytes of every request; tells a stray client from a Tether agent.
pub const MAGIC: [u8; 4] = *b"TTHR";
/// Version of the request layout below.
pub const VERSION: u8 = 1;
/// ALPN protocol name of the tunnel.
pub const ALPN: &[u8] = b"tether-tunnel/1";
/// The longest request (IPv6).
pub const MAX_REQUEST: usize = 4 + 1 + 1 + 16 + 2;

/// "Connect me to this destination on your host."
///
/// Layout: `MAGIC`, `VERSION`, family (4 or 6), the address (4 or 16
/// bytes), the port (big-endian u16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub destination: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("not a Tether tunnel request (bad magic)")]
    Magic,
    #[error("tunnel request version {0} is not supported (this agent speaks {VERSION})")]
    Version(u8),
    #[error("tunnel request has unknown address family {0}")]
    Family(u8),
    #[error("tunnel request names port 0")]
    Port,
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_REQUEST);
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        match self.destination.ip() {
            IpAddr::V4(a) => {
                out.push(4);
                out.extend_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                out.push(6);
                out.extend_from_slice(&a.octets());
            }
        }
        out.extend_from_slice(&self.destination.port().to_be_bytes());
        out
    }

    /// Parses a request from the start of `buf`. `Ok(None)`: more bytes
    /// are needed; `Ok(Some((request, used)))`: the request took `used`
    /// bytes and the rest is application data.
    pub fn parse(buf: &[u8]) -> Result<Option<(Request, usize)>, RequestError> {
        let n = buf.len().min(4);
        if buf[..n] != MAGIC[..n] {
            return Err(RequestError::Magic);
        }
        if buf.len() < 6 {
            return Ok(None);
        }
        if buf[4] != VERSION {
            return Err(RequestError::Version(buf[4]));
        }
        let addr_len = match buf[5] {
            4 => 4,
            6 => 16,
            f => return Err(RequestError::Family(f)),
        };
        let total = 6 + addr_len + 2;
        let Some(body) = buf.get(6..total) else {
            return Ok(None);
        };
        let ip = if addr_len == 4 {
            IpAddr::V4(Ipv4Addr::new(body[0], body[1], body[2], body[3]))
        } else {
            let mut o = [0u8; 16];
            o.copy_from_slice(&body[..16]);
            IpAddr::V6(Ipv6Addr::from(o))
        };
        let port = u16::from_be_bytes([body[addr_len], body[addr_len + 1]]);
        if port == 0 {
            return Err(RequestError::Port);
        }
        Ok(Some((
            Request {
                destination: SocketAddr::new(ip, port),
            },
            total,
        )))
    }
}

/// The server agent's one-byte answer to a [`Request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Connected to the service; bytes flow.
    Ok,
    /// Ingress policy does not let the client's identity reach it.
    Denied,
    /// The destination is not a Service this agent fronts.
    NotFronted,
    /// Allowed, but the service did not accept the connection.
    Unreachable,
    /// The request could not be read.
    BadRequest,
}

impl Status {
    pub fn to_byte(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::Denied => 1,
            Status::NotFronted => 2,
            Status::Unreachable => 3,
            Status::BadRequest => 4,
        }
    }

    /// Unknown bytes (a newer peer) read as a refusal.
    pub fn from_byte(b: u8) -> Status {
        match b {
            0 => Status::Ok,
            1 => Status::Denied,
            2 => Status::NotFronted,
            3 => Status::Unreachable,
            _ => Status::BadRequest,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Denied => "denied by the service's ingress policy",
            Status::NotFronted => "not a service the peer agent fronts",
            Status::Unreachable => "the service refused the peer agent's connection",
            Status::BadRequest => "the peer agent could not read the tunnel request",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_both_families_with_trailing_data() {
        for dst in ["10.1.2.3:6379", "[fd00::2]:5432"] {
            let r = Request {
                destination: dst.parse().unwrap(),
            };
            let mut wire = r.encode();
            let len = wire.len();
            wire.extend_from_slice(b"PING");
            assert_eq!(Request::parse(&wire), Ok(Some((r, len))));
            // Every strict prefix asks for more.
            for cut in 0..len {
                assert_eq!(Request::parse(&wire[..cut]), Ok(None), "{dst} cut {cut}");
            }
        }
    }

    #[test]
    fn rejects_what_is_not_a_request() {
        assert_eq!(Request::parse(b"GET / HTTP/1.1"), Err(RequestError::Magic));
        assert_eq!(Request::parse(b"TX"), Err(RequestError::Magic));
        assert_eq!(
            Request::parse(b"TTHR\x02\x04"),
            Err(RequestError::Version(2))
        );
        assert_eq!(
            Request::parse(b"TTHR\x01\x05"),
            Err(RequestError::Family(5))
        );
        assert_eq!(
            Request::parse(b"TTHR\x01\x04\x0a\x00\x00\x01\x00\x00"),
            Err(RequestError::Port)
        );
    }

    #[test]
    fn status_bytes() {
        for s in [
            Status::Ok,
            Status::Denied,
            Status::NotFronted,
            Status::Unreachable,
            Status::BadRequest,
        ] {
            assert_eq!(Status::from_byte(s.to_byte()), s);
        }
        assert_eq!(Status::from_byte(200), Status::BadRequest);
    }
}
