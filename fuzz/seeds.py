#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/seeds/<target>/ (committed; run again
only to change them). `make test` feeds every seed to its target's body
(crates/fuzz-bodies); pass the directory to `cargo +nightly fuzz run
<target> fuzz/corpus/<target> fuzz/seeds/<target>` to start from them
(fuzz/corpus, where cargo-fuzz writes what it finds, is not committed).

Needs openssl (for the CSR and the bundle's certificate and key)."""

import base64
import json
import os
import shutil
import struct
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "seeds")


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def openssl(*args, inp=None):
    return subprocess.run(["openssl", *args], input=inp, capture_output=True, check=True).stdout


def spiffe_id():
    for i, s in enumerate([
        "spiffe://example.org/workload",
        "spiffe://example.org",
        "spiffe://example.org/a/b/c.d-e_f",
        "spiffe://EXAMPLE.org/upper",
        "spiffe://example.org/%41",
        "spiffe://example.org//double",
        "spiffe://example.org/./dot",
        "spiffe://user@example.org/x",
        "spiffe://example.org:8080/x",
        "https://example.org/x",
        "spiffe://" + "a" * 256 + "/x",
        "",
    ]):
        put("spiffe_id", f"seed-{i:02}", s)


def selector_parse():
    for i, s in enumerate([
        "unix:uid:0",
        "unix:gid:1000",
        "unix:user:redis",
        "process:path:/usr/bin/redis-cli",
        "process:sha256:" + "ab" * 32,
        "process:name:redis-cli",
        "process:cmdline:redis-cli -p 6379",
        "systemd:unit:nginx.service",
        "cgroup:path:/system.slice/nginx.service",
        "container:id:" + "0f" * 32,
        "unix:uid:-1",
        "unix:uid",
        "nonsense",
        "process:sha256:xyz",
    ]):
        put("selector_parse", f"seed-{i:02}", s)


def manifest_parse():
    put("manifest_parse", "identity.yaml", """apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata: {name: redis-cli}
spec:
  spiffeId: spiffe://example.org/redis-cli
  selectors: [["process:path:/usr/bin/redis-cli", "unix:uid:0"]]
  allowExec: [LD_LIBRARY_PATH]
""")
    put("manifest_parse", "service-policy.yaml", """apiVersion: tether.dev/v1alpha1
kind: Service
metadata: {name: redis}
spec:
  addresses:
    - {cidr: 10.0.0.5/32, ports: [6379]}
    - {cidr: "2001:db8::5/128", ports: [6379]}
    - {local: true, ports: [6380]}
  mesh: {mode: mutual}
---
apiVersion: tether.dev/v1alpha1
kind: AccessPolicy
metadata: {name: redis-clients}
spec:
  services: [redis]
  identities: [redis-cli]
  when: 'context.time.hour >= 8 && context.time.hour < 18'
""")
    put("manifest_parse", "credentials.yaml", """apiVersion: tether.dev/v1alpha1
kind: CredentialSource
metadata: {name: aws}
spec:
  awsSts: {roleArn: 'arn:aws:iam::123456789012:role/app', duration: 1h, endpoint: 'http://127.0.0.1:5000', region: us-east-1}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialSource
metadata: {name: idp}
spec:
  oauth2: {tokenEndpoint: 'https://idp.example/token', grant: clientCredentials, clientId: app, scope: [read]}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialBinding
metadata: {name: app-aws}
spec:
  identity: app
  source: aws
  file: {name: aws-credentials, format: env, mode: '0400'}
""")
    put("manifest_parse", "bad-kind.yaml", "apiVersion: tether.dev/v1alpha1\nkind: Nope\nmetadata: {name: x}\n")
    put("manifest_parse", "anchors.yaml", "a: &a [*a]\n")
    put("manifest_parse", "empty.yaml", "")


