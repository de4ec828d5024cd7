//! Containers for tests: podman and runc from Debian, images assembled
//! from a root filesystem (no registry), each container in a network
//! namespace of its own linked by a private veth pair to the host (or to a
//! [`Lan`] host), under an enforced cgroup. Everything is removed on drop,
//! also when a test fails.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::kernel::Cgroup;
use super::netns::Lan;
use super::rand_suffix;
use super::servers::which;

static SEQ: AtomicU32 = AtomicU32::new(0);

pub fn podman() -> Command {
    let mut c = Command::new(which("podman"));
    c.stdin(Stdio::null());
    c
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

pub fn run_ok(cmd: &mut Command) -> String {
    let o = run(cmd);
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Images built from a root filesystem the test assembles: the host's /usr
/// is mounted read-only at run time, so the binaries inside are the host's
/// own (same bytes, same hashes); a marker file makes each image distinct.
pub struct Image {
    pub reference: String,
    pub id: String,
}

impl Image {
    pub fn build(tag: &str) -> Image {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        for d in [
            "etc", "tmp", "proc", "sys", "dev", "run", "usr", "var", "creds", "spire",
        ] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        for (link, to) in [
            ("bin", "usr/bin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
            ("sbin", "usr/sbin"),
        ] {
            std::os::unix::fs::symlink(to, root.join(link)).expect("symlink");
        }
        for f in ["passwd", "group"] {
            std::fs::copy(Path::new("/etc").join(f), root.join("etc").join(f)).expect("copy");
        }
        let reference = format!("localhost/tether-test-{}-{tag}:t", rand_suffix());
        std::fs::write(root.join("etc/tether-image"), &reference).expect("marker");
        let tar = dir.path().join("image.tar");
        run_ok(
            Command::new("tar")
                .arg("-C")
                .arg(&root)
                .arg("-cf")
                .arg(&tar)
                .arg("."),
        );
        let out = run_ok(podman().arg("import").arg(&tar).arg(&reference));
        let id = out
            .lines()
            .last()
            .unwrap_or_default()
            .trim_start_matches("sha256:")
            .to_string();
        assert_eq!(id.len(), 64, "podman import printed no image id: {out}");
        Image { reference, id }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = podman().args(["rmi", "-f", &self.reference]).output();
    }
}

/// A network namespace of the test's own, linked to the host by a veth
/// pair on a private /30: what a container's own network looks like.
pub struct CtNet {
    pub name: String,
    host_if: String,
    /// The address of the other end (the host, or the Lan host).
    pub host_addr: String,
    /// The namespace the other end is in (None: the test's own).
    outer: Option<String>,
}

impl CtNet {
    /// Linked to the test's own network namespace (the host).
    pub fn new() -> CtNet {
        Self::make(None)
    }

    /// Linked to `host` of `lan` instead, with a default route through it.
    pub fn on(lan: &Lan, host: &str) -> CtNet {
        Self::make(Some(lan.ns_name(host)))
    }

    fn make(outer: Option<String>) -> CtNet {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}{}", std::process::id() % 100_000, n);
        let name = format!("tether-ct-{tag}");
        let host_if = format!("tch{tag}");
        let ct_if = format!("tcc{tag}");
        // 10.213.(pid-derived).(4n)/30: .1 the outer end, .2 the container.
        let b = (std::process::id() % 200) as u8;
        let c = (n * 4 % 252) as u8;
        let host_addr = format!("10.213.{b}.{}", c + 1);
        let ct_addr = format!("10.213.{b}.{}", c + 2);
        let net = CtNet {
            name: name.clone(),
            host_if: host_if.clone(),
            host_addr: host_addr.clone(),
            outer: outer.clone(),
        };
        let ip = |args: &[&str]| run_ok(Command::new("ip").args(args));
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ct_if,
        ]);
        ip(&["link", "set", &ct_if, "netns", &name]);
        let outer_args: Vec<&str> = match &outer {
            Some(o) => {
                ip(&["link", "set", &host_if, "netns", o]);
                vec!["-n", o.as_str()]
            }
            None => vec![],
        };
        let on_outer = |args: &[&str]| {
            let mut all = outer_args.clone();
            all.extend_from_slice(args);
            ip(&all)
        };
        on_outer(&["addr", "add", &format!("{host_addr}/30"), "dev", &host_if]);
        on_outer(&["link", "set", &host_if, "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{ct_addr}/30"),
            "dev",
            &ct_if,
        ]);
        ip(&["-n", &name, "link", "set", &ct_if, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        if outer.is_some() {
            ip(&["-n", &name, "route", "add", "default", "via", &host_addr]);
        }
        net
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }
}

impl Drop for CtNet {
    fn drop(&mut self) {
        // Deleting either end of a veth pair deletes both.
        if self.outer.is_none() {
            let _ = Command::new("ip")
                .args(["link", "del", &self.host_if])
                .output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// The enforced cgroup, as podman's `--cgroup-parent`; podman also makes
/// it in every cgroup v1 hierarchy, which this removes afterwards.
pub struct Scope {
    /// Owned when this made it (dropped after the v1 cleanup).
    cg: Option<Cgroup>,
    unified: std::path::PathBuf,
    pub rel: String,
}

impl Scope {
    pub fn new(tag: &str) -> Scope {
        let cg = Cgroup::new(tag);
        let mut s = Self::at(&cg.path);
        s.cg = Some(cg);
        s
    }

    /// For a cgroup someone else owns (and removes).
    pub fn at(path: &Path) -> Scope {
        let mnt = tether_kernel::cgroup2_mount().expect("cgroup2 mount");
        let rel = format!(
            "/{}",
            path.strip_prefix(&mnt).expect("under the mount").display()
        );
        Scope {
            cg: None,
            unified: path.to_path_buf(),
            rel,
        }
    }

    pub fn path(&self) -> &Path {
        &self.unified
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
            for e in entries.flatten() {
                let p = e.path().join(self.rel.trim_start_matches('/'));
                if p != self.unified && p.exists() {
                    // Only what podman made is left by now: the parent and
                    // the cgroup of its monitors (`conmon`), both empty.
                    for _ in 0..100 {
                        let _ = std::fs::remove_dir(p.join("conmon"));
                        if std::fs::remove_dir(&p).is_ok() || !p.exists() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        }
        // The unified one's `conmon` too, before the Cgroup goes.
        let _ = std::fs::remove_dir(self.unified.join("conmon"));
    }
}

/// A running container, removed on drop.
pub struct Container {
    pub name: String,
    pub pid: u32,
    pub id: String,
}

impl Container {
    /// `podman exec` in it.
    pub fn exec(&self, argv: &[String]) -> Output {
        run(podman().arg("exec").arg(&self.name).args(argv))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman().args(["rm", "-f", "-t", "0", &self.name]).output();
    }
}

/// `podman run` with this machine's constraints: runc (crun refuses the
/// hybrid cgroup layout), lowered limits, the host's /usr read-only.
pub fn run_args(scope: &Scope, net: &CtNet, name: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "run",
        "--runtime",
        "runc",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "-v",
        "/usr:/usr:ro",
        "--cgroup-parent",
        &scope.rel,
        "--network",
        &format!("ns:{}", net.path()),
        "--name",
        name,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

pub fn start(scope: &Scope, net: &CtNet, image: &Image, name: &str) -> Container {
    start_with(scope, net, image, name, &[])
}

/// A long-running container (`sleep 600`) with extra `podman run` flags.
pub fn start_with(
    scope: &Scope,
    net: &CtNet,
    image: &Image,
    name: &str,
    flags: &[&str],
) -> Container {
    let mut args = run_args(scope, net, name, &["-d"]);
    args.extend(flags.iter().map(|s| s.to_string()));
    args.extend([
        image.reference.clone(),
        "/usr/bin/sleep".into(),
        "600".into(),
    ]);
    let id = run_ok(podman().args(&args));
    let mut c = Container {
        name: name.to_string(),
        pid: 0,
        id,
    };
    c.pid = run_ok(podman().args(["inspect", "-f", "{{.State.Pid}}", name]))
        .parse()
        .expect("pid");
    c
}
