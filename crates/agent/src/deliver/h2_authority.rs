//! Interop shim for gRPC clients that put a Unix socket path in HTTP/2's
//! `:authority` (grpc-core since 1.57, so Python's `spiffe` package, and
//! grpc-java). hyper's h2 rejects such requests with PROTOCOL_ERROR, and a
//! Workload API that Python clients cannot use is not a Workload API.
//!
//! The shim sits on the client-to-server byte stream of Workload API
//! connections only. Frames pass through untouched except header blocks,
//! which are decoded (HPACK, with the client's dynamic table) and
//! re-encoded as literals without indexing, with an invalid `:authority`
//! replaced by "localhost" (what grpc-go sends for Unix sockets). Literals
//! without indexing never touch the server's dynamic table, so the two
//! tables cannot drift apart. Header blocks are bounded in size.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The server's default SETTINGS_MAX_FRAME_SIZE; re-encoded blocks are
/// split to fit it.
const MAX_FRAME: usize = 16_384;
/// A header block larger than this closes the connection (the server's
/// header list limit is 16 KiB anyway).
const MAX_BLOCK: usize = 64 * 1024;
/// Bound on the client's HPACK dynamic table we mirror.
const MAX_TABLE: usize = 64 * 1024;
/// Bound on a header block once decoded (names and values), as the server
/// bounds its header list. A small block can name big table entries many
/// times over (an "HPACK bomb"): decoding stops here, before it costs
/// memory, and the connection is closed.
const MAX_DECODED: usize = 16 * 1024;

enum Phase {
    Preface,
    FrameHeader,
    /// Copy this many payload bytes of a non-header frame unchanged.
    Passthrough(usize),
    /// Collect a HEADERS/CONTINUATION payload of this length.
    HeaderPayload {
        len: usize,
        ftype: u8,
        flags: u8,
        stream: u32,
    },
    /// Not HTTP/2 as we know it: stop interpreting, let the server reject.
    Raw,
}

struct PendingBlock {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// Rewrites client header blocks; see the module docs.
pub struct Rewriter {
    phase: Phase,
    input: Vec<u8>,
    output: Vec<u8>,
    decoder: loona_hpack::Decoder<'static>,
    pending: Option<PendingBlock>,
}

impl Default for Rewriter {
    fn default() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(MAX_TABLE);
        Rewriter {
            phase: Phase::Preface,
            input: Vec::new(),
            output: Vec::new(),
            decoder,
            pending: None,
        }
    }
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("HTTP/2 from Workload API client: {msg}"),
    )
}

fn valid_authority(v: &[u8]) -> bool {
    std::str::from_utf8(v).is_ok_and(|s| {
        !s.is_empty() && format!("http://{s}/").parse::<hyper::Uri>().is_ok() && !s.contains('%')
    })
}

fn put_int(out: &mut Vec<u8>, prefix_bits: u8, first: u8, mut v: usize) {
    let max = (1usize << prefix_bits) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

fn put_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00); // literal without indexing, new name
    put_int(out, 7, 0, name.len());
    out.extend_from_slice(name);
    put_int(out, 7, 0, value.len());
    out.extend_from_slice(value);
}

