//! Every fuzz target's seed corpus, through the target's body: what
//! `cargo fuzz` starts from must at least pass here. A target without
//! seeds, or a target binary in fuzz/ this crate does not know, fails.

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

#[test]
fn every_target_has_a_body_and_seeds() {
    let mut bins: Vec<String> = std::fs::read_dir(fuzz_dir().join("fuzz_targets"))
        .expect("fuzz/fuzz_targets")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".rs"))
                .map(str::to_owned)
        })
        .collect();
    bins.sort();
    let known: Vec<&str> = tether_fuzz_bodies::TARGETS
        .iter()
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(bins, known, "fuzz/fuzz_targets and TARGETS differ");
    for (name, _) in tether_fuzz_bodies::TARGETS {
        let body =
            std::fs::read_to_string(fuzz_dir().join("fuzz_targets").join(format!("{name}.rs")))
                .expect("target source");
        assert!(
            body.contains(&format!("tether_fuzz_bodies::{name}")),
            "fuzz/fuzz_targets/{name}.rs does not run tether_fuzz_bodies::{name}"
        );
    }
}

#[test]
fn every_seed_passes_its_target() {
    for (name, body) in tether_fuzz_bodies::TARGETS {
        let dir = fuzz_dir().join("seeds").join(name);
        let mut seeds: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        seeds.sort();
        assert!(
            seeds.len() >= 3,
            "{name}: fewer than 3 seeds in {}",
            dir.display()
        );
        for seed in seeds {
            let data = std::fs::read(&seed).expect("seed");
            let r = std::panic::catch_unwind(|| body(&data));
            assert!(r.is_ok(), "{name}: {} panicked", seed.display());
        }
    }
}

fn seed(target: &str, name: &str) -> Vec<u8> {
    let p = fuzz_dir().join("seeds").join(target).join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The well-formed seeds really are: a corpus of rejects would start the
/// fuzzer far from the code behind each parser's front door.
#[test]
fn the_well_formed_seeds_are_accepted() {
    let text = |b: Vec<u8>| String::from_utf8(b).expect("utf8");
    assert!(tether_spiffe::SpiffeId::parse(&text(seed("spiffe_id", "seed-00"))).is_ok());
    assert!(tether_attest::Selector::parse(&text(seed("selector_parse", "seed-04"))).is_ok());
    assert_eq!(
        tether_manifest::parse("s", &seed("manifest_parse", "service-policy.yaml"))
            .expect("manifest")
            .len(),
        2
    );
    assert_eq!(
        tether_manifest::parse("s", &seed("manifest_parse", "credentials.yaml"))
            .expect("credentials manifest")
            .len(),
        3
    );
    let csr = tether_ca::parse_csr(&seed("csr_parse", "p256-uri-san.der"))
        .unwrap_or_else(|e| panic!("csr: {e}"));
    assert_eq!(csr.uri_sans, ["spiffe://example.org/w"]);
    assert!(tether_ca::parse_csr(&seed("csr_parse", "bad-signature.der")).is_err());
    let td = tether_spiffe::TrustDomain::new("example.org").expect("td");
    let b = tether_spiffe::Bundle::from_json(td, &seed("bundle_json", "x509-and-jwt.json"))
        .expect("bundle");
    assert_eq!((b.x509_authorities.len(), b.jwt_authorities.len()), (1, 1));
    assert_eq!(
        tether_attest::parse_interp(&seed("elf_interp", "elf64")),
        Ok(Some("/lib64/ld-linux-x86-64.so.2".into()))
    );
    assert_eq!(
        tether_attest::parse_interp(&seed("elf_interp", "elf32")),
        Ok(Some("/lib/ld-linux.so.2".into()))
    );
    let held = tether_kernel::decode::held(&seed("kernel_records", "held-v4")[1..]).expect("held");
    assert_eq!(held.original_dst, "10.0.0.7:6379".parse().expect("addr"));
    assert_eq!(
        (held.tgid, held.service_id, held.socket_cookie, held.netns),
        (4242, 7, 99, 4026531840)
    );
    assert!(tether_kernel::decode::held(&seed("kernel_records", "held-short")[1..]).is_none());
    let exec = tether_kernel::decode::exec(&seed("kernel_records", "exec")[1..]).expect("exec");
    assert_eq!(exec.name, "redis-cli");
    let ev =
        tether_kernel::decode::event(&seed("kernel_records", "event-allow")[1..]).expect("event");
    assert_eq!(ev.decision, tether_kernel::Decision::Allow);
    assert_eq!((ev.port, ev.comm.as_str()), (6379, "redis-cli"));
    for bad in ["event-bad-verdict", "event-bad-hook", "event-short"] {
        assert!(
            tether_kernel::decode::event(&seed("kernel_records", bad)[1..]).is_err(),
            "{bad}"
        );
    }
    let mut evs = Vec::new();
    tether_attest::parse_datagram(&seed("proc_events", "two"), &mut evs);
    assert_eq!(evs.len(), 2, "{evs:?}");
    let (r, _) = tether_mesh::Request::parse(&seed("tunnel_request", "v4"))
        .expect("request")
        .expect("complete");
    assert_eq!(r.destination, "10.0.0.7:6379".parse().expect("addr"));
    assert!(
        tether_mesh::proxy_v2::ProxyHeader::parse(&seed("tunnel_request", "proxy-v2-tcp4"))
            .expect("proxy v2")
            .is_some()
    );
    let mut rw = tether_agent::h2_authority::Rewriter::default();
    rw.feed(&seed("h2_authority", "grpc-unix-authority"))
        .expect("a gRPC request with a socket path as :authority");
    let mut rw = tether_agent::h2_authority::Rewriter::default();
    assert!(rw.feed(&seed("h2_authority", "hpack-bomb")).is_err());
    // A peer chain that validates, a mesh SVID and IP SANs are among them.
    use tether_spiffe::x509;
    let chain = x509::split_certificates(&seed("x509_svid", "chain.der")).expect("chain");
    let mut bundle =
        tether_spiffe::Bundle::new(tether_spiffe::TrustDomain::new("example.org").expect("td"));
    bundle.x509_authorities.push(chain[1].clone());
    assert_eq!(
        x509::verify_x509_svid(&chain[..1], &bundle, 1_800_000_000)
            .expect("the seed chain validates")
            .to_string(),
        "spiffe://example.org/w"
    );
    assert_eq!(
        x509::mesh_node(
            &x509::split_certificates(&seed("x509_svid", "mesh-chain.der")).expect("mesh")[0]
        ),
        Some("node1".into())
    );
    assert_eq!(
        x509::ip_sans(
            &x509::split_certificates(&seed("x509_svid", "node-ip-sans.der")).expect("node")[0]
        )
        .len(),
        2
    );
}