def csr_parse():
    with tempfile.TemporaryDirectory() as d:
        key = os.path.join(d, "k.pem")
        openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
        der = openssl("req", "-new", "-key", key, "-subj", "/", "-addext",
                      "subjectAltName=URI:spiffe://example.org/w", "-outform", "DER")
        put("csr_parse", "p256-uri-san.der", der)
        put("csr_parse", "truncated.der", der[: len(der) // 2])
        flipped = bytearray(der)
        flipped[-5] ^= 0xFF
        put("csr_parse", "bad-signature.der", bytes(flipped))
        rsa = os.path.join(d, "r.pem")
        openssl("genrsa", "-out", rsa, "1024")
        put("csr_parse", "rsa.der", openssl("req", "-new", "-key", rsa, "-subj", "/CN=x", "-outform", "DER"))
    put("csr_parse", "empty.der", b"")


def ec_xy(pem_key):
    # The uncompressed point is the last 65 bytes of the DER public key.
    pub = openssl("ec", "-pubout", "-outform", "DER", inp=pem_key)
    pt = pub[-65:]
    assert pt[0] == 4
    return b64u(pt[1:33]), b64u(pt[33:])


def bundle_json():
    with tempfile.TemporaryDirectory() as d:
        key = os.path.join(d, "k.pem")
        openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
        cert = openssl("req", "-new", "-x509", "-key", key, "-subj", "/O=example", "-days", "3650",
                       "-addext", "subjectAltName=URI:spiffe://example.org", "-outform", "DER")
        x, y = ec_xy(open(key, "rb").read())
    doc = {
        "keys": [
            {"use": "x509-svid", "kty": "EC", "crv": "P-256", "x": x, "y": y,
             "x5c": [base64.b64encode(cert).decode()]},
            {"use": "jwt-svid", "kty": "EC", "kid": "k1", "crv": "P-256", "x": x, "y": y},
        ],
        "spiffe_sequence": 7,
        "spiffe_refresh_hint": 300,
    }
    put("bundle_json", "x509-and-jwt.json", json.dumps(doc))
    put("bundle_json", "empty-keys.json", '{"keys": []}')
    doc["keys"][1]["kid"] = ""
    put("bundle_json", "empty-kid.json", json.dumps(doc))
    put("bundle_json", "duplicate-member.json", '{"keys": [], "keys": []}')
    put("bundle_json", "not-object.json", "[1, 2]")


def jwt_validate():
    # Byte 0 picks the mode (see the target): 0 the token as text, 1 a
    # signed token with these claims, 2 a signed token with this header.
    claims = {"sub": "spiffe://example.org/w", "aud": "svc", "exp": 1700000100}
    put("jwt_validate", "claims-good", b"\x01" + json.dumps(claims).encode())
    put("jwt_validate", "claims-aud-list", b"\x01" + json.dumps({**claims, "aud": ["x", "svc"]}).encode())
    put("jwt_validate", "claims-expired", b"\x01" + json.dumps({**claims, "exp": 1}).encode())
    put("jwt_validate", "claims-other-td", b"\x01" + json.dumps({**claims, "sub": "spiffe://other.org/w"}).encode())
    put("jwt_validate", "header-good", b"\x02" + b'{"alg":"ES256","kid":"fuzz","typ":"JWT"}')
    put("jwt_validate", "header-none", b"\x02" + b'{"alg":"none","kid":"fuzz"}')
    put("jwt_validate", "header-unknown-kid", b"\x02" + b'{"alg":"ES256","kid":"other"}')
    put("jwt_validate", "text-garbage", b"\x00" + b"a.b.c")
    put("jwt_validate", "text-empty", b"\x00")


def proc_events():
    def dgram(what, data):
        ev = struct.pack("=IIQ", what, 0, 123456789) + data
        cn = struct.pack("=IIIIHH", 1, 1, 0, 0, len(ev), 0) + ev
        return struct.pack("=IHHII", 16 + len(cn), 3, 0, 0, 0) + cn
    put("proc_events", "exec", dgram(2, struct.pack("=II", 1234, 1234)))
    put("proc_events", "fork", dgram(1, struct.pack("=IIII", 1, 1, 1235, 1235)))
    put("proc_events", "exit", dgram(0x80000000, struct.pack("=IIIIII", 1235, 1235, 0, 17, 1, 1)))
    put("proc_events", "uid", dgram(4, struct.pack("=IIII", 1234, 1234, 1000, 1000)))
    put("proc_events", "two", dgram(2, struct.pack("=II", 7, 7)) + dgram(1, struct.pack("=IIII", 7, 7, 8, 8)))
    put("proc_events", "pid-zero", dgram(2, struct.pack("=II", 0, 0)))
    put("proc_events", "short", dgram(2, b"")[:30])


def kernel_records():
    # First byte: 0 held, 1 exec, 2 event (see tether_fuzz_bodies).
    v4 = bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 7])
    # struct redirect (88 bytes: ..., local_addr, netns, flags, pad) + cookie.
    held = (v4 + struct.pack(">H", 6379) + bytes([0, 1]) + struct.pack("=IIIIHxxQQ", 4242, 4243, 1000, 7, 40000, 9, 10**9)
            + bytes(16) + struct.pack("=QII", 4026531840, 0, 0) + struct.pack("=Q", 99))
    assert len(held) == 96
    put("kernel_records", "held-v4", b"\x00" + held)
    put("kernel_records", "held-v6", b"\x00" + bytes(15) + b"\x01" + held[16:])
    put("kernel_records", "held-short", b"\x00" + held[:95])
    name = b"redis-cli".ljust(32, b"\x00")
    ex = struct.pack("=QQQQIIII", 9, 10**9, 0, 1234, 2049, 0, 0, 4026531840) + name
    assert len(ex) == 80
    put("kernel_records", "exec", b"\x01" + ex)
    put("kernel_records", "exec-name-unterminated", b"\x01" + ex[:48] + b"\xff" * 32)
    ev = (struct.pack("=QQIIIIIII", 10**9, 99, 4242, 4242, 1000, 1000, 1, 7, 3) + bytes([1, 6])
          + struct.pack(">H", 6379) + v4 + bytes([1]) + b"redis-cli".ljust(16, b"\x00") + bytes(3)
          + struct.pack("=III", 0, 0, 0) + b"redis-cli".ljust(16, b"\x00"))
    assert len(ev) == 112, len(ev)
    put("kernel_records", "event-allow", b"\x02" + ev)
    put("kernel_records", "event-bad-verdict", b"\x02" + ev[:44] + b"\xee" + ev[45:])
    put("kernel_records", "event-bad-hook", b"\x02" + ev[:64] + b"\xee" + ev[65:])
    put("kernel_records", "event-short", b"\x02" + ev[:100])


