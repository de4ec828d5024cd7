//! Token exchange through the credential filesystem, against real peers:
//! - AWS: moto's server (request authentication on, so SigV4 and the role's
//!   policy are checked), with AssumeRoleWithWebIdentity verifying the
//!   JWT-SVID against Tether's OIDC discovery as AWS does (peers/aws.py);
//!   unmodified boto3 lists a bucket with the credentials file.
//! - OAuth2: node's oidc-provider (peers/oauth.mjs), with private_key_jwt
//!   against Tether's JWKS URL: client credentials and token exchange.
//! - Bad upstreams: an endpoint that goes away keeps the last good token
//!   until it expires, then the file is gone; random bytes as a token
//!   response are audited and never delivered.
//!
//! Each refusal is also proved at the destination by its own counters.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::peers::{self, Peer, World, world};
use common::*;

/// Entry point for workload child processes (see common::workload_command).
#[test]
fn child_entry() {
    child_entry_if_asked();
}

const NOBODY: u32 = 65534;

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn sha256_hex(s: &str) -> String {
    let f = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(f.path(), s).expect("write");
    sha256_file(f.path())
}

fn https_json(url: &str, ca: &Path) -> serde_json::Value {
    let o = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(ca)
        .arg(url)
        .output()
        .expect("curl");
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "{url}: {e}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

/// Unmodified boto3, credentials from the shared credentials file only.
const S3_LIST: &str = r#"
import hashlib, os, sys
import boto3
endpoint, creds_file = sys.argv[1], os.environ["AWS_SHARED_CREDENTIALS_FILE"]
try:
    print("sha256", hashlib.sha256(open(creds_file, "rb").read()).hexdigest())
except OSError as e:
    print("unreadable", e.strerror)
session = boto3.Session()
s3 = session.client("s3", endpoint_url=endpoint, region_name="us-east-1")
try:
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="tether-reports").get("Contents", [])]
    print("listed", ",".join(keys), "via", session.get_credentials().method)
except Exception as e:
    print("failed", type(e).__name__)
    sys.exit(0)
# SigV4 is really checked: one character of the secret changed is refused.
c = session.get_credentials().get_frozen_credentials()
bad = c.secret_key[:-1] + ("A" if c.secret_key[-1] != "A" else "B")
forged = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
    aws_access_key_id=c.access_key, aws_secret_access_key=bad, aws_session_token=c.token)
try:
    forged.list_objects_v2(Bucket="tether-reports")
    print("forged accepted")
except Exception as e:
    print("forged refused", e.response["Error"]["Code"] if hasattr(e, "response") else type(e).__name__)
"#;

fn line<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key).map(str::trim))
}

