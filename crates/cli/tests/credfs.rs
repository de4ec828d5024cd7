//! The credential filesystem against the real binary: the entitled process
//! reads its static secret, its own SVID, key and bundle, and an AWS STS
//! credential (moto, exchanged with its JWT-SVID) from its files;
//! a same-uid shell, root, a copy of the binary at another path and the
//! binary after exec'ing a shell each see an empty directory and ENOENT, and
//! each attempt is audited; fetched credentials go when the process exits,
//! and a 10 s JWT-SVID is refreshed in place while a reader rereads it.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// Entry point for workload child processes (see common::workload_command).
#[test]
fn child_entry() {
    child_entry_if_asked();
}

const SECRET: &str = "correct horse battery staple";
const NOBODY: u32 = 65534;

fn manifests(exe: &Path) -> String {
    let hash = sha256_file(exe);
    format!(
        "apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata: {{name: reader}}
spec:
  spiffeId: spiffe://example.org/reader
  jwtTtl: 10s
  selectors: [[\"process:sha256:{hash}\", \"process:path:{path}\", \"unix:uid:{NOBODY}\"]]
---
apiVersion: tether.dev/v1alpha1
kind: CredentialSource
metadata: {{name: db-password}}
spec:
  static: {{value: \"{SECRET}\"}}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialSource
metadata: {{name: own-svid}}
spec:
  x509Svid: {{}}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialSource
metadata: {{name: api-token}}
spec:
  jwtSvid: {{audience: [api.example]}}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialBinding
metadata: {{name: reader-db}}
spec: {{identity: reader, source: db-password, file: {{name: db-password, format: raw, mode: '0400'}}}}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialBinding
metadata: {{name: reader-svid}}
spec: {{identity: reader, source: own-svid, file: {{name: svid, format: pem}}}}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialBinding
metadata: {{name: reader-token}}
spec: {{identity: reader, source: api-token, file: {{name: token, format: raw}}}}
",
        path = exe.display()
    )
}

/// The creds workload, also trying db-password by its exact path.
fn creds_command(up: &Up, exe: &Path, uid: u32, out: &Path, env: &[(&str, &str)]) -> Command {
    let mut c = up.creds_command(exe, uid, out, env);
    c.env("TETHER_TEST_CRED_TRY", "db-password");
    c
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn openssl_ok(args: &[&str]) -> String {
    pki::openssl(Path::new("/"), args)
}

fn denied_for(up: &Up, pid: u32, who: &str) {
    up.audited(pid, &format!("{who}'s refused lookup"), |e| {
        e["event"] == "credential" && e["verdict"] == "deny" && e["file"] == "db-password"
    });
}

#[test]
fn each_process_sees_only_its_own_credentials() {
    // With OIDC discovery, so moto's STS can verify the reader's JWT-SVID.
    let w = peers::world();
    let up = &w.up;
    let aws = peers::Aws::start(&w, "spiffe://example.org/reader");
    let exe = workload_binary(up.dir.path(), "cred-reader");
    up.apply_ok(&format!(
        "{}---
apiVersion: tether.dev/v1alpha1
kind: CredentialSource
metadata: {{name: reports-aws}}
spec:
  awsSts: {{roleArn: 'arn:aws:iam::123456789012:role/reader', duration: 15m, endpoint: '{}', region: us-east-1}}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialBinding
metadata: {{name: reader-aws}}
spec: {{identity: reader, source: reports-aws, file: {{name: aws, format: raw, mode: '0400'}}}}
",
        manifests(&exe),
        aws.endpoint
    ));

    // The entitled process: its files, by content.
    let out = up.dir.path().join("authorized");
    let o = creds_command(up, &exe, NOBODY, &out, &[])
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let listing = read(&out.join("listing"));
    assert_eq!(
        listing,
        "aws\ndb-password\nsvid\nsvid.bundle\nsvid.key\ntoken",
        "entitled listing; errors: {:?}\n{}",
        std::fs::read_dir(out.join("errors")).map(|d| d.count()),
        up.logs()
    );
    let files = out.join("files");
    let applied = up.dir.path().join("applied-secret");
    std::fs::write(&applied, SECRET).expect("write");
    assert_eq!(
        sha256_file(&files.join("db-password")),
        sha256_file(&applied),
        "the static secret as applied"
    );
    let subject = openssl_ok(&[
        "x509",
        "-noout",
        "-ext",
        "subjectAltName",
        "-in",
        files.join("svid").to_str().expect("utf-8"),
    ]);
    assert!(
        subject.contains("URI:spiffe://example.org/reader"),
        "{subject}"
    );
    let cert_key = openssl_ok(&[
        "x509",
        "-noout",
        "-pubkey",
        "-in",
        files.join("svid").to_str().expect("utf-8"),
    ]);
    let own_key = openssl_ok(&[
        "pkey",
        "-pubout",
        "-in",
        files.join("svid.key").to_str().expect("utf-8"),
    ]);
    assert_eq!(cert_key, own_key, "the key file is the certificate's key");
    openssl_ok(&[
        "verify",
        "-CAfile",
        files.join("svid.bundle").to_str().expect("utf-8"),
        files.join("svid").to_str().expect("utf-8"),
    ]);
    let token = read(&files.join("token"));
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    // The STS credential: exchanged once with its JWT-SVID, and good for S3
    // (moto checks the signature), read by boto3 from the file as written.
    let creds = read(&files.join("aws"));
    assert!(
        creds.starts_with("[default]\naws_access_key_id = ") && creds.contains("aws_session_token"),
        "{creds}"
    );
    assert_eq!(aws.counts()["sts_ok"], 1, "{}", aws.counts());
    let o = no_loader_env(&mut Command::new(python()))
        .args([
            "-c",
            "import boto3, sys; print(len(boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1').list_objects_v2(Bucket='tether-reports')['Contents']))",
            &aws.endpoint,
        ])
        .env("AWS_SHARED_CREDENTIALS_FILE", files.join("aws"))
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .expect("boto3");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "1",
        "the delivered STS credential does not list the bucket: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let pid: u32 = read(&out.join("pid")).trim().parse().expect("pid");
    up.audited(pid, "the entitled read", |e| {
        e["event"] == "credential"
            && e["verdict"] == "allow"
            && e["op"] == "read"
            && e["binding"] == "reader-db"
            && e["source"] == "db-password"
            && e["identity"] == "reader"
    });
    assert!(
        !up.events().iter().any(|e| e.to_string().contains(SECRET)),
        "the secret is in the audit"
    );

    // A shell of the same uid, and root.
    for (who, uid) in [("same-uid shell", NOBODY), ("root shell", 0)] {
        let (pid, text) = up.shell_attempt(
            uid,
            "db-password",
            &up.dir.path().join(who.replace(' ', "-")),
        );
        assert!(
            text.contains("DENIED") && !text.contains("READ:") && !text.contains("db-password\n"),
            "{who} saw something: {text}"
        );
        denied_for(up, pid, who);
    }

    // A copy of the binary at another path (same sha256).
    let copy_dir = up.dir.path().join("elsewhere");
    std::fs::create_dir_all(&copy_dir).expect("mkdir");
    std::fs::set_permissions(
        &copy_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let copy = copy_dir.join("cred-reader");
    std::fs::copy(&exe, &copy).expect("copy");
    let out = up.dir.path().join("copy");
    let o = creds_command(up, &copy, NOBODY, &out, &[])
        .output()
        .expect("run copy");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read(&out.join("listing")), "", "the copy's listing");
    assert!(
        read(&out.join("errors/db-password")).contains("No such file"),
        "the copy's read: {}",
        read(&out.join("errors/db-password"))
    );
    denied_for(
        up,
        read(&out.join("pid")).trim().parse().expect("pid"),
        "the copy",
    );

    // The entitled binary after exec'ing a shell: the same pid, another image.
    let out = up.dir.path().join("exec");
    let script = format!(
        "ls -A {dir} > {out}/exec_listing 2>&1; if IFS= read -r l < {dir}/db-password; then echo \"READ:$l\" > {out}/exec_read; else echo DENIED > {out}/exec_read; fi",
        dir = up.credentials_dir().display(),
        out = out.display()
    );
    let o = creds_command(
        up,
        &exe,
        NOBODY,
        &out,
        &[("TETHER_TEST_CRED_EXEC", &script)],
    )
    .output()
    .expect("run exec");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        read(&out.join("listing")).contains("db-password"),
        "before exec it is entitled"
    );
    assert_eq!(read(&out.join("exec_listing")), "", "after exec: listing");
    assert_eq!(
        read(&out.join("exec_read")).trim(),
        "DENIED",
        "after exec: read"
    );
    denied_for(
        up,
        read(&out.join("pid")).trim().parse().expect("pid"),
        "the exec'd shell",
    );

    // Nothing of it on disk: the mount is FUSE and files have no page cache.
    let mounts = read(Path::new("/proc/self/mountinfo"));
    let dir = up.credentials_dir();
    assert!(
        mounts
            .lines()
            .any(|l| l.contains(dir.to_str().expect("utf-8")) && l.contains(" - fuse tether ")),
        "credential directory is not the FUSE mount:\n{mounts}"
    );
}

#[test]
fn fetched_credentials_go_at_exit_and_tokens_refresh_in_place() {
    let up = Up::start();
    let exe = workload_binary(up.dir.path(), "cred-reader");
    up.apply_ok(&manifests(&exe));

    // A holder: fetches, is listed with its bindings, then is killed.
    let out = up.dir.path().join("holder");
    let mut child = creds_command(&up, &exe, NOBODY, &out, &[("TETHER_TEST_CRED_HOLD", "1")])
        .spawn()
        .expect("spawn holder");
    assert!(
        wait_until(Duration::from_secs(20), || out.join("ready").exists()),
        "holder never read its files"
    );
    let pid: u32 = read(&out.join("pid")).trim().parse().expect("pid");
    let listed = |up: &Up| -> Option<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_str(&up.ok(&["credentials"])).ok()?;
        v["processes"]
            .as_array()?
            .iter()
            .find(|p| p["pid"] == pid)
            .cloned()
    };
    let entry = listed(&up).expect("holder listed by `tether credentials`");
    let db = entry["bindings"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["binding"] == "reader-db"))
        .cloned()
        .expect("reader-db listed");
    assert!(db["fetched"].is_i64() && db["kind"] == "static", "{entry}");
    assert!(
        !entry.to_string().contains(SECRET),
        "a value in the listing"
    );
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        wait_until(Duration::from_secs(1), || listed(&up).is_none()),
        "the exited process's credentials are still held"
    );

    // A 10 s JWT-SVID reread for 14 s: refreshed in place at least twice.
    let out = up.dir.path().join("reread");
    let o = creds_command(
        &up,
        &exe,
        NOBODY,
        &out,
        &[
            ("TETHER_TEST_CRED_REREAD", "token"),
            ("TETHER_TEST_CRED_SECS", "14"),
        ],
    )
    .output()
    .expect("run reread");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let d = read(&out.join("distinct"));
    let mut it = d.split_whitespace().map(|n| n.parse::<u32>().unwrap_or(0));
    let (distinct, failures) = (it.next().unwrap_or(0), it.next().unwrap_or(u32::MAX));
    assert!(
        distinct >= 3 && failures == 0,
        "tokens seen {distinct}, failed reads {failures}\n{}",
        up.logs()
    );
}

/// nginx (Debian's, unmodified) serves mutual TLS with the SVID, key and
/// bundle files the credential filesystem delivers to it, and curl
/// authenticates with its own delivered SVID; after the agent rotates
/// nginx's SVID, a reload (no restart) serves the new certificate.
#[test]
fn nginx_and_curl_use_their_delivered_svids_for_mutual_tls() {
    // Selectors name the real file (/proc's exe link), not a symlinked
    // directory on PATH such as /sbin.
    let real = |p: std::path::PathBuf| std::fs::canonicalize(&p).expect("canonical path");
    let nginx = real(common::servers::which("nginx"));
    let curl = real(common::servers::which("curl"));
    let up = Up::start();
    let id = |name: &str, exe: &Path, extra: &str| {
        format!(
            "apiVersion: tether.dev/v1alpha1\nkind: WorkloadIdentity\nmetadata: {{name: {name}}}\nspec:\n  spiffeId: spiffe://example.org/{name}\n  x509Ttl: 20s\n{extra}  selectors: [[\"process:path:{}\", \"unix:uid:0\"]]\n---\napiVersion: tether.dev/v1alpha1\nkind: CredentialBinding\nmetadata: {{name: {name}-svid}}\nspec: {{identity: {name}, source: own-svid, file: {{name: {name}, format: pem}}}}\n---\n",
            exe.display()
        )
    };
    up.apply_ok(&format!(
        "{}{}apiVersion: tether.dev/v1alpha1\nkind: CredentialSource\nmetadata: {{name: own-svid}}\nspec: {{x509Svid: {{}}}}\n",
        id("web", &nginx, "  dnsNames: [localhost]\n"),
        id("client", &curl, "")
    ));
    let creds = up.credentials_dir();
    let prefix = up.dir.path().join("nginx");
    std::fs::create_dir_all(prefix.join("logs")).expect("mkdir");
    let port = free_port();
    let c = |n: &str| creds.join(n).display().to_string();
    let p = |n: &str| prefix.join(n).display().to_string();
    std::fs::write(
        prefix.join("nginx.conf"),
        format!(
            "daemon off;\nmaster_process on;\nuser root;\nworker_processes 1;\npid {pid};\nerror_log {err} info;\nevents {{ worker_connections 64; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {t}/body; proxy_temp_path {t}/proxy; fastcgi_temp_path {t}/fcgi; uwsgi_temp_path {t}/uwsgi; scgi_temp_path {t}/scgi;\n  server {{\n    listen 127.0.0.1:{port} ssl;\n    server_name localhost;\n    ssl_certificate {cert};\n    ssl_certificate_key {key};\n    ssl_client_certificate {bundle};\n    ssl_verify_client on;\n    ssl_verify_depth 4;\n    location / {{ return 200 \"verified=$ssl_client_verify\\n\"; }}\n  }}\n}}\n",
            pid = p("nginx.pid"),
            err = p("logs/error.log"),
            t = p("logs"),
            cert = c("web"),
            key = c("web.key"),
            bundle = c("web.bundle"),
        ),
    )
    .expect("nginx.conf");
    // Once the agent has the bindings (the apply reaches it through the
    // watch), `nginx -t` loads the certificate files like a start does.
    let mut check = String::new();
    let ready = wait_until(Duration::from_secs(20), || {
        let o = no_loader_env(&mut Command::new(&nginx))
            .args(["-t", "-p", &p(""), "-c", &p("nginx.conf")])
            .output()
            .expect("nginx -t");
        check = String::from_utf8_lossy(&o.stderr).into_owned();
        o.status.success()
    });
    assert!(ready, "nginx -t never loaded its delivered files: {check}");
    // Without cargo's loader variables: a process started with
    // LD_LIBRARY_PATH holds no identity (see `allowExec`).
    let mut server = no_loader_env(&mut Command::new(&nginx))
        .args(["-p", &p(""), "-c", &p("nginx.conf")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start nginx");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let master = server.id();
    let get = || -> (bool, String, String) {
        let o = no_loader_env(&mut Command::new(&curl))
            .args(["-sS", "--max-time", "5", "--resolve"])
            .arg(format!("localhost:{port}:127.0.0.1"))
            .args([
                "--cert",
                &c("client"),
                "--key",
                &c("client.key"),
                "--cacert",
                &c("client.bundle"),
            ])
            .args(["-w", "%{certs}"])
            .arg(format!("https://localhost:{port}/"))
            .output()
            .expect("curl");
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        (
            o.status.success(),
            out,
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let mut last = (false, String::new(), String::new());
    let served = wait_until(Duration::from_secs(20), || {
        last = get();
        last.0
    });
    if !served {
        let _ = server.kill();
        let o = server.wait_with_output().expect("nginx output");
        panic!(
            "curl over mutual TLS failed: {} {}\nnginx: {}\n{}\n{}",
            last.1,
            last.2,
            String::from_utf8_lossy(&o.stderr),
            read(&prefix.join("logs/error.log")),
            up.events()
                .iter()
                .filter(|e| e["event"] == "credential")
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let server = Kill(server);
    assert!(last.1.contains("verified=SUCCESS"), "{}", last.1);
    let first_cert = last
        .1
        .split("verified=SUCCESS")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    assert!(
        first_cert.contains("BEGIN CERTIFICATE"),
        "no server certificate in curl's output: {}",
        last.1
    );

    // A curl without the client SVID is refused by nginx itself.
    let o = Command::new("curl")
        .args(["-sS", "--max-time", "5", "-k", "--resolve"])
        .arg(format!("localhost:{port}:127.0.0.1"))
        .arg(format!("https://localhost:{port}/"))
        .output()
        .expect("curl");
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("verified=SUCCESS"),
        "nginx served a client without a certificate"
    );

    // The agent rotates nginx's SVID at half of its 20 s life; a reload
    // (SIGHUP to the same master) picks up the new files.
    let rotated = wait_until(Duration::from_secs(40), || {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(master as i32, libc::SIGHUP) };
        std::thread::sleep(Duration::from_millis(500));
        let (ok, out, _) = get();
        ok && out.contains("verified=SUCCESS") && !out.ends_with(&first_cert)
    });
    assert!(
        rotated,
        "nginx never served a rotated SVID\n{}",
        read(&prefix.join("logs/error.log"))
    );
    assert_eq!(server.0.id(), master, "nginx was restarted");
}
