//! tshark writing a capture file until stopped: what crossed a link or a
//! port, for tests that prove what did (and did not) go over the wire.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::servers::which;
use super::{open_tempdir, wait_until};

pub struct Capture {
    child: Child,
    pub file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Capture {
    /// tshark on `iface` with the capture `filter` (empty: everything);
    /// `place` puts the command where it must run (a host's namespace).
    pub fn start(iface: &str, filter: &str, place: impl FnOnce(&mut Command)) -> Capture {
        let dir = open_tempdir();
        let file = dir.path().join("capture.pcapng");
        let err = dir.path().join("tshark.err");
        let mut cmd = Command::new(which("tshark"));
        place(&mut cmd);
        cmd.args(["-i", iface, "-q"]);
        if !filter.is_empty() {
            cmd.args(["-f", filter]);
        }
        let child = cmd
            .arg("-w")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).expect("err"))
            .spawn()
            .expect("tshark");
        let ready = wait_until(Duration::from_secs(20), || {
            std::fs::read_to_string(&err)
                .unwrap_or_default()
                .contains("Capturing on")
        });
        assert!(
            ready,
            "tshark did not start: {}",
            std::fs::read_to_string(&err).unwrap_or_default()
        );
        Capture {
            child,
            file,
            _dir: dir,
        }
    }

    /// `tshark -r` with these ports decoded as TLS; one line per match.
    pub fn fields(&self, tls_ports: &[u16], filter: &str, field: &str) -> Vec<String> {
        let mut c = Command::new(which("tshark"));
        c.arg("-r").arg(&self.file);
        for p in tls_ports {
            c.args(["-d", &format!("tcp.port=={p},tls")]);
        }
        let o = c
            .args(["-Y", filter, "-T", "fields", "-e", field])
            .output()
            .expect("tshark -r");
        assert!(
            o.status.success(),
            "tshark -r: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Stops the capture (SIGINT makes tshark finish the file), once the
    /// file has stopped growing: tshark writes packets a little after they
    /// pass, and a stop before that loses the last ones.
    pub fn stop(&mut self) {
        let size = || std::fs::metadata(&self.file).map_or(0, |m| m.len());
        let mut last = size();
        let mut still = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while still < 3 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            let now = size();
            still = if now == last { still + 1 } else { 0 };
            last = now;
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