def tunnel_request():
    put("tunnel_request", "v4", b"TTHR\x01\x04" + bytes([10, 0, 0, 7]) + struct.pack(">H", 6379) + b"PING")
    put("tunnel_request", "v6", b"TTHR\x01\x06" + bytes(15) + b"\x01" + struct.pack(">H", 5432))
    put("tunnel_request", "port-zero", b"TTHR\x01\x04" + bytes(4) + b"\x00\x00")
    put("tunnel_request", "partial", b"TTHR\x01")
    sig = b"\r\n\r\n\x00\r\nQUIT\n"
    spiffe = b"spiffe://example.org/w"
    tlv = bytes([0xE0]) + struct.pack(">H", len(spiffe)) + spiffe
    addrs = bytes([10, 0, 0, 1, 10, 0, 0, 2]) + struct.pack(">HH", 40000, 6379)
    body = addrs + tlv
    put("tunnel_request", "proxy-v2-tcp4", sig + b"\x21\x11" + struct.pack(">H", len(body)) + body)
    put("tunnel_request", "proxy-v2-local", sig + b"\x20\x00\x00\x00")
    put("tunnel_request", "proxy-v2-long", sig + b"\x21\x11\xff\xff" + addrs)


def elf(bits, interp=b"/lib64/ld-linux-x86-64.so.2\x00", phnum=1, cut=None):
    if bits == 64:
        ehsize, phsize = 64, 56
        hdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
        hdr += struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, ehsize, 0, 0, ehsize, phsize, phnum, 64, 0, 0)
        off = ehsize + phsize * phnum
        ph = struct.pack("<IIQQQQQQ", 3, 4, off, off, off, len(interp), len(interp), 1)
    else:
        ehsize, phsize = 52, 32
        hdr = b"\x7fELF" + bytes([1, 1, 1, 0]) + bytes(8)
        hdr += struct.pack("<HHIIIIIHHHHHH", 3, 3, 1, 0, ehsize, 0, 0, ehsize, phsize, phnum, 40, 0, 0)
        off = ehsize + phsize * phnum
        ph = struct.pack("<IIIIIIII", 3, off, off, off, len(interp), len(interp), 4, 1)
    out = hdr + ph * phnum + interp
    return out[:cut] if cut else out


def elf_interp():
    put("elf_interp", "elf64", elf(64))
    put("elf_interp", "elf32", elf(32, b"/lib/ld-linux.so.2\x00"))
    put("elf_interp", "elf64-evil-interp", elf(64, b"/tmp/evil/ld.so\x00"))
    put("elf_interp", "elf64-truncated", elf(64, cut=80))
    put("elf_interp", "elf64-many-phdrs", elf(64, phnum=0xFFFF, cut=4096))
    put("elf_interp", "script", b"#!/bin/sh\necho hi\n")