#[test]
fn sts_credentials_reach_boto3_in_the_bound_process_only() {
    let w = world();
    let up = &w.up;
    let python = python();
    let script = up.dir.path().join("s3_list.py");
    std::fs::write(&script, S3_LIST).expect("script");

    let aws = peers::Aws::start(&w, "spiffe://example.org/s3-reader");
    let endpoint = aws.endpoint.clone();
    let counts = || aws.counts();

    up.apply_ok(&format!(
        "apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata: {{name: s3-reader}}
spec:
  spiffeId: spiffe://example.org/s3-reader
  selectors: [[\"process:path:{py}\", \"process:cmdline-prefix:{py} {script}\", \"unix:uid:0\"]]
---
apiVersion: tether.dev/v1alpha1
kind: CredentialSource
metadata: {{name: reports-aws}}
spec:
  awsSts: {{roleArn: 'arn:aws:iam::123456789012:role/reader', duration: 15m, endpoint: '{endpoint}', region: us-east-1}}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialBinding
metadata: {{name: s3-reader-aws}}
spec: {{identity: s3-reader, source: reports-aws, file: {{name: aws, format: raw, mode: '0400'}}}}
",
        py = python.display(),
        script = script.display()
    ));

    let run = |script: &Path| -> (u32, String) {
        let child = no_loader_env(&mut Command::new(&python))
            .arg(script)
            .arg(&endpoint)
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                up.credentials_dir().join("aws"),
            )
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python");
        let pid = child.id();
        let o = child.wait_with_output().expect("python");
        let text =
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "boto3 script failed:\n{text}");
        (pid, text)
    };

    // The bound process: STS accepted its JWT-SVID, boto3 read the file as
    // a shared credentials file and listed the bucket; a forged signature
    // with the same key id is refused by S3.
    let (pid, text) = run(&script);
    assert!(
        text.contains("listed q3.csv via shared-credentials-file"),
        "the bound process:\n{text}\n{}",
        up.ok(&["events"])
    );
    assert!(
        text.contains("forged refused SignatureDoesNotMatch"),
        "SigV4 is not checked:\n{text}"
    );
    let file_hash = line(&text, "sha256").expect("file hash").to_string();
    assert_eq!(file_hash.len(), 64, "{text}");
    let c = counts();
    assert_eq!(c["sts_ok"], 1, "{c}");
    assert!(
        c["s3_ok"].as_u64() >= Some(1) && c["s3_refused"].as_u64() >= Some(1),
        "{c}"
    );
    up.audited(pid, "the bound read", |e| {
        e["event"] == "credential"
            && e["verdict"] == "allow"
            && e["op"] == "read"
            && e["source"] == "reports-aws"
    });
    assert!(
        !up.ok(&["events"]).contains("aws_secret_access_key"),
        "a credential in the audit"
    );

    // The same script at another path (not bound): boto3 finds nothing.
    let other = up.dir.path().join("copy");
    std::fs::create_dir_all(&other).expect("mkdir");
    let copy = other.join("s3_list.py");
    std::fs::write(&copy, S3_LIST).expect("copy");
    let (pid, text) = run(&copy);
    assert!(
        text.contains("unreadable No such file") && text.contains("failed NoCredentialsError"),
        "an unbound python obtained credentials:\n{text}"
    );
    up.audited(pid, "the unbound python's refusal", |e| {
        e["event"] == "credential" && e["verdict"] == "deny" && e["file"] == "aws"
    });
    // A root shell: nothing either.
    let (pid, text) = up.shell_attempt(0, "aws", &up.dir.path().join("root-shell"));
    assert!(
        text.contains("DENIED") && !text.contains("READ:") && !text.contains("aws\n"),
        "{text}"
    );
    up.audited(pid, "the root shell's refusal", |e| {
        e["event"] == "credential" && e["verdict"] == "deny"
    });
    // And at the destination: no second AssumeRoleWithWebIdentity, no
    // further successful S3 call.
    let after = counts();
    assert_eq!(
        (after["sts_ok"].clone(), after["s3_ok"].clone()),
        (c["sts_ok"].clone(), c["s3_ok"].clone()),
        "{after}"
    );
}

fn oauth_peer(w: &World, port: u16, ttl_secs: u32, name: &'static str) -> Peer {
    let ready = w.up.dir.path().join(format!("{name}.ready"));
    let _ = std::fs::remove_file(&ready);
    let node = servers::which("node");
    let mut cmd = Command::new(node);
    cmd.current_dir(peers::dir())
        .arg(peers::dir().join("oauth.mjs"))
        .arg(port.to_string())
        .arg(&w.issuer)
        .arg(&w.crt)
        .arg(&w.key)
        .arg(ttl_secs.to_string())
        .arg("tether-reader")
        .arg(&ready)
        .env("NODE_EXTRA_CA_CERTS", w.ca.cert());
    Peer::start(
        name,
        cmd,
        &ready,
        &w.up.dir.path().join(format!("{name}.log")),
    )
}