impl Rewriter {
    /// Feeds client bytes; transformed bytes accumulate in `output`.
    pub fn feed(&mut self, data: &[u8]) -> io::Result<()> {
        self.input.extend_from_slice(data);
        loop {
            match self.phase {
                Phase::Raw => {
                    self.output.append(&mut self.input);
                    return Ok(());
                }
                Phase::Preface => {
                    let n = self.input.len().min(PREFACE.len());
                    if self.input[..n] != PREFACE[..n] {
                        self.phase = Phase::Raw;
                        continue;
                    }
                    if n < PREFACE.len() {
                        return Ok(());
                    }
                    self.output.extend(self.input.drain(..PREFACE.len()));
                    self.phase = Phase::FrameHeader;
                }
                Phase::FrameHeader => {
                    if self.input.len() < FRAME_HEADER_LEN {
                        return Ok(());
                    }
                    let h = &self.input[..FRAME_HEADER_LEN];
                    let len =
                        (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                    let (ftype, flags) = (h[3], h[4]);
                    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    if ftype == TYPE_HEADERS || ftype == TYPE_CONTINUATION {
                        if len > MAX_BLOCK {
                            return Err(bad("header frame too large"));
                        }
                        self.input.drain(..FRAME_HEADER_LEN);
                        self.phase = Phase::HeaderPayload {
                            len,
                            ftype,
                            flags,
                            stream,
                        };
                    } else {
                        if self.pending.is_some() {
                            return Err(bad("frame interleaved inside a header block"));
                        }
                        self.output.extend(self.input.drain(..FRAME_HEADER_LEN));
                        self.phase = Phase::Passthrough(len);
                    }
                }
                Phase::Passthrough(rem) => {
                    let n = rem.min(self.input.len());
                    self.output.extend(self.input.drain(..n));
                    if n == rem {
                        self.phase = Phase::FrameHeader;
                    } else {
                        self.phase = Phase::Passthrough(rem - n);
                        return Ok(());
                    }
                }
                Phase::HeaderPayload {
                    len,
                    ftype,
                    flags,
                    stream,
                } => {
                    if self.input.len() < len {
                        return Ok(());
                    }
                    let payload: Vec<u8> = self.input.drain(..len).collect();
                    self.phase = Phase::FrameHeader;
                    self.header_frame(ftype, flags, stream, &payload)?;
                }
            }
        }
    }

    fn header_frame(
        &mut self,
        ftype: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        if ftype == TYPE_HEADERS {
            if self.pending.is_some() {
                return Err(bad("HEADERS inside an unfinished header block"));
            }
            let mut p = payload;
            let mut pad = 0usize;
            if flags & FLAG_PADDED != 0 {
                let (&n, rest) = p
                    .split_first()
                    .ok_or_else(|| bad("PADDED HEADERS without pad length"))?;
                pad = usize::from(n);
                p = rest;
            }
            let mut priority = None;
            if flags & FLAG_PRIORITY != 0 {
                if p.len() < 5 {
                    return Err(bad("PRIORITY HEADERS too short"));
                }
                let mut pr = [0u8; 5];
                pr.copy_from_slice(&p[..5]);
                priority = Some(pr);
                p = &p[5..];
            }
            if pad > p.len() {
                return Err(bad("padding longer than frame"));
            }
            let fragment = p[..p.len() - pad].to_vec();
            self.pending = Some(PendingBlock {
                stream,
                flags,
                priority,
                fragment,
            });
        } else {
            let pend = self
                .pending
                .as_mut()
                .ok_or_else(|| bad("CONTINUATION without HEADERS"))?;
            if pend.stream != stream {
                return Err(bad("CONTINUATION on another stream"));
            }
            if pend.fragment.len() + payload.len() > MAX_BLOCK {
                return Err(bad("header block too large"));
            }
            pend.fragment.extend_from_slice(payload);
        }
        if flags & FLAG_END_HEADERS != 0
            && let Some(block) = self.pending.take()
        {
            self.emit(block)?;
        }
        Ok(())
    }

    fn emit(&mut self, block: PendingBlock) -> io::Result<()> {
        let mut encoded = Vec::with_capacity(block.fragment.len() + 64);
        // RFC 7541 §4.1 counts 32 bytes of overhead per field: an empty
        // field repeated costs too.
        let mut decoded = 0usize;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                decoded = decoded.saturating_add(name.len() + value.len() + 32);
                if decoded > MAX_DECODED {
                    return;
                }
                if name.as_ref() == b":authority" && !valid_authority(&value) {
                    put_literal(&mut encoded, &name, b"localhost");
                } else {
                    put_literal(&mut encoded, &name, &value);
                }
            })
            .map_err(|e| bad(&format!("HPACK: {e:?}")))?;
        if decoded > MAX_DECODED {
            return Err(bad(&format!(
                "header block decodes to more than {MAX_DECODED} bytes"
            )));
        }
        let mut first = true;
        let mut rest: &[u8] = &encoded;
        loop {
            let room = if first && block.priority.is_some() {
                MAX_FRAME - 5
            } else {
                MAX_FRAME
            };
            let take = rest.len().min(room);
            let (chunk, tail) = rest.split_at(take);
            let last = tail.is_empty();
            let (ftype, mut flags) = if first {
                (
                    TYPE_HEADERS,
                    block.flags & (FLAG_END_STREAM | FLAG_PRIORITY),
                )
            } else {
                (TYPE_CONTINUATION, 0)
            };
            if last {
                flags |= FLAG_END_HEADERS;
            }
            let prio_len = if first {
                block.priority.map_or(0, |_| 5)
            } else {
                0
            };
            let len = chunk.len() + prio_len;
            self.output.extend_from_slice(&[
                (len >> 16) as u8,
                (len >> 8) as u8,
                len as u8,
                ftype,
                flags,
            ]);
            self.output.extend_from_slice(&block.stream.to_be_bytes());
            if first && let Some(p) = block.priority {
                self.output.extend_from_slice(&p);
            }
            self.output.extend_from_slice(chunk);
            if last {
                return Ok(());
            }
            first = false;
            rest = tail;
        }
    }
}

/// A client connection whose reads go through the [`Rewriter`].
pub struct Rewritten<S> {
    inner: S,
    rw: Rewriter,
    pos: usize,
}

