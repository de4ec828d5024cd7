//! The Rust side of the kernel ABI checked against the BTF that clang wrote
//! into the very object the agent loads (`struct tether_abi` in
//! tether.bpf.c gathers every shared layout and constant there). A field
//! moved, resized, added or renamed on one side only, or a constant
//! renumbered, fails here rather than misreading records at run time.
//!
//! The reader below covers only what this check needs from our own object
//! (struct, union, enum, array, int, typedef and qualifier kinds); it is
//! test code, never fed anything else.

use std::collections::BTreeMap;

use crate::abi::{self, Decision, ExecFlags, Hook, Reason, at};

/// One BTF type, reduced to what the check reads.
#[derive(Debug, Clone)]
enum Ty {
    Int {
        size: u32,
    },
    Array {
        elem: u32,
        len: u32,
    },
    Struct {
        name: String,
        size: u32,
        members: Vec<Member>,
    },
    Enum {
        name: String,
        size: u32,
        values: Vec<(String, i64)>,
    },
    /// Typedef, volatile, const, restrict, type tag: look through.
    Alias {
        to: u32,
    },
    Other,
}

#[derive(Debug, Clone)]
struct Member {
    name: String,
    ty: u32,
    /// Bits.
    offset: u32,
}

struct Btf {
    /// Index = type id (0 is void).
    types: Vec<Ty>,
}

