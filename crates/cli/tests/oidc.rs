//! OIDC discovery against an independent relying party: PyJWT's JWKS client
//! finds the issuer's keys through `/.well-known/openid-configuration` over
//! HTTPS and validates a JWT-SVID fetched by py-spiffe, and stops validating
//! it once its key has been rotated out and the token has expired.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const RELYING_PARTY: &str = r#"
import json, ssl, sys, urllib.request
import jwt
issuer, ca, step = sys.argv[1], sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
def get(url):
    with urllib.request.urlopen(url, context=ctx, timeout=10) as r:
        return json.load(r)
conf = get(issuer + "/.well-known/openid-configuration")
assert conf["issuer"] == issuer, conf
kids = [k["kid"] for k in get(conf["jwks_uri"])["keys"]]
if step == "fetch":
    from spiffe import WorkloadApiClient
    token = WorkloadApiClient().fetch_jwt_svid(audience={"sts.example"}).token
else:
    token = sys.stdin.read().strip()
kid = jwt.get_unverified_header(token)["kid"]
print("kid", kid, "published", kid in kids)
try:
    key = jwt.PyJWKClient(conf["jwks_uri"], ssl_context=ctx).get_signing_key_from_jwt(token)
    claims = jwt.decode(token, key, algorithms=["ES256"], audience="sts.example", issuer=issuer)
    print("valid", claims["sub"], claims["iss"])
except Exception as e:
    print("refused", type(e).__name__, e)
if step == "fetch":
    print("token", token)
"#;

struct Rp {
    python: std::path::PathBuf,
    issuer: String,
    ca: std::path::PathBuf,
    socket: std::path::PathBuf,
}

impl Rp {
    fn run(&self, step: &str, token: &str) -> String {
        use std::io::Write;
        let mut c = no_loader_env(&mut Command::new(&self.python))
            .args(["-c", RELYING_PARTY, &self.issuer])
            .arg(&self.ca)
            .arg(step)
            .env(
                "SPIFFE_ENDPOINT_SOCKET",
                format!("unix://{}", self.socket.display()),
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("python");
        c.stdin
            .take()
            .expect("stdin")
            .write_all(token.as_bytes())
            .expect("token to stdin");
        let o = c.wait_with_output().expect("python");
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            o.status.success(),
            "relying party ({step}) failed: {}\n{text}",
            String::from_utf8_lossy(&o.stderr)
        );
        text
    }
}

fn line<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(key).map(str::trim))
        .unwrap_or_else(|| panic!("no {key:?} line in:\n{text}"))
}

#[test]
fn a_relying_party_discovers_the_issuer_and_validates_until_the_key_is_retired() {
    let w = peers::world();
    let (up, issuer, ca) = (&w.up, w.issuer.clone(), &w.ca);
    let listen = issuer.trim_start_matches("https://").to_owned();
    let python = python();
    up.apply_ok(&format!(
        "apiVersion: tether.dev/v1alpha1\nkind: WorkloadIdentity\nmetadata: {{name: rp-client}}\nspec:\n  spiffeId: spiffe://example.org/rp-client\n  jwtTtl: 10s\n  selectors: [[\"process:path:{}\", \"unix:uid:0\"]]\n",
        python.display()
    ));
    let rp = Rp {
        python,
        issuer: issuer.clone(),
        ca: ca.cert(),
        socket: up.workload_socket(),
    };

    // Discovery, then validation with the discovered keys; `iss` is the
    // operator's issuer URL.
    let first = rp.run("fetch", "");
    assert!(
        first.contains(&format!("valid spiffe://example.org/rp-client {issuer}")),
        "{first}"
    );
    let token = line(&first, "token").to_string();
    let old_kid = line(&first, "kid")
        .split_whitespace()
        .next()
        .expect("kid")
        .to_string();

    // A rotation publishes a new signing key; the retired one stays in the
    // JWKS while a token it signed is alive.
    up.ok(&["ca", "rotate", "prepare"]);
    up.ok(&["ca", "rotate", "activate"]);
    let during = rp.run("check", &token);
    assert!(
        during.contains(&format!("kid {old_kid} published True"))
            && during.contains("valid spiffe://example.org/rp-client"),
        "the old key left the JWKS while its token was alive:\n{during}"
    );
    let fresh = rp.run("fetch", "");
    assert!(
        !fresh.contains(&format!("kid {old_kid} ")) && fresh.contains("valid spiffe://"),
        "a token after rotation was not signed by the new key, or did not validate:\n{fresh}"
    );

    // Past the token's expiry and the validators' clock-skew leeway, the
    // next key check (here forced by an operator's prepare) drops the key:
    // the same relying party cannot find it any more.
    // Meanwhile, a client that never starts its TLS handshake is dropped
    // after 5 s, well before the 30 s a connection may last.
    let mut silent = std::net::TcpStream::connect(&listen).expect("connect");
    std::thread::sleep(Duration::from_secs(10));
    silent
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut byte = [0u8; 1];
    let closed = match std::io::Read::read(&mut silent, &mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(
        closed,
        "a silent client still holds its connection after 10 s"
    );
    std::thread::sleep(Duration::from_secs(31));
    up.ok(&["ca", "rotate", "prepare"]);
    let after = wait_until(Duration::from_secs(10), || {
        rp.run("check", &token)
            .contains(&format!("kid {old_kid} published False"))
    });
    assert!(after, "the retired key is still published");
    let refused = rp.run("check", &token);
    assert!(
        refused.contains("refused PyJWKClientError")
            && refused.contains("Unable to find a signing key"),
        "{refused}"
    );
}
