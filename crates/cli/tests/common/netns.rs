//! Hosts for multi-node tests: one network namespace per host, each with
//! one veth port on a bridge that lives in a namespace of its own. No host
//! has a default route, so nothing leaves the test's namespaces. Every
//! namespace (and with it every veth and the bridge) is deleted on drop,
//! also when a test fails.

use std::collections::HashMap;
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::process::Command;

/// The interface name of each host's port, inside its namespace.
pub const IFACE: &str = "eth0";

pub struct Lan {
    prefix: String,
    hosts: Vec<String>,
    files: HashMap<String, std::fs::File>,
}

fn ip(args: &[&str]) {
    let o = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        o.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
}

impl Lan {
    /// Hosts named `hosts`, addressed 10.99.0.1, .2, ... in that order.
    pub fn new(tag: &str, hosts: &[&str]) -> Lan {
        let prefix = format!("tt{}{}", std::process::id() % 100_000, tag);
        let mut lan = Lan {
            prefix,
            hosts: Vec::new(),
            files: HashMap::new(),
        };
        let sw = lan.ns("sw");
        ip(&["netns", "add", &sw]);
        lan.hosts.push("sw".into());
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        for (i, h) in hosts.iter().enumerate() {
            let ns = lan.ns(h);
            ip(&["netns", "add", &ns]);
            lan.hosts.push(h.to_string());
            let port = format!("p{i}");
            ip(&[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", IFACE, "netns",
                &ns,
            ]);
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.99.0.{}/24", i + 1),
                "dev",
                IFACE,
            ]);
            ip(&["-n", &ns, "link", "set", IFACE, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("open netns");
            lan.files.insert(h.to_string(), f);
        }
        lan
    }

    fn ns(&self, host: &str) -> String {
        format!("{}{}", self.prefix, host)
    }

    /// The name of `host`'s namespace (as `ip netns` knows it).
    pub fn ns_name(&self, host: &str) -> String {
        self.ns(host)
    }

    /// The host's address.
    pub fn addr(&self, host: &str) -> String {
        let i = self
            .hosts
            .iter()
            .position(|h| h == host)
            .expect("known host");
        // hosts[0] is the switch.
        format!("10.99.0.{i}")
    }

    /// Gives `host` another address on its port (`cidr` like 10.99.0.12/24).
    pub fn add_addr(&self, host: &str, cidr: &str) {
        ip(&["-n", &self.ns(host), "addr", "add", cidr, "dev", IFACE]);
    }

    /// Makes `cmd` run on `host` (its network namespace only: mounts,
    /// cgroups and the filesystem stay the test's).
    pub fn enter(&self, host: &str, cmd: &mut Command) {
        enter_fd(self.fd(host), cmd);
    }

    /// The host's namespace fd (valid as long as `self`).
    pub fn fd(&self, host: &str) -> i32 {
        self.files.get(host).expect("known host").as_raw_fd()
    }

    /// A command on `host`.
    pub fn command(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        super::no_loader_env(&mut c);
        self.enter(host, &mut c);
        c
    }
}

/// Makes `cmd` switch to the network namespace open at `fd` before exec.
pub fn enter_fd(fd: i32, cmd: &mut Command) {
    // SAFETY: setns(2) only, on an fd the caller keeps open.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        self.files.clear();
        for h in &self.hosts {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(h)])
                .output();
        }
    }
}
