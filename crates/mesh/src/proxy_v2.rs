//! PROXY protocol version 2 headers (the HAProxy specification), as the
//! server agent writes them to a service that asks for the client's
//! identity: the tunnel's client address, the original destination, and
//! TLVs saying the client was authenticated by TLS with a certificate,
//! whose SPIFFE ID is in [`TLV_SPIFFE_ID`].

use std::net::{IpAddr, SocketAddr};

/// The fixed 12-byte signature every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// PP2_TYPE_SSL: the client connected over TLS.
pub const TLV_SSL: u8 = 0x20;
/// PP2_SUBTYPE_SSL_VERSION, inside [`TLV_SSL`].
pub const SUBTLV_SSL_VERSION: u8 = 0x21;
/// PP2_SUBTYPE_SSL_CIPHER, inside [`TLV_SSL`].
pub const SUBTLV_SSL_CIPHER: u8 = 0x23;
/// The client's SPIFFE ID (UTF-8 URI). 0xE0 is the first type the
/// specification leaves to applications (PP2_TYPE_MIN_CUSTOM).
pub const TLV_SPIFFE_ID: u8 = 0xE0;

/// PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS.
const CLIENT_TLS_WITH_CERT: u8 = 0x01 | 0x02 | 0x04;

/// What the header says about one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHeader {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub spiffe_id: String,
    pub tls_version: String,
    pub cipher: String,
}

fn tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    out.push(kind);
    // Values here are far below 64 KiB (SPIFFE IDs are capped at 2048
    // bytes); saturate rather than wrap if that ever changes.
    out.extend_from_slice(&u16::try_from(value.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(&value[..value.len().min(u16::MAX as usize)]);
}

fn v6(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

impl ProxyHeader {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(64 + self.spiffe_id.len());
        let fam = match (self.source.ip(), self.destination.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                body.extend_from_slice(&s.octets());
                body.extend_from_slice(&d.octets());
                0x11 // TCP over IPv4
            }
            (s, d) => {
                body.extend_from_slice(&v6(s));
                body.extend_from_slice(&v6(d));
                0x21 // TCP over IPv6 (IPv4 shown mapped)
            }
        };
        body.extend_from_slice(&self.source.port().to_be_bytes());
        body.extend_from_slice(&self.destination.port().to_be_bytes());
        let mut ssl = vec![CLIENT_TLS_WITH_CERT, 0, 0, 0, 0]; // verify = 0: verified
        tlv(&mut ssl, SUBTLV_SSL_VERSION, self.tls_version.as_bytes());
        tlv(&mut ssl, SUBTLV_SSL_CIPHER, self.cipher.as_bytes());
        tlv(&mut body, TLV_SSL, &ssl);
        tlv(&mut body, TLV_SPIFFE_ID, self.spiffe_id.as_bytes());

        let mut out = Vec::with_capacity(16 + body.len());
        out.extend_from_slice(&SIGNATURE);
        out.push(0x21); // version 2, PROXY command
        out.push(fam);
        out.extend_from_slice(&u16::try_from(body.len()).unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Parses a header this module wrote (tests and tools that read what
    /// a service would). `Ok(None)`: more bytes needed.
    pub fn parse(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, String> {
        let n = buf.len().min(12);
        if buf[..n] != SIGNATURE[..n] {
            return Err("no PROXY v2 signature".into());
        }
        if buf.len() < 16 {
            return Ok(None);
        }
        if buf[12] != 0x21 {
            return Err(format!("unsupported version/command byte {:#x}", buf[12]));
        }
        let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
        let Some(body) = buf.get(16..16 + len) else {
            return Ok(None);
        };
        let (source, destination, mut rest) = match buf[13] {
            0x11 if body.len() >= 12 => {
                let ip = |o: usize| IpAddr::from([body[o], body[o + 1], body[o + 2], body[o + 3]]);
                let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
                (
                    SocketAddr::new(ip(0), port(8)),
                    SocketAddr::new(ip(4), port(10)),
                    &body[12..],
                )
            }
            0x21 if body.len() >= 36 => {
                let ip = |o: usize| {
                    let mut a = [0u8; 16];
                    a.copy_from_slice(&body[o..o + 16]);
                    IpAddr::from(a).to_canonical()
                };
                let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
                (
                    SocketAddr::new(ip(0), port(32)),
                    SocketAddr::new(ip(16), port(34)),
                    &body[36..],
                )
            }
            f => {
                return Err(format!(
                    "unsupported or short address block (family {f:#x})"
                ));
            }
        };
        let mut h = ProxyHeader {
            source,
            destination,
            spiffe_id: String::new(),
            tls_version: String::new(),
            cipher: String::new(),
        };
        let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
        while !rest.is_empty() {
            let (kind, value, next) = split_tlv(rest)?;
            match kind {
                TLV_SPIFFE_ID => h.spiffe_id = text(value),
                TLV_SSL if value.len() >= 5 => {
                    let mut sub = &value[5..];
                    while !sub.is_empty() {
                        let (k, v, n) = split_tlv(sub)?;
                        match k {
                            SUBTLV_SSL_VERSION => h.tls_version = text(v),
                            SUBTLV_SSL_CIPHER => h.cipher = text(v),
                            _ => {}
                        }
                        sub = n;
                    }
                }
                _ => {}
            }
            rest = next;
        }
        Ok(Some((h, 16 + len)))
    }
}

fn split_tlv(b: &[u8]) -> Result<(u8, &[u8], &[u8]), String> {
    if b.len() < 3 {
        return Err("truncated TLV".into());
    }
    let len = u16::from_be_bytes([b[1], b[2]]) as usize;
    let value = b.get(3..3 + len).ok_or("TLV longer than the header")?;
    Ok((b[0], value, &b[3 + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_v4_v6_and_mixed() {
        for (s, d) in [
            ("10.0.0.1:40000", "10.0.0.2:6379"),
            ("[fd00::1]:40000", "[fd00::2]:6379"),
            ("10.0.0.1:40000", "[fd00::2]:6379"),
        ] {
            let h = ProxyHeader {
                source: s.parse().unwrap(),
                destination: d.parse().unwrap(),
                spiffe_id: "spiffe://example.org/redis-cli".into(),
                tls_version: "TLSv1.3".into(),
                cipher: "TLS13_AES_256_GCM_SHA384".into(),
            };
            let mut wire = h.encode();
            let len = wire.len();
            wire.extend_from_slice(b"*1\r\n");
            let (back, used) = ProxyHeader::parse(&wire).unwrap().unwrap();
            assert_eq!((back, used), (h, len));
            for cut in 0..len {
                assert!(
                    matches!(ProxyHeader::parse(&wire[..cut]), Ok(None)),
                    "cut {cut}"
                );
            }
        }
    }

    #[test]
    fn the_spec_example_signature_and_command() {
        let h = ProxyHeader {
            source: "1.2.3.4:5".parse().unwrap(),
            destination: "6.7.8.9:10".parse().unwrap(),
            spiffe_id: "spiffe://td/x".into(),
            tls_version: "TLSv1.3".into(),
            cipher: "c".into(),
        };
        let w = h.encode();
        assert_eq!(
            &w[..12],
            b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
        );
        assert_eq!((w[12], w[13]), (0x21, 0x11));
        assert_eq!(u16::from_be_bytes([w[14], w[15]]) as usize, w.len() - 16);
        assert_eq!(&w[16..20], &[1, 2, 3, 4]);
    }
}