fn u32_le(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

impl Btf {
    fn from_object(obj: &[u8]) -> Self {
        use object::{Object as _, ObjectSection as _};
        let file = object::File::parse(obj).expect("tether.bpf.o is an ELF object");
        let sec = file
            .section_by_name(".BTF")
            .expect("tether.bpf.o carries BTF (built with -g)");
        Self::parse(sec.data().expect(".BTF section data"))
    }

    fn parse(b: &[u8]) -> Self {
        assert_eq!(u16::from_le_bytes([b[0], b[1]]), 0xeb9f, "BTF magic");
        let hdr_len = u32_le(b, 4) as usize;
        let (type_off, type_len) = (u32_le(b, 8) as usize, u32_le(b, 12) as usize);
        let (str_off, str_len) = (u32_le(b, 16) as usize, u32_le(b, 20) as usize);
        let strs = &b[hdr_len + str_off..hdr_len + str_off + str_len];
        let name = |off: u32| -> String {
            let s = &strs[off as usize..];
            let end = s
                .iter()
                .position(|&c| c == 0)
                .expect("NUL-terminated BTF string");
            String::from_utf8_lossy(&s[..end]).into_owned()
        };
        let mut types = vec![Ty::Other];
        let mut p = hdr_len + type_off;
        let end = p + type_len;
        while p < end {
            let (name_off, info, size_or_type) = (u32_le(b, p), u32_le(b, p + 4), u32_le(b, p + 8));
            p += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let ty = match kind {
                1 => {
                    p += 4;
                    Ty::Int { size: size_or_type }
                }
                3 => {
                    let t = Ty::Array {
                        elem: u32_le(b, p),
                        len: u32_le(b, p + 8),
                    };
                    p += 12;
                    t
                }
                4 | 5 => {
                    let members = (0..vlen)
                        .map(|i| {
                            let m = p + 12 * i;
                            let off = u32_le(b, m + 8);
                            Member {
                                name: name(u32_le(b, m)),
                                ty: u32_le(b, m + 4),
                                // With kind_flag the low 24 bits are the offset.
                                offset: if kind_flag { off & 0xff_ffff } else { off },
                            }
                        })
                        .collect();
                    p += 12 * vlen;
                    Ty::Struct {
                        name: name(name_off),
                        size: size_or_type,
                        members,
                    }
                }
                6 => {
                    let values = (0..vlen)
                        .map(|i| {
                            let m = p + 8 * i;
                            (name(u32_le(b, m)), i64::from(u32_le(b, m + 4) as i32))
                        })
                        .collect();
                    p += 8 * vlen;
                    Ty::Enum {
                        name: name(name_off),
                        size: size_or_type,
                        values,
                    }
                }
                19 => {
                    let values = (0..vlen)
                        .map(|i| {
                            let m = p + 12 * i;
                            let v = u64::from(u32_le(b, m + 4)) | u64::from(u32_le(b, m + 8)) << 32;
                            (name(u32_le(b, m)), v as i64)
                        })
                        .collect();
                    p += 12 * vlen;
                    Ty::Enum {
                        name: name(name_off),
                        size: size_or_type,
                        values,
                    }
                }
                8 | 9 | 10 | 11 | 18 => Ty::Alias { to: size_or_type },
                13 => {
                    p += 8 * vlen;
                    Ty::Other
                }
                14 | 17 => {
                    p += 4;
                    Ty::Other
                }
                15 => {
                    p += 12 * vlen;
                    Ty::Other
                }
                2 | 7 | 12 | 16 => Ty::Other,
                k => panic!("BTF kind {k} not understood by this check"),
            };
            types.push(ty);
        }
        Self { types }
    }

    fn resolve(&self, mut id: u32) -> &Ty {
        loop {
            match &self.types[id as usize] {
                Ty::Alias { to } => id = *to,
                t => return t,
            }
        }
    }

    fn size_of(&self, id: u32) -> u32 {
        match self.resolve(id) {
            Ty::Int { size } | Ty::Struct { size, .. } | Ty::Enum { size, .. } => *size,
            Ty::Array { elem, len } => self.size_of(*elem) * len,
            t => panic!("no size for {t:?}"),
        }
    }

    /// The struct or enum named `name`.
    fn named(&self, name: &str) -> &Ty {
        self.types
            .iter()
            .find(
                |t| matches!(t, Ty::Struct { name: n, .. } | Ty::Enum { name: n, .. } if n == name),
            )
            .unwrap_or_else(|| {
                panic!("`{name}` is not in the object's BTF (is it in struct tether_abi?)")
            })
    }

    /// Field name -> (byte offset, byte size) of struct `name`, and its size.
    fn layout(&self, name: &str) -> (u32, BTreeMap<String, (usize, usize)>) {
        let Ty::Struct { size, members, .. } = self.named(name) else {
            panic!("`{name}` is not a struct");
        };
        let fields = members
            .iter()
            .map(|m| {
                assert_eq!(
                    m.offset % 8,
                    0,
                    "{name}.{}: bitfields are not mirrored",
                    m.name
                );
                (
                    m.name.clone(),
                    ((m.offset / 8) as usize, self.size_of(m.ty) as usize),
                )
            })
            .collect();
        (*size, fields)
    }

    /// Enumerator name -> value of enum `name`.
    fn enumerators(&self, name: &str) -> BTreeMap<String, i64> {
        let Ty::Enum { values, .. } = self.named(name) else {
            panic!("`{name}` is not an enum");
        };
        values.iter().cloned().collect()
    }
}

fn btf() -> Btf {
    Btf::from_object(crate::enforcer::OBJECT)
}

/// Compares a C struct with its Rust mirror: the same size and exactly the
/// same fields, each at the offset (and of the size) Rust uses. Padding
/// fields (`pad*`) are listed like any other, so nothing can hide there.
fn check_struct(btf: &Btf, c_name: &str, rust_size: usize, rust: &[(&str, usize, usize)]) {
    let (size, c) = btf.layout(c_name);
    assert_eq!(size as usize, rust_size, "sizeof(struct {c_name}) vs Rust");
    let rust: BTreeMap<String, (usize, usize)> = rust
        .iter()
        .map(|(n, off, len)| ((*n).to_owned(), (*off, *len)))
        .collect();
    let c_names: Vec<&String> = c.keys().collect();
    let rust_names: Vec<&String> = rust.keys().collect();
    assert_eq!(c_names, rust_names, "fields of struct {c_name}: C vs Rust");
    for (field, (off, len)) in &c {
        assert_eq!(
            (off, len),
            (&rust[field].0, &rust[field].1),
            "struct {c_name}.{field}: (offset, size) in C vs Rust"
        );
    }
}

/// Compares a C enum with Rust's numbering: every enumerator is known to
/// Rust (by name) with the same value, and Rust knows no other.
fn check_enum(btf: &Btf, c_name: &str, rust: &[(&str, i64)]) {
    let c = btf.enumerators(c_name);
    let rust: BTreeMap<String, i64> = rust.iter().map(|(n, v)| ((*n).to_owned(), *v)).collect();
    assert_eq!(c, rust, "enum {c_name}: C vs Rust");
}

macro_rules! fields {
    ($t:ty { $($f:ident : $len:expr),* $(,)? }) => {
        &[$((stringify!($f), std::mem::offset_of!($t, $f), $len)),*]
    };
}

#[test]
fn map_layouts_match_the_object() {
    map_layouts(&btf());
}

#[test]
fn records_read_by_position_match_the_object() {
    records(&btf());
}

#[test]
fn constants_match_the_object() {
    constants(&btf());
}

fn map_layouts(b: &Btf) {
    use abi::{HeldKey, HoldCfg, HoldNs, PolicyKey, ProcState, ScopeValue, SvcValue, VerdictValue};
    check_struct(
        b,
        "svc",
        size_of::<SvcValue>(),
        fields!(SvcValue {
            service_id: 4,
            flags: 4
        }),
    );
    check_struct(
        b,
        "proc_state",
        size_of::<ProcState>(),
        fields!(ProcState {
            subject: 4,
            flags: 4,
            exec_id: 8,
            start_ns: 8
        }),
    );
    check_struct(
        b,
        "policy_key",
        size_of::<PolicyKey>(),
        fields!(PolicyKey {
            subject: 4,
            service_id: 4
        }),
    );
    check_struct(
        b,
        "verdict",
        size_of::<VerdictValue>(),
        fields!(VerdictValue {
            allow: 4,
            rule: 4,
            expires_ns: 8
        }),
    );
    check_struct(
        b,
        "scope",
        size_of::<ScopeValue>(),
        fields!(ScopeValue {
            cgroup_id: 8,
            level: 4,
            agent_tgid: 4
        }),
    );
    check_struct(
        b,
        "hold_cfg",
        size_of::<HoldCfg>(),
        fields!(HoldCfg {
            agent_tgid: 4,
            port: 2,
            flags: 1,
            pad: 1,
            netns: 8
        }),
    );
    check_struct(
        b,
        "held_key",
        size_of::<HeldKey>(),
        fields!(HeldKey {
            addr: 16,
            port: 2,
            v6: 1,
            pad: 1,
            pad2: 4,
            netns: 8
        }),
    );
    check_struct(
        b,
        "hold_ns",
        size_of::<HoldNs>(),
        fields!(HoldNs {
            port: 2,
            flags: 1,
            pad: 1,
            pad2: 4
        }),
    );
    // The LPM key: aya's Key<T> is (prefix length, data), data laid out as
    // DstPrefix::to_key writes it.
    check_struct(
        b,
        "dst_key",
        size_of::<aya::maps::lpm_trie::Key<abi::DstKeyData>>(),
        &[
            ("prefixlen", 0, 4),
            ("proto", 4, 1),
            ("pad", 5, 1),
            ("port", 6, 2),
            ("addr", 8, 16),
        ],
    );
}

fn records(b: &Btf) {
    {
        use at::exec_rec as f;
        check_struct(
            b,
            "exec_rec",
            size_of::<abi::ExecRaw>(),
            &[
                ("exec_id", f::EXEC_ID, 8),
                ("start_ns", f::START_NS, 8),
                // Compared in the kernel only; listed so the layout is whole.
                ("file", 16, 8),
                ("ino", f::INO, 8),
                ("dev", f::DEV, 4),
                ("flags", f::FLAGS, 4),
                ("tracer", f::TRACER, 4),
                ("mnt_ns", f::MNT_NS, 4),
                ("name", f::NAME, f::NAME_LEN),
            ],
        );
    }
    {
        use at::redirect as f;
        check_struct(
            b,
            "redirect",
            at::held::COOKIE,
            &[
                ("addr", f::ADDR, 16),
                ("port", f::PORT, 2),
                ("flow_v6", f::FLOW_V6, 1),
                ("kind", f::KIND, 1),
                ("tgid", f::TGID, 4),
                ("pid", f::PID, 4),
                ("uid", f::UID, 4),
                ("service_id", f::SERVICE_ID, 4),
                ("local_port", f::LOCAL_PORT, 2),
                // Compared in the kernel only.
                ("hold_port", 38, 2),
                ("exec_id", f::EXEC_ID, 8),
                ("start_ns", f::START_NS, 8),
                // Written and read by sock_ops only.
                ("local_addr", 56, 16),
                ("netns", f::NETNS, 8),
                ("flags", 80, 4),
                ("pad3", 84, 4),
            ],
        );
        check_struct(
            b,
            "held",
            size_of::<abi::HeldRaw>(),
            &[("r", 0, at::held::COOKIE), ("cookie", at::held::COOKIE, 8)],
        );
    }
    {
        use at::event as f;
        check_struct(
            b,
            "event",
            abi::EVENT_LEN,
            &[
                ("ts_ns", f::TS_NS, 8),
                ("cookie", f::COOKIE, 8),
                ("tgid", f::TGID, 4),
                ("pid", f::PID, 4),
                ("uid", f::UID, 4),
                ("gid", f::GID, 4),
                ("subject", f::SUBJECT, 4),
                ("service_id", f::SERVICE_ID, 4),
                ("rule", f::RULE, 4),
                ("verdict", f::VERDICT, 1),
                ("proto", f::PROTO, 1),
                ("port", f::PORT, 2),
                ("addr", f::ADDR, 16),
                ("hook", f::HOOK, 1),
                ("comm", f::COMM, f::COMM_LEN),
                ("reason", f::REASON, 1),
                ("pad", 82, 2),
                ("aux", f::AUX, 4),
                ("flags", f::FLAGS, 4),
                ("aux2", f::AUX2, 4),
                ("exe", f::EXE, f::EXE_LEN),
            ],
        );
    }
}

/// Every struct gathered in `struct tether_abi` is checked above, or is
/// named here as the kernel's alone.
#[test]
fn every_shared_layout_is_checked() {
    const CHECKED: [&str; 13] = [
        "dst_key",
        "svc",
        "proc_state",
        "exec_rec",
        "policy_key",
        "verdict",
        "hold_cfg",
        "scope",
        "redirect",
        "held_key",
        "held",
        "hold_ns",
        "event",
    ];
    // Socket storage written and read by the programs only.
    const KERNEL_ONLY: [&str; 3] = ["guard", "guard_flag", "redirect_flag"];
    const ENUMS: [&str; 11] = [
        "svc_flag",
        "proc_flag",
        "exec_flag",
        "verdict_code",
        "verdict_flag",
        "reason_code",
        "hold_flag",
        "redirect_kind",
        "hook_code",
        "stat_index",
        "proc_event",
    ];
    let b = btf();
    let Ty::Struct { members, .. } = b.named("tether_abi") else {
        panic!("struct tether_abi");
    };
    let mut listed: Vec<String> = CHECKED
        .iter()
        .chain(KERNEL_ONLY.iter())
        .chain(ENUMS.iter())
        .map(|s| (*s).to_owned())
        .collect();
    listed.sort();
    let mut gathered: Vec<String> = members
        .iter()
        .map(|m| match b.resolve(m.ty) {
            Ty::Struct { name, .. } | Ty::Enum { name, .. } => name.clone(),
            t => panic!("tether_abi.{}: {t:?}", m.name),
        })
        .collect();
    gathered.sort();
    assert_eq!(
        gathered, listed,
        "struct tether_abi vs the layouts this test checks"
    );
}

fn constants(b: &Btf) {
    check_enum(
        b,
        "svc_flag",
        &[
            ("SVC_MESH", abi::SVC_MESH.into()),
            ("SVC_PERMISSIVE", abi::SVC_PERMISSIVE.into()),
        ],
    );
    check_enum(b, "proc_flag", &[("PROC_AGENT", abi::PROC_AGENT.into())]);
    check_enum(
        b,
        "proc_event",
        &[
            ("PROC_EV_EXEC", abi::PROC_EV_EXEC.into()),
            ("PROC_EV_FORK", abi::PROC_EV_FORK.into()),
            ("PROC_EV_EXIT", abi::PROC_EV_EXIT.into()),
        ],
    );
    check_enum(
        b,
        "hold_flag",
        &[
            ("HOLD_V4", abi::HOLD_V4.into()),
            ("HOLD_V6", abi::HOLD_V6.into()),
        ],
    );
    check_enum(
        b,
        "redirect_kind",
        &[
            ("REDIRECT_HELD", 0),
            ("REDIRECT_MESH", abi::REDIRECT_MESH.into()),
            ("REDIRECT_INJECT", abi::REDIRECT_INJECT.into()),
        ],
    );
    check_enum(
        b,
        "verdict_flag",
        &[
            ("VERDICT_F_ALLOW", abi::VERDICT_F_ALLOW.into()),
            ("VERDICT_F_INJECT", abi::VERDICT_F_INJECT.into()),
        ],
    );
    check_enum(
        b,
        "exec_flag",
        &[
            ("EXEC_LD_PRELOAD", ExecFlags::LD_PRELOAD.into()),
            ("EXEC_LD_AUDIT", ExecFlags::LD_AUDIT.into()),
            ("EXEC_LD_LIBRARY_PATH", ExecFlags::LD_LIBRARY_PATH.into()),
            ("EXEC_LD_OTHER", ExecFlags::LD_OTHER.into()),
            ("EXEC_GCONV_PATH", ExecFlags::GCONV_PATH.into()),
            ("EXEC_GLIBC_TUNABLES", ExecFlags::GLIBC_TUNABLES.into()),
            ("EXEC_ENV_UNSCANNED", ExecFlags::ENV_UNSCANNED.into()),
            ("EXEC_RUNTIME_ENV", ExecFlags::RUNTIME_ENV.into()),
            ("EXEC_USERNS_MOUNTS", ExecFlags::USERNS_MOUNTS.into()),
            ("EXEC_CHROOT", ExecFlags::CHROOT.into()),
            ("EXEC_UNTRUSTED_FS", ExecFlags::UNTRUSTED_FS.into()),
            ("EXEC_SECCOMP_NOTIFY", ExecFlags::SECCOMP_NOTIFY.into()),
            ("EXEC_USER_NS", ExecFlags::USER_NS.into()),
            ("TAINT_TRACED_AT_EXEC", ExecFlags::TRACED_AT_EXEC.into()),
            ("TAINT_PTRACE", ExecFlags::PTRACE.into()),
            ("TAINT_MEM_WRITE", ExecFlags::MEM_WRITE.into()),
            ("TAINT_SET_MM", ExecFlags::SET_MM.into()),
            ("TAINT_MEM_READ", ExecFlags::MEM_READ.into()),
            ("TAINTS", ExecFlags::TAINTS.into()),
        ],
    );
    check_enum(
        b,
        "stat_index",
        &[
            ("STAT_ALLOW", abi::STAT_ALLOW.into()),
            ("STAT_DENY", abi::STAT_DENY.into()),
            ("STAT_UNATTESTED", abi::STAT_UNATTESTED.into()),
            ("STAT_DROPPED_EVENTS", abi::STAT_DROPPED_EVENTS.into()),
            ("STAT_HELD", abi::STAT_HELD.into()),
            ("STAT_MESH", abi::STAT_MESH.into()),
            ("STAT_INGRESS_DROPPED", abi::STAT_INGRESS_DROPPED.into()),
            ("STAT_TAINTED", abi::STAT_TAINTED.into()),
            ("STAT_SEND_DENIED", abi::STAT_SEND_DENIED.into()),
            ("STAT_UNGUARDED", abi::STAT_UNGUARDED.into()),
            ("STAT_SOCKET_DENIED", abi::STAT_SOCKET_DENIED.into()),
            ("STAT_INJECT", abi::STAT_INJECT.into()),
            ("STAT_MAX", abi::STAT_MAX.into()),
        ],
    );
    // Event codes: each C enumerator decodes to the Rust variant of that
    // name, and no code Rust decodes is missing on the C side.
    check_codes(b, "verdict_code", "VERDICT_", |v| {
        Decision::from_code(v).map(|d| format!("{d:?}"))
    });
    check_codes(b, "hook_code", "HOOK_", |v| {
        Hook::from_code(v).map(|h| format!("{h:?}"))
    });
    check_codes(b, "reason_code", "REASON_", |v| {
        Reason::from_code(u32::from(v)).map(|r| format!("{r:?}"))
    });
}

/// `VERDICT_MESH_DOWN` must decode to `MeshDown`, and so on: C's names in
/// SCREAMING_SNAKE against Rust's variant names.
fn check_codes(b: &Btf, c_enum: &str, prefix: &str, decode: impl Fn(u8) -> Option<String>) {
    let c = b.enumerators(c_enum);
    for (name, v) in &c {
        let v = u8::try_from(*v)
            .unwrap_or_else(|_| panic!("{name} = {v} does not fit the event's byte"));
        let want: String = name
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("{name} lacks the prefix {prefix}"))
            .split('_')
            .map(|w| {
                let mut cs = w.chars();
                cs.next()
                    .map(|f| f.to_string() + &cs.as_str().to_lowercase())
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(
            decode(v),
            Some(want.clone()),
            "enum {c_enum}: {name} = {v} decodes to {want} in Rust"
        );
    }
    let known: Vec<i64> = c.values().copied().collect();
    for v in 0..=u8::MAX {
        if decode(v).is_some() {
            assert!(
                known.contains(&i64::from(v)),
                "Rust decodes {v} for enum {c_enum}, which C does not define"
            );
        }
    }
}

/// The check itself can fail: the same source with two `struct event`
/// fields swapped, or one reason renumbered, compiled the way build.rs
/// compiles it, is refused.
#[test]
fn drift_on_the_c_side_fails_the_check() {
    // Without the C side's own _Static_asserts, which would stop some
    // drift at compile time: this is about what the BTF check catches.
    let src: String = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../bpf/tether.bpf.c"
    ))
    .expect("bpf/tether.bpf.c")
    .lines()
    .filter(|l| !l.starts_with("_Static_assert"))
    .map(|l| format!("{l}\n"))
    .collect();
    let aux = "\t__u32 aux;   /* the tracer, the target of a taint, a connection's owner */\n";
    let flags = "\t__u32 flags; /* exec record flags of the caller */\n";
    assert!(
        src.contains(&format!("{aux}{flags}")),
        "struct event changed: update this test's mutation"
    );
    let swapped = src.replace(&format!("{aux}{flags}"), &format!("{flags}{aux}"));
    let renumbered = src.replace("REASON_GETFD = 13,", "REASON_GETFD = 15,");
    assert_ne!(
        renumbered, src,
        "REASON_GETFD changed: update this test's mutation"
    );
    for (what, mutated, check) in [
        ("struct event fields swapped", swapped, records as fn(&Btf)),
        ("REASON_GETFD renumbered", renumbered, constants as fn(&Btf)),
    ] {
        let b = Btf::from_object(&compile(&mutated));
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&b)));
        assert!(caught.is_err(), "{what}: the ABI check passed");
    }
}

/// Compiles BPF C as build.rs does (same target, CPU and flags).
fn compile(src: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, o) = (dir.path().join("t.bpf.c"), dir.path().join("t.bpf.o"));
    std::fs::write(&c, src).expect("write source");
    let (multiarch, target) = if cfg!(target_arch = "aarch64") {
        ("aarch64", "arm64")
    } else if cfg!(target_arch = "riscv64") {
        ("riscv64", "riscv64")
    } else {
        ("x86_64", "x86")
    };
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    let out = std::process::Command::new(&clang)
        .args([
            "-target", "bpf", "-mcpu=v3", "-O2", "-g", "-Wall", "-Werror",
        ])
        .arg(format!("-I/usr/include/{multiarch}-linux-gnu"))
        .arg(format!("-D__TARGET_ARCH_{target}"))
        .arg("-c")
        .arg(&c)
        .arg("-o")
        .arg(&o)
        .output()
        .unwrap_or_else(|e| panic!("running {clang}: {e}"));
    assert!(
        out.status.success(),
        "clang: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&o).expect("compiled object")
}