def h2_authority():
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

    def frame(ftype, flags, stream, payload):
        return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", stream) + payload

    def lit(name, value):
        # Literal without indexing, new name.
        return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value

    block = (b"\x83\x86" + lit(b":path", b"/SpiffeWorkloadAPI/FetchX509SVID")
             + lit(b":authority", b"/run/tether/workload.sock") + lit(b"workload.spiffe.io", b"true"))
    settings = frame(4, 0, 0, b"")
    put("h2_authority", "grpc-unix-authority", preface + settings + frame(1, 4, 1, block) + frame(0, 1, 1, bytes(5)))
    put("h2_authority", "split-continuation", preface + frame(1, 0, 1, block[:10]) + frame(9, 4, 1, block[10:]))
    # Incremental indexing of a large value, then indexed references to it.
    bomb = b"\x40" + bytes([5]) + b"x-big" + b"\x7f" + bytes([0xB9, 0x16]) + b"a" * 3000 + bytes([0x80 | 62]) * 50
    put("h2_authority", "hpack-bomb", preface + frame(1, 4, 1, bomb))
    put("h2_authority", "padded-priority", preface + frame(1, 0x4 | 0x8 | 0x20, 1, b"\x02" + bytes(5) + block + bytes(2)))
    put("h2_authority", "http1", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


def x509_svid():
    with tempfile.TemporaryDirectory() as d:
        ca_key, ca = os.path.join(d, "ca.key"), os.path.join(d, "ca.pem")
        openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", ca_key)
        openssl("req", "-new", "-x509", "-key", ca_key, "-subj", "/O=example", "-days", "36500",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                "-addext", "subjectAltName=URI:spiffe://example.org", "-out", ca)
        ca_der = openssl("x509", "-in", ca, "-outform", "DER")

        def leaf(name, subj, san, days="36500"):
            key, csr, ext = (os.path.join(d, f"{name}.{x}") for x in ("key", "csr", "ext"))
            openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
            openssl("req", "-new", "-key", key, "-subj", subj, "-out", csr)
            with open(ext, "w") as f:
                f.write("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                        # An empty subject makes the SAN critical (RFC 5280, and
                        # the SPIFFE X.509-SVID checks enforce it).
                        + (f"subjectAltName={'critical,' if subj == '/' else ''}{san}\n" if san else ""))
            return openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-days", days,
                           "-extfile", ext, "-outform", "DER")

        w = leaf("w", "/", "URI:spiffe://example.org/w")
        put("x509_svid", "leaf.der", w)
        put("x509_svid", "chain.der", w + ca_der)
        mesh = leaf("mesh", "/OU=tether-mesh/CN=node1", "URI:spiffe://example.org/w")
        put("x509_svid", "mesh-chain.der", mesh + ca_der)
        node = leaf("node", "/", "URI:spiffe://example.org/tether/node/n1,IP:10.0.0.1,IP:::1")
        put("x509_svid", "node-ip-sans.der", node + ca_der)
        put("x509_svid", "no-san.der", leaf("nosan", "/CN=x", None) + ca_der)
        put("x509_svid", "two-uris.der", leaf("two", "/", "URI:spiffe://example.org/a,URI:spiffe://example.org/b") + ca_der)
        put("x509_svid", "other-td.der", leaf("other", "/", "URI:spiffe://other.org/w") + ca_der)
        put("x509_svid", "ca-only.der", ca_der)
        put("x509_svid", "truncated.der", (w + ca_der)[: len(w) + 40])
        put("x509_svid", "garbage", b"\x30\x82\xff\xff" + b"\x00" * 16)


def token_response():
    creds = (b"<Credentials><AccessKeyId>ASIAEXAMPLE</AccessKeyId><SecretAccessKey>wJalrXUtnFEMI/K7MDENG</SecretAccessKey>"
             b"<SessionToken>FQoGZXIvYXdz</SessionToken><Expiration>2026-12-03T11:00:00Z</Expiration></Credentials>")
    put("token_response", "sts_ok.xml",
        b'<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><AssumeRoleWithWebIdentityResult>'
        + creds + b"</AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>")
    put("token_response", "sts_error.xml",
        b"<ErrorResponse><Error><Type>Sender</Type><Code>InvalidIdentityToken</Code><Message>bad token</Message></Error></ErrorResponse>")
    put("token_response", "sts_dtd.xml", b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY b "c">]><a><Credentials>&b;</Credentials></a>')
    put("token_response", "token_ok.json",
        b'{"access_token":"eyJhbGciOi.abc-_~+/=","token_type":"Bearer","expires_in":3600,"scope":"read"}')
    put("token_response", "token_error.json", b'{"error":"invalid_client","error_description":"client authentication failed"}')
    put("token_response", "token_string_expiry.json",
        b'{"access_token":"t","token_type":"N_A","expires_in":"60","issued_token_type":"urn:ietf:params:oauth:token-type:access_token"}')