fn reader_identity(exe: &Path) -> String {
    format!(
        "apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata: {{name: reader}}
spec:
  spiffeId: spiffe://example.org/reader
  selectors: [[\"process:sha256:{hash}\", \"process:path:{path}\", \"unix:uid:{NOBODY}\"]]
---
",
        hash = sha256_file(exe),
        path = exe.display()
    )
}

fn oauth_source(name: &str, endpoint: &str, grant: &str, file: &str, format: &str) -> String {
    format!(
        "apiVersion: tether.dev/v1alpha1
kind: CredentialSource
metadata: {{name: {name}}}
spec:
  oauth2: {{tokenEndpoint: '{endpoint}', grant: {grant}, clientId: tether-reader, scope: ['reports:read'], audience: reports-api}}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialBinding
metadata: {{name: reader-{name}}}
spec: {{identity: reader, source: {name}, file: {{name: {file}, format: {format}}}}}
---
"
    )
}

#[test]
fn a_real_oauth_server_accepts_tethers_client_assertion_and_token_exchange() {
    let w = world();
    let up = &w.up;
    let port = free_port();
    let _oauth = oauth_peer(&w, port, 300, "oauth");
    let token_endpoint = format!("https://127.0.0.1:{port}/token");
    let counts = || {
        https_json(
            &format!("https://127.0.0.1:{port}/_tether/counts"),
            &w.ca.cert(),
        )
    };
    let exe = workload_binary(up.dir.path(), "cred-reader");
    up.apply_ok(&format!(
        "{}{}{}",
        reader_identity(&exe),
        oauth_source(
            "reports-cc",
            &token_endpoint,
            "clientCredentials",
            "reports-token",
            "raw"
        ),
        oauth_source(
            "reports-x",
            &token_endpoint,
            "tokenExchange",
            "exchanged",
            "json"
        ),
    ));

    let out = up.dir.path().join("reader");
    let o = up
        .creds_command(&exe, NOBODY, &out, &[])
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let files = out.join("files");
    let cc = read(&files.join("reports-token"));
    let exchanged: serde_json::Value = serde_json::from_str(&read(&files.join("exchanged")))
        .unwrap_or_else(|e| {
            panic!(
                "exchanged: {e}; server: {}\nevents:\n{}",
                counts(),
                up.ok(&["events"])
            )
        });
    let c = counts();
    let issued: Vec<String> = c["issued"]
        .as_array()
        .expect("issued")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    assert!(
        !cc.is_empty() && issued.contains(&sha256_hex(&cc)),
        "the client-credentials file is not a token the server issued: {cc:?}\n{c}"
    );
    let xt = exchanged["token"].as_str().expect("token field");
    assert!(
        issued.contains(&sha256_hex(xt)) && exchanged["expiresAt"].is_i64(),
        "the exchanged token is not one the server issued: {exchanged}\n{c}"
    );
    assert_eq!(
        (c["grant_ok"].as_u64(), c["grant_refused"].as_u64()),
        (Some(2), Some(0)),
        "{c}"
    );
    let pid: u32 = read(&out.join("pid")).trim().parse().expect("pid");
    up.audited(pid, "the token read", |e| {
        e["event"] == "credential" && e["verdict"] == "allow" && e["source"] == "reports-cc"
    });

    // A shell of the same uid gets no token, and the server issued none.
    let (pid, text) = up.shell_attempt(NOBODY, "reports-token", &up.dir.path().join("shell"));
    assert!(text.contains("DENIED") && !text.contains("READ:"), "{text}");
    up.audited(pid, "the shell's refusal", |e| {
        e["event"] == "credential" && e["verdict"] == "deny" && e["file"] == "reports-token"
    });
    let after = counts();
    assert_eq!(after["grant_ok"], c["grant_ok"], "{after}");
}

/// A token endpoint that answers every request with random bytes, and keeps
/// what it sent, so a test can prove none of it was delivered.
const GARBAGE: &str = r#"
import http.server, os, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = os.urandom(600)
        with open(sys.argv[2], "ab") as f:
            f.write(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
open(sys.argv[3], "w").write("ready")
s.serve_forever()
"#;

#[test]
fn a_failing_endpoint_keeps_the_last_token_until_expiry_and_garbage_is_never_delivered() {
    let w = world();
    let up = &w.up;
    let port = free_port();
    let mut oauth = oauth_peer(&w, port, 8, "short-oauth");
    let token_endpoint = format!("https://127.0.0.1:{port}/token");
    let gport = free_port();
    let sent = up.dir.path().join("garbage.sent");
    let gready = up.dir.path().join("garbage.ready");
    let mut gcmd = Command::new(python());
    gcmd.args(["-c", GARBAGE, &gport.to_string()])
        .arg(&sent)
        .arg(&gready);
    let _garbage = Peer::start("garbage", gcmd, &gready, &up.dir.path().join("garbage.log"));
    let exe = workload_binary(up.dir.path(), "cred-reader");
    up.apply_ok(&format!(
        "{}{}{}",
        reader_identity(&exe),
        oauth_source(
            "reports-cc",
            &token_endpoint,
            "clientCredentials",
            "reports-token",
            "raw"
        ),
        oauth_source(
            "junk",
            &format!("http://127.0.0.1:{gport}/token"),
            "clientCredentials",
            "junk-token",
            "raw"
        ),
    ));

    // A reader rereads its 8 s token for 14 s; the server goes away right
    // after the first read.
    let out = up.dir.path().join("reader");
    let mut child = up
        .creds_command(
            &exe,
            NOBODY,
            &out,
            &[
                ("TETHER_TEST_CRED_REREAD", "reports-token"),
                ("TETHER_TEST_CRED_SECS", "14"),
                ("TETHER_TEST_CRED_LOG", "1"),
            ],
        )
        .spawn()
        .expect("reader");
    assert!(
        wait_until(Duration::from_secs(30), || read(&out.join("timeline"))
            .lines()
            .any(|l| l.contains(" ok "))),
        "no first read:\n{}\n{}",
        read(&out.join("timeline")),
        up.logs()
    );
    oauth.stop();
    let status = child.wait().expect("reader");
    assert!(status.success());
    let timeline = read(&out.join("timeline"));
    let reads: Vec<(u64, bool, &str)> = timeline
        .lines()
        .filter_map(|l| {
            let mut p = l.splitn(3, ' ');
            let ms = p.next()?.parse().ok()?;
            let ok = p.next()? == "ok";
            Some((ms, ok, p.next().unwrap_or("")))
        })
        .collect();
    let first = reads.iter().find(|r| r.1).expect("a good read");
    let token = first.2;
    assert!(
        reads.iter().filter(|r| r.1).all(|r| r.2 == token),
        "another value was served:\n{timeline}"
    );
    // Kept past its refresh time (half of 8 s) while the server is gone...
    assert!(
        reads.iter().any(|r| r.1 && r.0 >= first.0 + 5_000),
        "the last good token was not kept:\n{timeline}"
    );
    // ...and gone once expired.
    let last = reads.last().expect("reads");
    assert!(
        last.0 >= first.0 + 10_000
            && !last.1
            && reads
                .iter()
                .filter(|r| r.0 >= first.0 + 9_500)
                .all(|r| !r.1),
        "served after expiry:\n{timeline}"
    );
    let pid: u32 = read(&out.join("pid")).trim().parse().expect("pid");
    up.audited(pid, "the kept token's failed refresh", |e| {
        e["event"] == "credential"
            && e["op"] == "fetch"
            && e["verdict"] == "error"
            && e["source"] == "reports-cc"
            && e["keptUntil"].is_i64()
            && e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("unreachable"))
    });
    up.audited(pid, "the expired token's failed read", |e| {
        e["event"] == "credential"
            && e["op"] == "read"
            && e["verdict"] == "error"
            && e["file"] == "reports-token"
    });

    // Random bytes: an error for the reader, audited, never its content.
    let junk_err = read(&out.join("errors/junk-token"));
    assert!(
        junk_err.contains("Input/output error") && !out.join("files/junk-token").exists(),
        "the junk file: {junk_err:?}"
    );
    up.audited(pid, "the garbage response", |e| {
        e["event"] == "credential"
            && e["op"] == "fetch"
            && e["verdict"] == "error"
            && e["source"] == "junk"
            && e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("bad response"))
    });
    let garbage = std::fs::read(&sent).expect("the garbage server answered");
    assert!(!garbage.is_empty());
    for f in std::fs::read_dir(out.join("files"))
        .expect("files")
        .flatten()
    {
        let v = std::fs::read(f.path()).expect("read");
        assert!(
            !garbage.windows(16).any(|w| v.windows(16).any(|x| x == w)),
            "{:?} holds bytes of the garbage response",
            f.path()
        );
    }

    // A failing source backs off for every process, not only the one that
    // saw it fail: of two fresh readers in a row, only the first reaches
    // the endpoint.
    let before = std::fs::read(&sent).expect("sent").len();
    let mut pids = Vec::new();
    for name in ["first", "second"] {
        let out = up.dir.path().join(name);
        let o = up
            .creds_command(&exe, NOBODY, &out, &[])
            .output()
            .expect("run");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(
            read(&out.join("errors/junk-token")).contains("Input/output error"),
            "{name}: {}",
            read(&out.join("errors/junk-token"))
        );
        pids.push(read(&out.join("pid")).trim().parse::<u32>().expect("pid"));
    }
    assert_eq!(
        std::fs::read(&sent).expect("sent").len() - before,
        600,
        "the endpoint was asked again within the backoff"
    );
    up.audited(
        pids[1],
        "the second reader's refusal during the backoff",
        |e| {
            e["event"] == "credential"
                && e["verdict"] == "error"
                && e["file"] == "junk-token"
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("backing off"))
        },
    );
}
