//! Certificates made by the openssl command line: a CA and leaves it signs,
//! for parties that are not Tether (a foreign trust domain, a web PKI
//! server certificate).

use std::path::{Path, PathBuf};
use std::process::Command;

/// An EC P-256 certificate authority in `dir` (files `NAME.crt`, `NAME.key`).
pub struct OpensslCa {
    dir: PathBuf,
    name: String,
}

/// Runs the openssl command line in `dir`; fails the test unless it
/// succeeds, and returns what it printed.
pub fn openssl(dir: &Path, args: &[&str]) -> String {
    let o = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

const EC_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
];

impl OpensslCa {
    pub fn new(dir: &Path, name: &str, subject: &str) -> OpensslCa {
        let (crt, key) = (format!("{name}.crt"), format!("{name}.key"));
        let _ = openssl(
            dir,
            &[
                &["req", "-x509"][..],
                &EC_KEY,
                &[
                    "-keyout", &key, "-out", &crt, "-days", "1", "-subj", subject,
                ],
            ]
            .concat(),
        );
        OpensslCa {
            dir: dir.to_path_buf(),
            name: name.to_string(),
        }
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.join(format!("{}.crt", self.name))
    }

    /// A leaf `NAME.crt`/`NAME.key` with the given subjectAltName (e.g.
    /// `URI:spiffe://...`, `IP:127.0.0.1`), usable for client and server
    /// authentication.
    pub fn leaf(&self, name: &str, subject_alt_name: &str) -> (PathBuf, PathBuf) {
        self.leaf_with_cn(name, name, subject_alt_name)
    }

    /// As [`OpensslCa::leaf`], with subject CN `cn` (files `NAME.*`).
    pub fn leaf_with_cn(&self, name: &str, cn: &str, subject_alt_name: &str) -> (PathBuf, PathBuf) {
        let (crt, key, csr, ext) = (
            format!("{name}.crt"),
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.cnf"),
        );
        let _ = openssl(
            &self.dir,
            &[
                &["req"][..],
                &EC_KEY,
                &["-keyout", &key, "-out", &csr, "-subj", &format!("/CN={cn}")],
            ]
            .concat(),
        );
        std::fs::write(
            self.dir.join(&ext),
            format!("subjectAltName={subject_alt_name}\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth,serverAuth\nbasicConstraints=critical,CA:FALSE\n"),
        )
        .expect("extension file");
        let (ca_crt, ca_key) = (format!("{}.crt", self.name), format!("{}.key", self.name));
        let _ = openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_crt,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &ext,
                "-out",
                &crt,
            ],
        );
        (self.dir.join(crt), self.dir.join(key))
    }
}
