//! Credential resources through `tether apply/get/delete` against a real
//! server (issue 11, part 1's resources): field-named errors, bindings
//! that must name existing identities and sources, and static secrets
//! that are sealed at rest and never output.

mod common;

use common::*;

const SECRET: &str = "correct-horse-battery-staple-41";

fn source_yaml(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: tether.dev/v1alpha1\nkind: CredentialSource\nmetadata: {{name: {name}}}\nspec:\n{spec}\n---\n"
    )
}

fn binding_yaml(name: &str, identity: &str, source: &str) -> String {
    format!(
        "apiVersion: tether.dev/v1alpha1\nkind: CredentialBinding\nmetadata: {{name: {name}}}\nspec:\n  identity: {identity}\n  source: {source}\n  file: {{name: {source}, mode: '0400'}}\n---\n"
    )
}

/// Every file under `dir`, searched for `needle` as bytes.
fn files_containing(dir: &std::path::Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            {
                hits.push(p.display().to_string());
            }
        }
    }
    hits
}

#[test]
fn sources_and_bindings_apply_with_checked_references_and_sealed_secrets() {
    let up = Up::start();
    let exe = workload_binary(up.dir.path(), "app");
    let id = binary_identity("app", &exe);

    // A binding to an identity or source that does not exist is refused at
    // apply, naming the field; nothing of that apply lands.
    let o = up.apply(
        &(source_yaml("db", &format!("  static: {{value: {SECRET}}}"))
            + &binding_yaml("b1", "app", "db")),
    );
    assert!(!o.status.success(), "binding to a missing identity applied");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        err.contains("spec.identity") && err.contains("WorkloadIdentity \"app\" does not exist"),
        "{err}"
    );
    let o = up.apply(&(id.clone() + &binding_yaml("b1", "app", "nosuch")));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success() && err.contains("spec.source"), "{err}");
    assert!(
        !up.ok(&["get", "wi"]).contains("name: app"),
        "a refused apply left its identity behind"
    );

    // A bad source names its field.
    let o = up.apply(&source_yaml(
        "sts",
        "  awsSts: {roleArn: 'arn:aws:iam::1:role/x', endpoint: 'http://sts.example.com', region: r}",
    ));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success() && err.contains("spec.awsSts.endpoint"),
        "{err}"
    );

    // Identity, source and binding in one apply.
    let all = id.clone()
        + &source_yaml("db", &format!("  static: {{value: {SECRET}}}"))
        + &source_yaml(
            "aws",
            "  awsSts: {roleArn: 'arn:aws:iam::123456789012:role/app', endpoint: 'http://127.0.0.1:5000', region: us-east-1}",
        )
        + &binding_yaml("app-db", "app", "db");
    let out = up.apply_ok(&all);
    for want in [
        "CredentialSource/db created",
        "CredentialSource/aws created",
        "CredentialBinding/app-db created",
    ] {
        assert!(out.contains(want), "{out}");
    }
    // The same secret again is unchanged (sealed values compare by tag).
    let out = up.apply_ok(&all);
    assert!(out.contains("CredentialSource/db unchanged"), "{out}");

    // Never output, never stored in clear.
    let got = up.ok(&["get", "credentialsources"]);
    assert!(
        got.contains("name: db") && got.contains("name: aws"),
        "{got}"
    );
    assert!(!got.contains(SECRET) && !got.contains("sealed:"), "{got}");
    assert!(got.contains("<redacted>"), "{got}");
    let got = up.ok(&["get", "cb", "app-db"]);
    assert!(
        got.contains("identity: app") && got.contains("source: db"),
        "{got}"
    );
    let data = up.dir.path().join("data");
    assert!(data.join("server").join("server.db").exists());
    let hits = files_containing(&data, SECRET.as_bytes());
    assert!(hits.is_empty(), "the secret is in clear in {hits:?}");
    // The scan does see what the database holds in clear.
    assert!(
        !files_containing(&data, b"arn:aws:iam::123456789012:role/app").is_empty(),
        "the scan found nothing the store wrote"
    );
    let key = data.join("server").join("secrets.key");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key).expect("secrets key").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // A changed secret is configured; deleting works by kind alias.
    let out = up.apply_ok(&source_yaml("db", "  static: {value: another-secret}"));
    assert!(out.contains("CredentialSource/db configured"), "{out}");
    up.ok(&["delete", "cb", "app-db"]);
    assert!(!up.ok(&["get", "cb"]).contains("app-db"));
}

#[test]
fn output_into_a_closed_pipe_ends_the_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let up = Up::start();
    // The reader is gone before the command writes (it connects first).
    let mut child = std::process::Command::new(TETHER)
        .args(["get", "bundle"])
        .env("TETHER_ADMIN_SOCKET", up.admin_socket())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tether get");
    drop(child.stdout.take());
    let o = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        o.status.success() || o.status.signal() == Some(libc::SIGPIPE),
        "{:?}: {err}",
        o.status
    );
}