impl<S> Rewritten<S> {
    pub fn new(inner: S) -> Self {
        Rewritten {
            inner,
            rw: Rewriter::default(),
            pos: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewritten<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.pos < this.rw.output.len() {
                let n = (this.rw.output.len() - this.pos).min(buf.remaining());
                buf.put_slice(&this.rw.output[this.pos..this.pos + n]);
                this.pos += n;
                if this.pos == this.rw.output.len() {
                    this.rw.output.clear();
                    this.pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut tmp = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let got = rb.filled();
                    if got.is_empty() {
                        return Poll::Ready(Ok(())); // EOF
                    }
                    this.rw.feed(got)?;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewritten<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ftype: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut v = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ftype, flags];
        v.extend_from_slice(&stream.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn decode_all(bytes: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut d = loona_hpack::Decoder::new();
        let mut blocks = Vec::new();
        let mut p = &bytes[PREFACE.len()..];
        while p.len() >= 9 {
            let len = (usize::from(p[0]) << 16) | (usize::from(p[1]) << 8) | usize::from(p[2]);
            if p[3] == TYPE_HEADERS {
                blocks.push(d.decode(&p[9..9 + len]).unwrap());
            }
            p = &p[9 + len..];
        }
        blocks
    }

    #[test]
    fn rewrites_socket_path_authority_and_keeps_the_rest() {
        let mut enc = loona_hpack::Encoder::new();
        let h1: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
            (b":authority", b"tmp%2Fx%2Fworkload.sock"),
            (b"workload.spiffe.io", b"true"),
        ];
        let b1 = enc.encode(h1.iter().copied());
        // The second request refers back to the client's dynamic table.
        let b2 = enc.encode(h1.iter().copied());
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        // First block split across HEADERS + CONTINUATION, with padding.
        let (a, b) = b1.split_at(b1.len() / 2);
        let mut padded = vec![3u8];
        padded.extend_from_slice(a);
        padded.extend_from_slice(&[0, 0, 0]);
        input.extend(frame(TYPE_HEADERS, FLAG_PADDED, 1, &padded));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, b));
        input.extend(frame(0x0, FLAG_END_STREAM, 1, b"\0\0\0\0\0"));
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            3,
            &b2,
        ));
        let mut rw = Rewriter::default();
        // Byte-at-a-time feeding exercises every partial state.
        for byte in &input {
            rw.feed(std::slice::from_ref(byte)).unwrap();
        }
        let blocks = decode_all(&rw.output);
        assert_eq!(blocks.len(), 2);
        for b in &blocks {
            let auth = b.iter().find(|(n, _)| n == b":authority").unwrap();
            assert_eq!(auth.1, b"localhost");
            assert!(
                b.iter()
                    .any(|(n, v)| n == b"workload.spiffe.io" && v == b"true")
            );
            assert_eq!(b[0].0, b":method", "order (pseudo-headers first) is kept");
        }
        assert!(
            rw.output.windows(5).any(|w| w == b"\0\0\0\0\0"),
            "DATA passes through"
        );
    }

    #[test]
    fn valid_authority_is_kept() {
        let mut enc = loona_hpack::Encoder::new();
        let b = enc.encode([(&b":authority"[..], &b"localhost:1234"[..])]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &b));
        let mut rw = Rewriter::default();
        rw.feed(&input).unwrap();
        assert_eq!(decode_all(&rw.output)[0][0].1, b"localhost:1234");
    }

    #[test]
    fn a_header_block_that_decodes_huge_is_refused() {
        // One 3 KB value added to the dynamic table (4 KiB by default), then
        // referenced by index over and over: one byte on the wire per 3 KB
        // decoded.
        let mut block = Vec::new();
        block.push(0x40); // literal with incremental indexing, new name
        put_int(&mut block, 7, 0, 1);
        block.push(b'x');
        put_int(&mut block, 7, 0, 3000);
        block.extend(std::iter::repeat_n(b'a', 3000));
        for _ in 0..2000 {
            block.push(0x80 | 62); // indexed: the entry just added
        }
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
        let mut rw = Rewriter::default();
        let err = rw.feed(&input).expect_err("an HPACK bomb");
        assert!(err.to_string().contains("decodes to more than"), "{err}");
        assert!(rw.output.len() < 64 * 1024, "{}", rw.output.len());
    }

    #[test]
    fn garbage_is_passed_or_refused_never_panics() {
        let mut rw = Rewriter::default();
        rw.feed(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(rw.output, b"GET / HTTP/1.1\r\n\r\n");
        let mut seed = 0x1234_5678u64;
        for _ in 0..2000 {
            let mut rw = Rewriter::default();
            let mut input = PREFACE.to_vec();
            for _ in 0..64 {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                input.push((seed >> 33) as u8);
            }
            let _ = rw.feed(&input);
        }
        let mut rw = Rewriter::default();
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, b"x"));
        assert!(rw.feed(&input).is_err());
    }
}