def http_requests():
    # The first byte is the piece size the stream is fed in.
    pipelined = (b"GET /a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer mine\r\n\r\n"
                 b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
                 b"PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;e=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"
                 b"GET /d HTTP/1.0\r\n\r\n")
    put("http_requests", "pipelined_1", b"\x01" + pipelined)
    put("http_requests", "pipelined_7", b"\x07" + pipelined)
    put("http_requests", "pipelined_all", b"\xff" + pipelined)
    put("http_requests", "smuggling", b"\x10POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    put("http_requests", "two_lengths", b"\x10POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd")
    put("http_requests", "upgrade", b"\x10GET / HTTP/1.1\r\nUpgrade: h2c\r\n\r\n")
    put("http_requests", "trailer_auth", b"\x10POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nAuthorization: x\r\n\r\n")
    put("http_requests", "folded", b"\x10GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n")
    put("http_requests", "tls_hello", b"\x40\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    put("http_requests", "huge_chunk", b"\x10POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nab")


def postgres_messages():
    def startup(params):
        body = struct.pack(">I", 196608) + b"".join(k + b"\0" + v + b"\0" for k, v in params) + b"\0"
        return struct.pack(">I", len(body) + 4) + body

    def msg(t, payload):
        return t + struct.pack(">I", len(payload) + 4) + payload
    put("postgres_messages", "startup", startup([(b"user", b"root"), (b"database", b"postgres"), (b"application_name", b"psql")]))
    put("postgres_messages", "startup_no_db", startup([(b"user", b"root")]))
    put("postgres_messages", "ssl_request", struct.pack(">II", 8, 80877103))
    put("postgres_messages", "cancel", struct.pack(">IIII", 16, 80877102, 1234, 5678))
    put("postgres_messages", "absurd_length", struct.pack(">II", 0x7fffffff, 196608))
    put("postgres_messages", "protocol_2", struct.pack(">II", 8, 0x20000))
    put("postgres_messages", "sasl", msg(b"R", struct.pack(">I", 10) + b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"))
    put("postgres_messages", "sasl_continue",
        msg(b"R", struct.pack(">I", 11) + b"r=abc,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"))
    put("postgres_messages", "sasl_final", msg(b"R", struct.pack(">I", 12) + b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="))
    put("postgres_messages", "md5", msg(b"R", struct.pack(">I", 5) + b"\x01\x02\x03\x04"))
    put("postgres_messages", "error",
        msg(b"E", b"SFATAL\0C28P01\0Mpassword authentication failed for user \"app\"\0\0"))
    put("postgres_messages", "ok_then_ready",
        msg(b"R", struct.pack(">I", 0)) + msg(b"S", b"server_version\x0017\0") + msg(b"Z", b"I"))


def redis_commands():
    def cmd(*args):
        return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
    put("redis_commands", "ping_set_get", b"\x03" + cmd(b"PING") + cmd(b"SET", b"k", b"v" * 300) + cmd(b"GET", b"k"))
    put("redis_commands", "inline", b"\x01PING\r\nGET k\r\n")
    put("redis_commands", "config_get", b"\x05" + cmd(b"PING") + cmd(b"CONFIG", b"GET", b"requirepass"))
    put("redis_commands", "hello_auth", b"\x40" + cmd(b"HELLO", b"3", b"AUTH", b"u", b"p"))
    put("redis_commands", "inline_quoted", b"\x40\"CONFIG\" GET x\r\n")
    put("redis_commands", "bad_bulk", b"\x40*1\r\n$-5\r\n")
    put("redis_commands", "huge_array", b"\x40*99999999999\r\n")


def redis_reply():
    put("redis_reply", "ok", b"+OK\r\n")
    put("redis_reply", "wrongpass", b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
    put("redis_reply", "trailing", b"+OK\r\n+PONG\r\n")
    put("redis_reply", "partial", b"+O")
    put("redis_reply", "integer", b":1\r\n")
    put("redis_reply", "bare_lf", b"+OK\n")


ALL = [spiffe_id, selector_parse, manifest_parse, csr_parse, bundle_json, jwt_validate,
       proc_events, kernel_records, tunnel_request, elf_interp, h2_authority, x509_svid,
       token_response, http_requests, redis_reply, postgres_messages, redis_commands]

if __name__ == "__main__":
    import sys
    # With target names, only those corpora are written again.
    chosen = [f for f in ALL if f.__name__ in sys.argv[1:]] if sys.argv[1:] else ALL
    if not sys.argv[1:]:
        shutil.rmtree(OUT, ignore_errors=True)
    for f in chosen:
        shutil.rmtree(os.path.join(OUT, f.__name__), ignore_errors=True)
        f()
