//! A stopped agent lets go of every per-process key. The agent runs in this
//! test's process (so its live-key counter can be read); the workload, a
//! copy of this binary, holds an SVID and keeps a Workload API stream open
//! when the agent is dropped. Alone in its binary, because the counter is
//! per process.

mod common;

use std::time::Duration;

use common::*;
use tether_proto::tether::{ApplyRequest, CreateJoinTokenRequest};
use tether_spiffe::TrustDomain;

/// Entry point for the workload child (see `common::workload_command`); a
/// no-op in a normal run.
#[test]
fn child_entry() {
    child_entry_if_asked();
}

/// Kills the workload even when an assertion fails first.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_running_agent_frees_every_process_key() {
    let dir = open_tempdir();
    let td = TrustDomain::new("example.org").expect("td");
    let (server, admin) = in_process_server(dir.path(), "server").await;
    let exe = workload_binary(dir.path(), "lifecycle-workload");
    admin
        .clone()
        .apply(ApplyRequest {
            source: "self.yaml".into(),
            manifest: binary_identity("wl", &exe).into_bytes(),
        })
        .await
        .expect("apply");
    let token = admin
        .clone()
        .create_join_token(CreateJoinTokenRequest {
            ttl_secs: 60,
            node_name: "lifecycle".into(),
        })
        .await
        .expect("token")
        .into_inner()
        .token;
    assert_eq!(tether_agent::live_keys(), 0, "no agent yet, no keys");

    let mut acfg = tether_agent::AgentConfig::new(
        server.node_addr.to_string(),
        td.clone(),
        "lifecycle".into(),
        dir.path().join("agent"),
    );
    acfg.join_token = Some(token);
    acfg.bootstrap_bundle = Some(server.state.current_bundle());
    let wsock = dir.path().join("workload.sock");
    acfg.workload_socket = wsock.clone();
    acfg.admin_socket = dir.path().join("agent-admin.sock");
    acfg.metrics = None;
    acfg.bpf_pin_dir = None;
    let creds = dir.path().join("credentials");
    acfg.credentials_dir = Some(creds.clone());
    let agent = tether_agent::start(acfg).await.expect("agent");
    let mounted = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains(creds.to_str().unwrap_or("?")))
    };
    assert!(mounted(), "the credential filesystem is mounted");

    // The workload fetches its SVID and keeps following the stream.
    let out = dir.path().join("out");
    let child = Kill(
        workload_command(&exe, 0, &wsock, &out, "follow")
            .spawn()
            .expect("workload"),
    );
    let pid = child.0.id() as i32;
    assert!(
        wait_until(Duration::from_secs(20), || out.join("ready").exists()),
        "no SVID for the workload within 20 s: {}",
        std::fs::read_to_string(out.join("error")).unwrap_or_default()
    );
    assert!(
        agent.tracker.svid_count(pid) > 0,
        "the agent holds the workload's SVID"
    );
    assert!(tether_agent::live_keys() >= 1, "its key is counted");

    drop(agent);
    assert!(!mounted(), "the credential filesystem outlived the agent");
    let freed = wait_until(Duration::from_secs(10), || tether_agent::live_keys() == 0);
    assert!(
        freed,
        "{} per-process keys still alive 10 s after the agent was dropped",
        tether_agent::live_keys()
    );
    // The stream that served the key ends too. (The workload exits only
    // once its stream has ended, so its keys went with the agent, not
    // with its exit.)
    assert!(
        wait_until(Duration::from_secs(10), || out.join("ended").exists()),
        "the Workload API stream is still open 10 s after the agent stopped"
    );
    let ended = std::fs::read_to_string(out.join("ended")).unwrap_or_default();
    assert!(ended.contains("after 1 SVIDs"), "stream ended: {ended}");
    drop(child);
    drop(server);
}
