//! Compiles bpf/tether.bpf.c with clang into OUT_DIR/tether.bpf.o.
//!
//! BPF programs are C because Rust BPF needs a nightly toolchain. The object
//! carries BTF (-g) so aya can relocate CO-RE field accesses against the
//! running kernel.

use std::{env, path::PathBuf, process::Command};

fn main() {
    let manifest =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let src = manifest.join("../../bpf/tether.bpf.c");
    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("tether.bpf.o");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-env-changed=CLANG");

    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    // <linux/bpf.h> pulls <asm/types.h>, which Debian keeps in the multiarch
    // directory of the *host* architecture; -target bpf does not search it.
    let arch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86_64",
        Ok("aarch64") => "aarch64",
        Ok("riscv64") => "riscv64",
        Ok(other) => panic!("tether-kernel: unsupported target architecture {other}"),
        Err(_) => panic!("tether-kernel: CARGO_CFG_TARGET_ARCH is not set"),
    };
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    // The syscall tracepoints read registers and syscall numbers, which
    // differ per architecture (see SYSCALL_HOOKS in the C).
    let target_arch = match arch {
        "x86_64" => "x86",
        "aarch64" => "arm64",
        other => other,
    };

    let output = Command::new(&clang)
        // v3: 32-bit atomics (the taint marks) and ALU32; kernels since 5.12.
        .args([
            "-target", "bpf", "-mcpu=v3", "-O2", "-g", "-Wall", "-Werror",
        ])
        .arg(format!("-I{multiarch}"))
        .arg(format!("-D__TARGET_ARCH_{target_arch}"))
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .output();
    match output {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "\n\ntether-kernel: `{clang}` not found. The BPF programs are C compiled by clang.\n\
             Install it (Debian: `apt-get install -y clang libbpf-dev`, or `make deps`),\n\
             or point CLANG at a clang binary.\n\n"
        ),
        Err(e) => panic!("tether-kernel: running `{clang}` failed: {e}"),
        Ok(o) if !o.status.success() => panic!(
            "\n\ntether-kernel: clang failed to compile {}:\n{}\n\
             (the BPF headers come from libbpf-dev and linux-libc-dev: `apt-get install -y libbpf-dev`)\n\n",
            src.display(),
            String::from_utf8_lossy(&o.stderr)
        ),
        Ok(_) => {}
    }
}
