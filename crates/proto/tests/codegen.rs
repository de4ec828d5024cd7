//! Regenerates the committed protobuf code and fails when it differs, so the
//! `.proto` files and `src/gen/` can never drift apart.
//! `REGENERATE=1 cargo test -p tether-proto --test codegen` rewrites them.

use std::path::{Path, PathBuf};

fn generate(out: &Path) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .out_dir(out)
        .compile_protos(
            &[dir.join("workload.proto"), dir.join("tether.proto")],
            &[dir],
        )
        .expect("protoc must be installed (Debian: protobuf-compiler); `make test` installs it");
}

#[test]
fn generated_code_is_current() {
    let committed = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/gen");
    if std::env::var_os("REGENERATE").is_some() {
        generate(&committed);
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    generate(tmp.path());
    let mut names: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("read generated dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    assert!(!names.is_empty(), "codegen produced no files");
    for name in names {
        let fresh = std::fs::read_to_string(tmp.path().join(&name)).expect("read fresh");
        let old = std::fs::read_to_string(committed.join(&name)).unwrap_or_default();
        assert!(
            fresh == old,
            "src/gen/{} is stale: run `REGENERATE=1 cargo test -p tether-proto --test codegen`",
            name.to_string_lossy()
        );
    }
}
