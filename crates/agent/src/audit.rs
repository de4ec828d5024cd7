//! The audit log: every decision record goes here, once, stamped with the
//! policy clock and the node, to three sinks: the append-only JSON-lines
//! file, a bounded ring of recent records (`tether audit` backlog), and
//! live followers.

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::Path;
use std::sync::Mutex;

use tokio::sync::broadcast;

use crate::clock::Clock;

/// Records kept for followers that attach late.
const RECENT: usize = 1000;
/// Records buffered per live follower; a slower one skips ahead.
const LIVE: usize = 4096;

pub struct AuditLog {
    node: String,
    clock: Clock,
    file: Option<Mutex<std::fs::File>>,
    recent: Mutex<VecDeque<String>>,
    live: broadcast::Sender<String>,
}

impl AuditLog {
    /// Opens (creating, mode 0600) the log file at `path`, if any.
    pub fn open(path: Option<&Path>, node: String, clock: Clock) -> anyhow::Result<Self> {
        let file = match path {
            Some(p) => {
                if let Some(d) = p.parent() {
                    std::fs::create_dir_all(d)?;
                }
                use std::os::unix::fs::OpenOptionsExt as _;
                Some(Mutex::new(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .mode(0o600)
                        .open(p)
                        .map_err(|e| anyhow::anyhow!("opening audit log {}: {e}", p.display()))?,
                ))
            }
            None => None,
        };
        Ok(AuditLog {
            node,
            clock,
            file,
            recent: Mutex::new(VecDeque::new()),
            live: broadcast::channel(LIVE).0,
        })
    }

    /// Writes one record (a JSON object), stamped with time and node
    /// unless it carries its own. One line per record, written whole.
    pub fn publish(&self, mut rec: serde_json::Value) {
        if rec.get("time").is_none() {
            rec["time"] = serde_json::json!((self.clock)());
        }
        if rec.get("node").is_none() {
            rec["node"] = serde_json::json!(self.node);
        }
        let mut line = rec.to_string();
        if let Some(f) = &self.file {
            line.push('\n');
            let _ = lock(f).write_all(line.as_bytes());
            line.pop();
        }
        {
            let mut r = lock(&self.recent);
            if r.len() >= RECENT {
                r.pop_front();
            }
            r.push_back(line.clone());
        }
        let _ = self.live.send(line);
    }

    /// The most recent records, oldest first.
    pub fn recent(&self) -> Vec<String> {
        lock(&self.recent).iter().cloned().collect()
    }

    /// Every record published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.live.subscribe()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn records_are_stamped_kept_bounded_and_written_as_lines() {
        let dir = std::env::temp_dir().join(format!("tether-audit-{}", std::process::id()));
        let path = dir.join("sub").join("audit.log");
        let log = AuditLog::open(Some(&path), "n1".into(), Arc::new(|| 42)).expect("open");
        let mut live = log.subscribe();
        for i in 0..RECENT + 5 {
            log.publish(serde_json::json!({ "i": i }));
        }
        log.publish(serde_json::json!({ "time": 7, "node": "other" }));
        let recent = log.recent();
        assert_eq!(recent.len(), RECENT);
        let first: serde_json::Value = serde_json::from_str(&recent[0]).expect("json");
        assert_eq!(first["i"], 6, "the oldest records are dropped first");
        assert_eq!(
            (first["time"].as_i64(), first["node"].as_str()),
            (Some(42), Some("n1"))
        );
        let last: serde_json::Value =
            serde_json::from_str(recent.last().expect("last")).expect("json");
        assert_eq!(
            (last["time"].as_i64(), last["node"].as_str()),
            (Some(7), Some("other"))
        );
        assert!(live.try_recv().expect("live").contains(r#""i":0"#));
        let text = std::fs::read_to_string(&path).expect("log file");
        assert_eq!(
            text.lines().count(),
            RECENT + 6,
            "every record, one line each"
        );
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
