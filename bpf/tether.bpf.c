// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Tether connection-time enforcement (kernel half).
 *
 * cgroup sock_addr hooks decide every connect()/sendmsg() to a protected
 * destination from (process identity, service) verdicts that the agent keeps
 * in maps; raw tracepoints keep those verdicts tied to the process image:
 * exec records what was really executed and clears, fork inherits, exit
 * frees; the syscall tracepoints mark a process whose memory or image
 * someone else may have changed (ptrace, process_vm_writev, /proc/PID/mem,
 * PR_SET_MM), and such a process has no authority until it execs again.
 * An sk_msg program refuses sends on protected connections by processes
 * that neither made them nor may reach the service themselves.
 *
 * The layouts below are an ABI shared with crates/kernel/src/abi.rs. Change
 * both together; the _Static_asserts and the Rust tests pin the sizes.
 *
 * Built by crates/kernel/build.rs with `clang -target bpf -O2 -g`; no
 * vmlinux.h: the few kernel structs we read are declared here with
 * preserve_access_index so field offsets are relocated (CO-RE) against the
 * running kernel's BTF at load time.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>

typedef _Bool bool;
#define true 1
#define false 0

/* ---- shared layouts ---------------------------------------------------- */

/* LPM key: proto, pad and port are part of the prefix (32 bits) so one trie
 * answers "address in CIDR and port equal". IPv4 is stored IPv4-mapped
 * (::ffff:a.b.c.d) so connect6 on a dual-stack socket hits the same entry. */
struct dst_key {
	__u32 prefixlen;
	__u8 proto;
	__u8 pad;
	__be16 port; /* 0 = any port */
	__u8 addr[16];
};

struct svc {
	__u32 service_id;
	__u32 flags; /* SVC_* */
};

/* Agents front the Service: allowed connects go to the local agent, which
 * tunnels them over mutual TLS to the agent on the service's host; there,
 * packets from other hosts to the service itself are dropped. */
enum svc_flag {
	SVC_MESH = 1,
	/* Migration: the service's host still accepts plaintext from other hosts,
	 * and reports each such connection for audit. */
	SVC_PERMISSIVE = 2,
};

/* exec_id is the value of execs[tgid].exec_id when the agent started
 * attesting, start_ns the process's start: a process that exec'd in
 * between, or another process that got the pid, does not match, so a
 * verdict computed for one image can never apply to another, however late
 * the agent's write lands. */
struct proc_state {
	__u32 subject;
	__u32 flags; /* PROC_* */
	__u64 exec_id;
	__u64 start_ns;
};

/* The agent itself: its connections (completing held ones) pass unchecked,
 * and while this entry lives (the exit tracepoint frees it when the agent
 * dies) unattested connections are held for it rather than refused. */
enum proc_flag { PROC_AGENT = 1 };

/* What the kernel saw at a process's last exec, before any of the new
 * image's code ran. The agent trusts this over anything /proc says later. */
struct exec_rec {
	__u64 exec_id;  /* CLOCK_BOOTTIME ns of the exec; 0: exec'd before we loaded */
	__u64 start_ns; /* process start (CLOCK_BOOTTIME ns, as /proc stat) */
	__u64 file;     /* the executed struct file: compared, never dereferenced */
	__u64 ino;
	__u32 dev;      /* kernel dev_t (major << 20 | minor) */
	__u32 flags;    /* EXEC_* and TAINT_* */
	__u32 tracer;   /* who tainted it (tgid), for audit */
	__u32 mnt_ns;   /* its mount namespace (inode number) at exec */
	char name[32];  /* the executed file's name, for audit */
};

/* The environment steers the dynamic loader (or glibc's module loading). */
enum exec_flag {
	EXEC_LD_PRELOAD = 1u << 0,
	EXEC_LD_AUDIT = 1u << 1,
	EXEC_LD_LIBRARY_PATH = 1u << 2,
	EXEC_LD_OTHER = 1u << 3,
	EXEC_GCONV_PATH = 1u << 4,
	EXEC_GLIBC_TUNABLES = 1u << 5,
	/* Too large to scan: treated as all of the above by the agent. */
	EXEC_ENV_UNSCANNED = 1u << 6,
	/* Variables that make common libraries and runtimes load code of the
	 * caller's choosing into a native binary (OpenSSL, SASL, GStreamer, Qt,
	 * GIO, GTK, the JVM's options, .NET's hooks and profilers). */
	EXEC_RUNTIME_ENV = 1u << 13,
	/* Mounts the process sees may be a user's own (a mount namespace owned by
	 * a non-initial user namespace): /etc/ld.so.preload, the loader and the
	 * binary itself may not be the host's. */
	EXEC_USERNS_MOUNTS = 1u << 8,
	/* The process's root is not its mount namespace's root (chroot). */
	EXEC_CHROOT = 1u << 9,
	/* The executable lives on FUSE or on a filesystem mounted in a user
	 * namespace: its content can change between the exec and our hash. */
	EXEC_UNTRUSTED_FS = 1u << 10,
	/* A seccomp filter with a user-space listener was inherited: its
	 * supervisor can answer the loader's opens with descriptors of its own. */
	EXEC_SECCOMP_NOTIFY = 1u << 11,
	/* Exec'd inside a non-initial user namespace, where it may hold every
	 * capability (and forge pids in SCM_CREDENTIALS, among other things). */
	EXEC_USER_NS = 1u << 12,
	/* Taints: the process's memory or image may no longer be what was
	 * executed (or its memory was read by another: what it was given may
	 * be known). Sticky until the next exec; the hooks refuse it. */
	TAINT_TRACED_AT_EXEC = 1u << 16,
	TAINT_PTRACE = 1u << 17,
	TAINT_MEM_WRITE = 1u << 18,
	TAINT_SET_MM = 1u << 19,
	TAINT_MEM_READ = 1u << 20,
	TAINTS = 0xffu << 16,
};

struct policy_key {
	__u32 subject;
	__u32 service_id;
};

struct verdict {
	__u32 allow; /* VERDICT_F_*: 0 denies */
	__u32 rule;
	/* CLOCK_BOOTTIME ns after which this verdict no longer allows (0:
	 * never). Set on verdicts that depend on a condition such as a time
	 * window, so they lapse even if the agent stops refreshing them. */
	__u64 expires_ns;
};

/* What a `policy` entry grants. */
enum verdict_flag {
	VERDICT_F_ALLOW = 1,
	/* Allowed, and the agent adds a credential to the connection: it is
	 * redirected to the agent, which injects it on the way out. */
	VERDICT_F_INJECT = 2,
};

enum verdict_code {
	VERDICT_DENY = 0,
	VERDICT_ALLOW = 1,
	VERDICT_UNATTESTED = 2, /* refused: no agent to hold it for, or UDP */
	VERDICT_HELD = 3,       /* redirected to the agent, which decides */
	VERDICT_MESH = 4,       /* allowed, redirected to the agent's tunnel */
	VERDICT_MESH_DOWN = 5,  /* allowed, but no agent to tunnel it: refused */
	VERDICT_PLAINTEXT = 6,  /* permissive Service accepted plaintext (ingress) */
	VERDICT_TAINT = 7,      /* a process was marked (event of HOOK_TAINT) */
	VERDICT_INJECT = 8,     /* allowed, redirected to the agent, which injects */
	VERDICT_INJECT_DOWN = 9, /* allowed with injection, but no agent: refused */
};

/* Why a decision went the way it did, beyond the verdict. */
enum reason_code {
	REASON_NONE = 0,
	REASON_TAINTED = 1,     /* marked earlier (ptrace, memory write, ...) */
	REASON_TRACED = 2,      /* the calling thread is being traced now */
	REASON_EXE_CHANGED = 3, /* its exe is no longer the file it executed */
	REASON_PTRACE = 4,      /* HOOK_TAINT: ptrace attach */
	REASON_MEM_WRITE = 5,   /* HOOK_TAINT: process_vm_writev */
	REASON_PROC_MEM = 6,    /* HOOK_TAINT: /proc/PID/mem opened (read or write) */
	REASON_SET_MM = 7,      /* HOOK_TAINT: prctl(PR_SET_MM) */
	REASON_BORROWED = 8,    /* HOOK_SEND: a socket it did not connect */
	REASON_RAW_SOCKET = 9,  /* HOOK_SOCKET: raw or packet socket */
	REASON_EXPIRED = 10,    /* conditional verdict not refreshed in time */
	REASON_KILLED = 11,     /* HOOK_TAINT: as the reason in aux2, caller killed */
	REASON_COMPAT = 12,     /* HOOK_TAINT: a watched syscall made the 32-bit way */
	REASON_GETFD = 13,      /* HOOK_TAINT: pidfd_getfd from another process */
	REASON_UNGUARDED = 14,  /* no room to record who made the connection */
	REASON_MEM_READ = 15,   /* HOOK_TAINT: process_vm_readv */
	REASON_PROC_ENVIRON = 16, /* HOOK_TAINT: /proc/PID/environ opened */
};

/* config[0]: where to hold connections of processes not attested yet. */
struct hold_cfg {
	__u32 agent_tgid;
	__be16 port; /* the agent's hold listener on loopback; 0 = no holding */
	__u8 flags;  /* HOLD_V4 | HOLD_V6: which loopback listeners exist */
	__u8 pad;
	__u64 netns; /* the agent's network namespace cookie */
};

enum hold_flag {
	HOLD_V4 = 1,
	HOLD_V6 = 2,
};

/* scope[0]: the enforced cgroup, so the syscall hooks (which see every
 * process) know who is inside the workload. */
struct scope {
	__u64 cgroup_id;
	__u32 level; /* depth below the cgroup2 root */
	__u32 agent_tgid;
};

/* Per-socket record of a connection redirected to the agent (socket local
 * storage: it lives and dies with the socket). getpeername reports the
 * original destination from it; sock_ops copies it to `held` once the
 * local port is known, which is what the agent can see on accept. */
struct redirect {
	__u8 addr[16]; /* original destination, IPv4-mapped for IPv4 */
	__be16 port;
	__u8 flow_v6; /* redirected to [::1] rather than 127.0.0.1 */
	__u8 kind;    /* REDIRECT_* */
	__u32 tgid;
	__u32 pid;
	__u32 uid;
	__u32 service_id;
	__u16 local_port; /* host order, set by sock_ops */
	__be16 hold_port; /* the agent's listener it was sent to */
	__u64 exec_id;
	__u64 start_ns; /* process start, CLOCK_BOOTTIME ns (as /proc stat) */
	__u8 local_addr[16]; /* client address, IPv4-mapped for IPv4; sock_ops */
	__u64 netns;  /* the connecting socket's network namespace cookie */
	__u32 flags;  /* REDIRECT_F_* */
	__u32 pad3;
};

enum redirect_flag {
	/* The agent had no listener in the socket's network namespace yet:
	 * its packets are dropped (TCP retries the SYN) until it has one. */
	REDIRECT_F_PENDING = 1,
};

/* Where the agent listens in one network namespace (hold_ns). */
struct hold_ns {
	__be16 port; /* 0: the agent cannot serve this namespace: refuse */
	__u8 flags;  /* HOLD_V4 | HOLD_V6 */
	__u8 pad;
	__u32 pad2;
};

/* The client's full address, not just its port: a process binding another
 * loopback address with the same port must not match someone else's
 * record. */
enum redirect_kind {
	REDIRECT_HELD = 0, /* unattested: the agent decides */
	REDIRECT_MESH = 1, /* allowed: the agent tunnels */
	REDIRECT_INJECT = 2, /* allowed: the agent adds the credential */
};

struct held_key {
	__u8 addr[16]; /* IPv4-mapped for IPv4 flows */
	__u16 port;    /* host order */
	__u8 v6;
	__u8 pad;
	__u32 pad2;
	__u64 netns;   /* the same address means another socket elsewhere */
};

struct held {
	struct redirect r;
	__u64 cookie;
};

/* Who made a protected TCP connection (socket local storage). Sends on it
 * by anyone else need a verdict of their own (see tether_send). */
struct guard {
	__u32 tgid;
	__u32 service_id;
	__u64 exec_id;
	__u64 start_ns;
	__u32 flags; /* GUARD_* */
	__u32 pad;
};

enum guard_flag {
	/* Only the maker may send: the agent may add a credential to what
	 * reaches it (injected, or held and decided later), which nobody
	 * else's verdict entitles them to. */
	GUARD_MAKER_ONLY = 1,
};

enum hook_code {
	HOOK_CONNECT4 = 0,
	HOOK_CONNECT6 = 1,
	HOOK_SENDMSG4 = 2,
	HOOK_SENDMSG6 = 3,
	HOOK_INGRESS = 4, /* accepted connection on this host (sock_ops) */
	HOOK_TAINT = 5,   /* a process was marked: tgid = who did it, aux = whom */
	HOOK_SEND = 6,    /* a send on a guarded connection (sk_msg) */
	HOOK_SOCKET = 7,  /* socket creation (raw, packet) or setsockopt */
	HOOK_NETNS = 8,   /* a connection waits for an agent listener in its
			   * network namespace: cookie = that namespace */
	HOOK_PROC = 9,    /* a workload process event: aux = PROC_EV_*,
			   * tgid = the process, aux2 = the parent of a fork */
};

enum proc_event {
	PROC_EV_EXEC = 1,
	PROC_EV_FORK = 2,
	PROC_EV_EXIT = 3,
};

enum stat_index {
	STAT_ALLOW = 0,
	STAT_DENY = 1,
	STAT_UNATTESTED = 2,
	STAT_DROPPED_EVENTS = 3,
	STAT_HELD = 4,
	STAT_MESH = 5,
	STAT_INGRESS_DROPPED = 6, /* packets from other hosts to a fronted service */
	STAT_TAINTED = 7,         /* processes marked */
	STAT_SEND_DENIED = 8,     /* sends refused on guarded connections */
	STAT_UNGUARDED = 9,       /* protected connections the guard map had no room for */
	STAT_SOCKET_DENIED = 10,  /* raw/packet sockets refused */
	STAT_INJECT = 11,         /* allowed connects redirected for injection */
	STAT_MAX = 16, /* room to grow without changing the pinned map */
};

struct event {
	__u64 ts_ns; /* CLOCK_BOOTTIME */
	__u64 cookie; /* socket cookie */
	__u32 tgid;
	__u32 pid;
	__u32 uid;
	__u32 gid;
	__u32 subject;
	__u32 service_id;
	__u32 rule;
	__u8 verdict;
	__u8 proto;
	__be16 port;
	__u8 addr[16];
	__u8 hook;
	char comm[16];
	__u8 reason; /* REASON_* */
	__u16 pad;
	__u32 aux;   /* the tracer, the target of a taint, a connection's owner */
	__u32 flags; /* exec record flags of the caller */
	__u32 aux2;  /* HOOK_SOCKET: family << 16 | type; HOOK_TAINT: detail */
	char exe[16]; /* start of the name the caller's exec record holds */
};

/* Every layout and constant crates/kernel/src/abi.rs mirrors, gathered in
 * one variable so the object's BTF describes them all: a Rust test checks
 * its side against that BTF. The section holding it is never loaded. */
struct tether_abi {
	struct dst_key dst_key;
	struct svc svc;
	struct proc_state proc_state;
	struct exec_rec exec_rec;
	struct policy_key policy_key;
	struct verdict verdict;
	struct hold_cfg hold_cfg;
	struct scope scope;
	struct redirect redirect;
	struct held_key held_key;
	struct held held;
	struct hold_ns hold_ns;
	enum redirect_flag redirect_flag;
	enum proc_event proc_event;
	struct guard guard;
	struct event event;
	enum svc_flag svc_flag;
	enum proc_flag proc_flag;
	enum exec_flag exec_flag;
	enum verdict_code verdict_code;
	enum verdict_flag verdict_flag;
	enum guard_flag guard_flag;
	enum reason_code reason_code;
	enum hold_flag hold_flag;
	enum redirect_kind redirect_kind;
	enum hook_code hook_code;
	enum stat_index stat_index;
};
struct tether_abi tether_abi SEC(".tether_abi") __attribute__((used));

_Static_assert(sizeof(struct dst_key) == 24, "dst_key ABI");
_Static_assert(sizeof(struct proc_state) == 24, "proc_state ABI");
_Static_assert(sizeof(struct exec_rec) == 80, "exec_rec ABI");
_Static_assert(sizeof(struct verdict) == 16, "verdict ABI");
_Static_assert(sizeof(struct event) == 112, "event ABI");
_Static_assert(sizeof(struct hold_cfg) == 16, "hold_cfg ABI");
_Static_assert(sizeof(struct scope) == 16, "scope ABI");
_Static_assert(sizeof(struct redirect) == 88, "redirect ABI");
_Static_assert(sizeof(struct held_key) == 32, "held_key ABI");
_Static_assert(__builtin_offsetof(struct redirect, exec_id) == 40, "redirect ABI");
_Static_assert(sizeof(struct held) == 96, "held ABI");
_Static_assert(sizeof(struct guard) == 32, "guard ABI");
_Static_assert(__builtin_offsetof(struct event, verdict) == 44, "event ABI");
_Static_assert(__builtin_offsetof(struct event, addr) == 48, "event ABI");
_Static_assert(__builtin_offsetof(struct event, hook) == 64, "event ABI");
_Static_assert(__builtin_offsetof(struct event, comm) == 65, "event ABI");
_Static_assert(__builtin_offsetof(struct event, reason) == 81, "event ABI");
_Static_assert(__builtin_offsetof(struct event, aux) == 84, "event ABI");
_Static_assert(__builtin_offsetof(struct exec_rec, name) == 48, "exec_rec ABI");

/* ---- maps (pinned by the loader under <pin_dir>/maps/<name>) ------------ */

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* required for LPM tries */
	__uint(max_entries, 16384);
	__type(key, struct dst_key);
	__type(value, struct svc);
} services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32); /* tgid */
	__type(value, struct proc_state);
} procs SEC(".maps");

/* tgid -> what it executed last. Every process forked or exec'd since we
 * loaded has one (fork creates it even when the parent has none, so a
 * reused pid never matches a stale procs entry). A process without one (or
 * with exec_id 0) exec'd before we loaded and gets no identity. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct exec_rec);
} execs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct policy_key);
	__type(value, struct verdict);
} policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct hold_cfg);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scope);
} scope SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct redirect);
} redirects SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct guard);
} guards SEC(".maps");

/* Protected TCP connections, so the sk_msg program sees their sends.
 * Entries go when the socket closes. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	/* Room for every protected connection a host keeps open (entries are
	 * allocated as used; the bound is what one user's open sockets would
	 * have to fill before connections go unguarded). */
	__uint(max_entries, 262144);
	__type(key, __u64); /* socket cookie */
	__type(value, __u64);
} guarded SEC(".maps");

/* Network namespace cookie -> the agent's listener there. The agent adds
 * its own at start and any other as soon as it sees a process there; a
 * connection from a namespace it has not reached yet waits (see
 * tether_egress). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct hold_ns);
} hold_ns SEC(".maps");

/* Held connections by client address and port, waiting for the agent's accept. LRU: a
 * connection the agent never sees cannot fill it. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct held_key);
	__type(value, struct held);
} held SEC(".maps");

/* (proto << 16 | port) -> the Service owning that port on this host (port
 * 0: every port). A Service naming a loopback address, one of this host's
 * addresses, or `local: true` is protected at every destination that the
 * kernel delivers to a local listener: all of 127/8, ::1, 0.0.0.0, ::,
 * multicast and broadcast, and every address in `local_addrs`. Packets from
 * other hosts to the port of a meshed one are dropped whatever their
 * destination address. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct svc);
} local_ports SEC(".maps");

/* This host's addresses (and broadcast addresses), IPv4-mapped for IPv4;
 * the agent follows them with netlink. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u8[16]);
	__type(value, __u32);
} local_addrs SEC(".maps");

/* Wake the reader once a quarter of the buffer is waiting. */
#define EVENTS_WAKE_BYTES (64 * 1024)

/* One array for all counters, dropped events included: the reader sums the
 * per-CPU slots, writers never contend. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

#define ENV_CHUNK 256

/* Scratch space for reading environment strings at exec. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, char[ENV_CHUNK]);
} scratch SEC(".maps");

/* ---- kernel structures we read (CO-RE) --------------------------------- */

struct list_head {
	struct list_head *next;
} __attribute__((preserve_access_index));

struct qstr {
	const unsigned char *name;
} __attribute__((preserve_access_index));

struct user_namespace {
	int level;
} __attribute__((preserve_access_index));

struct super_block {
	unsigned int s_dev;
	unsigned long s_magic;
	struct user_namespace *s_user_ns;
} __attribute__((preserve_access_index));

struct inode {
	unsigned long i_ino;
	struct super_block *i_sb;
	void *i_private;
} __attribute__((preserve_access_index));

struct dentry {
	struct qstr d_name;
} __attribute__((preserve_access_index));

struct vfsmount {
	struct dentry *mnt_root;
} __attribute__((preserve_access_index));

struct path {
	struct vfsmount *mnt;
	struct dentry *dentry;
} __attribute__((preserve_access_index));

struct file {
	unsigned int f_mode;
	struct inode *f_inode;
	struct path f_path;
	void *private_data;
} __attribute__((preserve_access_index));

struct mount {
	struct mount *mnt_parent;
	struct dentry *mnt_mountpoint;
	struct vfsmount mnt;
} __attribute__((preserve_access_index));

struct ns_common {
	unsigned int inum;
} __attribute__((preserve_access_index));

struct mnt_namespace {
	struct ns_common ns;
	struct mount *root;
	struct user_namespace *user_ns;
} __attribute__((preserve_access_index));

struct net {
	struct user_namespace *user_ns;
} __attribute__((preserve_access_index));

struct nsproxy {
	struct mnt_namespace *mnt_ns;
	struct net *net_ns;
} __attribute__((preserve_access_index));

struct fs_struct {
	struct path root;
} __attribute__((preserve_access_index));

struct fdtable {
	unsigned int max_fds;
	struct file **fd;
} __attribute__((preserve_access_index));

struct files_struct {
	struct fdtable *fdt;
} __attribute__((preserve_access_index));

struct task_struct;

struct mm_struct {
	struct file *exe_file;
	unsigned long env_start;
	unsigned long env_end;
	struct task_struct *owner;
} __attribute__((preserve_access_index));

struct thread_info {
	unsigned int status;
} __attribute__((preserve_access_index));

struct cred {
	struct user_namespace *user_ns;
} __attribute__((preserve_access_index));

struct seccomp_filter {
	struct seccomp_filter *prev;
	void *notif;
} __attribute__((preserve_access_index));

struct seccomp {
	struct seccomp_filter *filter;
} __attribute__((preserve_access_index));

struct hlist_node {
	struct hlist_node *next;
} __attribute__((preserve_access_index));

struct hlist_head {
	struct hlist_node *first;
} __attribute__((preserve_access_index));

struct pid {
	unsigned int level;
	struct hlist_head tasks[4];
} __attribute__((preserve_access_index));

struct task_struct {
	struct thread_info thread_info;
	int pid;
	int tgid;
	unsigned int ptrace;
	struct task_struct *group_leader;
	struct task_struct *parent;
	struct list_head ptraced;
	struct list_head ptrace_entry;
	struct hlist_node pid_links[4];
	struct pid *thread_pid;
	__u64 start_boottime;
	struct mm_struct *mm;
	struct fs_struct *fs;
	struct files_struct *files;
	struct nsproxy *nsproxy;
	const struct cred *cred;
	struct seccomp seccomp;
} __attribute__((preserve_access_index));

struct proc_inode {
	struct pid *pid;
	struct inode vfs_inode;
} __attribute__((preserve_access_index));

/* ---- helpers ----------------------------------------------------------- */

/* Keep clang from narrowing a 4-byte ctx load: sock_addr ctx fields such as
 * user_port only accept full-width loads, and the verifier rejects others. */
#define full_width(x) asm volatile("" : "+r"(x))

/* container_of with the member offset relocated against the running kernel. */
#define core_container_of(ptr, type, member) \
	((type *)((void *)(ptr) - bpf_core_field_offset(type, member)))

static __always_inline void bump(__u32 idx)
{
	__u64 *c = bpf_map_lookup_elem(&stats, &idx);

	if (c)
		__sync_fetch_and_add(c, 1);
}

static __always_inline __u64 exec_id_of(__u32 tgid)
{
	struct exec_rec *e = bpf_map_lookup_elem(&execs, &tgid);

	return e ? e->exec_id : 0;
}

static __always_inline struct task_struct *current_task(void)
{
	return (struct task_struct *)bpf_get_current_task();
}

static __always_inline bool is_loopback(const __u8 a[16])
{
	bool mapped = true, zero = true;

	for (int i = 0; i < 10; i++)
		if (a[i])
			mapped = zero = false;
	if (mapped && a[10] == 0xff && a[11] == 0xff)
		return a[12] == 127;
	if (zero && a[10] == 0 && a[11] == 0 && a[12] == 0 && a[13] == 0 && a[14] == 0)
		return a[15] == 1;
	return false;
}

/* Whether the kernel would deliver a connection or datagram to `a` to a
 * listener on this host: loopback, unspecified (connect() to 0.0.0.0 or ::
 * means this host), multicast and broadcast (looped back to local sockets
 * bound to the wildcard), and every address the host has. */
static __always_inline bool is_local_dst(const __u8 a[16])
{
	bool head_zero = true;

	for (int i = 0; i < 10; i++)
		if (a[i])
			head_zero = false;
	if (head_zero && a[10] == 0xff && a[11] == 0xff) {
		__u8 b = a[12];

		if (b == 127 || b == 0 || (b & 0xf0) == 0xe0)
			return true;
		if (a[12] == 255 && a[13] == 255 && a[14] == 255 && a[15] == 255)
			return true;
	} else {
		if (a[0] == 0xff)
			return true; /* IPv6 multicast */
		if (head_zero && a[10] == 0 && a[11] == 0 && a[12] == 0 && a[13] == 0 &&
		    a[14] == 0 && (a[15] == 0 || a[15] == 1))
			return true; /* :: and ::1 */
	}
	return bpf_map_lookup_elem(&local_addrs, a) != 0;
}

/* Whether a socket in the caller's network namespace is bound to exactly
 * this destination (a listener, or a bound UDP socket): covers addresses
 * the agent does not follow (another network namespace's). A wildcard
 * socket does not count: the lookup matches it for any address, remote
 * ones included, so whether the address is local is is_local_dst's call. */
static __always_inline bool local_listener(struct bpf_sock_addr *ctx, const struct dst_key *key,
					   bool ipv6)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	__u32 len;

	if (ipv6) {
		__builtin_memcpy(t.ipv6.daddr, key->addr, 16);
		t.ipv6.dport = key->port;
		len = sizeof(t.ipv6);
	} else {
		__builtin_memcpy(&t.ipv4.daddr, &key->addr[12], 4);
		t.ipv4.dport = key->port;
		len = sizeof(t.ipv4);
	}
	if (key->proto == IPPROTO_TCP)
		sk = bpf_sk_lookup_tcp(ctx, &t, len, BPF_F_CURRENT_NETNS, 0);
	else
		sk = bpf_sk_lookup_udp(ctx, &t, len, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return false;
	bool bound = ipv6 ? (sk->src_ip6[0] | sk->src_ip6[1] | sk->src_ip6[2] | sk->src_ip6[3]) != 0
			  : sk->src_ip4 != 0;
	bpf_sk_release(sk);
	return bound;
}

/* Posts one decision for the agent's audit. Never waits for the reader: a
 * full buffer costs an event, counted, not a decision. */
static __always_inline void emit_full(__u64 cookie, __u64 pid_tgid, __u64 uid_gid, __u32 subject,
				      __u32 service_id, __u32 rule, __u8 verdict, __u8 proto,
				      __be16 port, const __u8 *addr, __u8 hook, __u8 reason,
				      __u32 aux, __u32 flags, __u32 aux2)
{
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);

	if (!e) {
		bump(STAT_DROPPED_EVENTS);
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_ns = bpf_ktime_get_boot_ns();
	e->cookie = cookie;
	e->tgid = pid_tgid >> 32;
	e->pid = (__u32)pid_tgid;
	e->uid = (__u32)uid_gid;
	e->gid = uid_gid >> 32;
	e->subject = subject;
	e->service_id = service_id;
	e->rule = rule;
	e->verdict = verdict;
	e->proto = proto;
	e->port = port;
	if (addr)
		__builtin_memcpy(e->addr, addr, 16);
	e->hook = hook;
	e->reason = reason;
	e->aux = aux;
	e->flags = flags;
	e->aux2 = aux2;
	if (pid_tgid) {
		/* What it really executed: it may be gone (or lying in /proc)
		 * by the time the agent reads this. */
		__u32 tgid = pid_tgid >> 32;
		struct exec_rec *x = bpf_map_lookup_elem(&execs, &tgid);

		bpf_get_current_comm(e->comm, sizeof(e->comm));
		if (x)
			__builtin_memcpy(e->exe, x->name, sizeof(e->exe));
	}
	/* Waking the reader on every decision costs the connecting process a
	 * context switch (measured: allowed connect 1.3x slower). The agent
	 * drains on a short timer instead and is woken only when the buffer
	 * is filling up. */
	__u64 wake = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) > EVENTS_WAKE_BYTES
			     ? BPF_RB_FORCE_WAKEUP
			     : BPF_RB_NO_WAKEUP;
	bpf_ringbuf_submit(e, wake);
}

static __always_inline void emit(__u64 cookie, __u64 pid_tgid, __u64 uid_gid, __u32 subject,
				 __u32 service_id, __u32 rule, __u8 verdict, __u8 proto,
				 __be16 port, const __u8 *addr, __u8 hook)
{
	emit_full(cookie, pid_tgid, uid_gid, subject, service_id, rule, verdict, proto, port, addr,
		  hook, REASON_NONE, 0, 0, 0);
}

/* The Service protecting (proto, addr, port): a rule for the exact port
 * wins over an any-port (0) rule. */
static __always_inline struct svc *service_of(struct dst_key *key)
{
	struct svc *svc = bpf_map_lookup_elem(&services, key);

	if (!svc) {
		__be16 port = key->port;

		key->port = 0;
		svc = bpf_map_lookup_elem(&services, key);
		key->port = port;
	}
	return svc;
}

/* The Service owning (proto, port) on this host, exact port first. */
static __always_inline struct svc *local_port(__u8 proto, __u16 port)
{
	__u32 k = ((__u32)proto << 16) | port;
	struct svc *svc = bpf_map_lookup_elem(&local_ports, &k);

	if (!svc) {
		k = (__u32)proto << 16;
		svc = bpf_map_lookup_elem(&local_ports, &k);
	}
	return svc;
}

/* Why the calling process must not use any authority now, if it must not:
 * marked (taint), traced at this moment, or running with an exe that is
 * not the file it executed (PR_SET_MM without our syscall hook seeing it,
 * say). `aux` gets the tracer where known. */
static __always_inline __u8 suspect(struct task_struct *task, struct exec_rec *rec, __u32 *aux)
{
	if (rec && (rec->flags & TAINTS)) {
		*aux = rec->tracer;
		return REASON_TAINTED;
	}
	if (BPF_CORE_READ(task, ptrace)) {
		*aux = BPF_CORE_READ(task, parent, tgid);
		return REASON_TRACED;
	}
	if (rec && rec->exec_id && rec->file != (__u64)BPF_CORE_READ(task, mm, exe_file))
		return REASON_EXE_CHANGED;
	return REASON_NONE;
}

/* Whether `ps` was written for the process and image running now. */
static __always_inline bool is_current(struct proc_state *ps, struct exec_rec *rec)
{
	if (!ps || !rec)
		return false;
	return ps->exec_id == rec->exec_id && ps->start_ns == rec->start_ns;
}

/* The verdict `ps`'s subject has for a service, honouring expiry. */
static __always_inline __u8 verdict_for(__u32 subject, __u32 service_id, __u32 *rule,
					 __u8 *reason, bool *inject)
{
	struct policy_key pk = { .subject = subject, .service_id = service_id };
	struct verdict *v = bpf_map_lookup_elem(&policy, &pk);

	if (!v)
		return VERDICT_DENY; /* protected means deny by default */
	*rule = v->rule;
	if (!(v->allow & VERDICT_F_ALLOW))
		return VERDICT_DENY;
	*inject = v->allow & VERDICT_F_INJECT;
	if (v->expires_ns && bpf_ktime_get_boot_ns() > v->expires_ns) {
		*reason = REASON_EXPIRED;
		return VERDICT_DENY;
	}
	return VERDICT_ALLOW;
}

/* Redirects a TCP connect to the agent's listener on loopback and records
 * where it was going: unattested processes (held: the agent decides) and
 * allowed connects to meshed Services (the agent tunnels). Only when an
 * agent is alive to answer. Every network namespace has its own loopback,
 * so the agent keeps a listener in each one it serves (hold_ns); in one it
 * has not reached yet the connection is sent where that listener will be
 * and its packets wait (tether_egress), never to whatever else listens
 * there. A namespace the agent gave up on is refused. */
static __always_inline bool to_agent(struct bpf_sock_addr *ctx, __u8 hook, __u32 protocol,
				     const struct dst_key *key, bool mapped, __u32 tgid,
				     __u32 pid, __u32 uid, __u32 service_id, __u8 kind,
				     struct exec_rec *rec)
{
	__u32 zero = 0;

	if (protocol != IPPROTO_TCP || (hook != HOOK_CONNECT4 && hook != HOOK_CONNECT6))
		return false; /* UDP cannot be held; MPTCP subflows are not tracked */
	struct hold_cfg *cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg || !cfg->port)
		return false;
	__u32 agent_tgid = cfg->agent_tgid;
	struct proc_state *agent = bpf_map_lookup_elem(&procs, &agent_tgid);
	if (!agent || !(agent->flags & PROC_AGENT) || agent->exec_id != exec_id_of(agent_tgid))
		return false;
	__u64 netns = bpf_get_netns_cookie(ctx);
	struct hold_ns *ns = bpf_map_lookup_elem(&hold_ns, &netns);
	__be16 port = cfg->port;
	__u8 flags = HOLD_V4 | HOLD_V6;
	__u32 rflags = REDIRECT_F_PENDING;
	if (ns) {
		if (!ns->port)
			return false;
		port = ns->port;
		flags = ns->flags;
		rflags = 0;
	} else {
		/* A namespace made in a user namespace of the caller's own is
		 * theirs to rewire: the agent never serves it, so refuse now
		 * rather than keep the connection waiting. */
		struct net *net = BPF_CORE_READ(current_task(), nsproxy, net_ns);

		if (!net || BPF_CORE_READ(net, user_ns, level) > 0)
			return false;
	}
	bool flow_v6 = hook == HOOK_CONNECT6 && !mapped;
	if (!(flags & (flow_v6 ? HOLD_V6 : HOLD_V4)))
		return false;

	struct redirect *r = bpf_sk_storage_get(&redirects, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!r)
		return false;
	struct task_struct *task = current_task();

	__builtin_memcpy(r->addr, key->addr, 16);
	r->port = key->port;
	r->flow_v6 = flow_v6;
	r->kind = kind;
	r->tgid = tgid;
	r->pid = pid;
	r->uid = uid;
	r->service_id = service_id;
	r->local_port = 0;
	r->hold_port = port;
	r->exec_id = rec ? rec->exec_id : 0;
	r->start_ns = BPF_CORE_READ(task, group_leader, start_boottime);
	__builtin_memset(r->local_addr, 0, 16);
	r->netns = netns;
	r->flags = rflags;
	r->pad3 = 0;
	/* Ask the agent for a listener here (cookie = the namespace). */
	if (rflags & REDIRECT_F_PENDING)
		emit_full(netns, ((__u64)tgid << 32) | pid, uid, 0, service_id, 0, VERDICT_HELD,
			  IPPROTO_TCP, key->port, key->addr, HOOK_NETNS, REASON_NONE, 0, 0, 0);

	if (hook == HOOK_CONNECT4) {
		ctx->user_ip4 = bpf_htonl(0x7f000001);
	} else if (mapped) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
		ctx->user_ip6[3] = bpf_htonl(0x7f000001);
	} else {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
	}
	ctx->user_port = port;
	return true;
}

/* Remembers who made a protected TCP connection; sock_ops puts the socket
 * in `guarded` once it is established. */
static __always_inline bool guard_socket(struct bpf_sock_addr *ctx, __u32 tgid, __u32 service_id,
					 struct exec_rec *rec, __u32 flags)
{
	struct guard *g = bpf_sk_storage_get(&guards, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);

	if (!g)
		return false;
	g->tgid = tgid;
	g->service_id = service_id;
	g->exec_id = rec ? rec->exec_id : 0;
	g->start_ns = rec ? rec->start_ns : 0;
	g->flags = flags;
	g->pad = 0;
	return true;
}

static __always_inline int decide(struct bpf_sock_addr *ctx, __u8 hook, bool v6)
{
	struct dst_key key = {};
	__u32 protocol = ctx->protocol;
	__u32 port = ctx->user_port;
	bool mapped = !v6;

	full_width(protocol);
	full_width(port);
	switch (protocol) {
	case IPPROTO_TCP:
	case IPPROTO_MPTCP:
		key.proto = IPPROTO_TCP;
		break;
	case IPPROTO_UDP:
	case IPPROTO_UDPLITE:
		key.proto = IPPROTO_UDP;
		break;
	default:
		return 1; /* nothing else can be a protected destination */
	}
	bool tcp_connect =
		protocol == IPPROTO_TCP && (hook == HOOK_CONNECT4 || hook == HOOK_CONNECT6);
	/* A socket whose earlier connect was held and failed may connect
	 * again: its old record must not describe the new connection. */
	if (tcp_connect) {
		bpf_sk_storage_delete(&redirects, ctx->sk);
		bpf_sk_storage_delete(&guards, ctx->sk);
	}
	key.prefixlen = 32 + 128;
	/* user_port holds the port in network order in its low 16 bits. */
	key.port = (__be16)port;

	if (v6) {
		__u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1];
		__u32 a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];

		mapped = a0 == 0 && a1 == 0 && a2 == bpf_htonl(0x0000ffff);
		__builtin_memcpy(&key.addr[0], &a0, 4);
		__builtin_memcpy(&key.addr[4], &a1, 4);
		__builtin_memcpy(&key.addr[8], &a2, 4);
		__builtin_memcpy(&key.addr[12], &a3, 4);
	} else {
		__u32 a = ctx->user_ip4;

		key.addr[10] = 0xff;
		key.addr[11] = 0xff;
		__builtin_memcpy(&key.addr[12], &a, 4);
	}

	/* A port a Service of this host owns, at a destination that reaches
	 * this host (a known local address, or any address a local listener
	 * answers on in this network namespace): that Service decides, even
	 * if a broader Service also covers the address. */
	struct svc *svc = local_port(key.proto, bpf_ntohs(key.port));
	bool local = svc && (is_local_dst(key.addr) || local_listener(ctx, &key, v6 && !mapped));
	if (!local)
		svc = service_of(&key);
	if (!svc)
		return 1; /* not protected: untouched */
	__u32 service_id = svc->service_id;
	/* A Service of this host reached at one of its local addresses:
	 * decided here, directly (no tunnel to ourselves). */
	__u32 svc_flags = local ? 0 : svc->flags;

	__u64 id = bpf_get_current_pid_tgid();
	__u64 ug = bpf_get_current_uid_gid();
	__u32 tgid = id >> 32;
	__u32 subject = 0, rule = 0, aux = 0;
	__u8 verdict, reason;

	struct proc_state *ps = bpf_map_lookup_elem(&procs, &tgid);
	struct exec_rec *rec = bpf_map_lookup_elem(&execs, &tgid);
	if (ps && (ps->flags & PROC_AGENT) && ps->exec_id == (rec ? rec->exec_id : 0))
		return 1; /* the agent completing a held connection */

	reason = suspect(current_task(), rec, &aux);
	if (reason) {
		/* Its memory or image is not what was attested: no authority,
		 * and nothing to hold it for. */
		verdict = VERDICT_DENY;
		if (ps)
			subject = ps->subject;
	} else if (!is_current(ps, rec)) {
		/* Not attested (or attested for an image it no longer runs):
		 * never allowed blind. Held for the agent when possible, which
		 * attests, decides and completes or refuses it. */
		verdict = to_agent(ctx, hook, protocol, &key, mapped, tgid, (__u32)id, (__u32)ug,
				   service_id, REDIRECT_HELD, rec)
				  ? VERDICT_HELD
				  : VERDICT_UNATTESTED;
	} else {
		bool inject = false;

		subject = ps->subject;
		verdict = verdict_for(subject, service_id, &rule, &reason, &inject);
		/* A connection that carries an injected credential goes through
		 * the agent, or not at all: without the agent the service would
		 * see the client unauthenticated, and the client may hold
		 * nothing better than a placeholder. */
		if (verdict == VERDICT_ALLOW && inject)
			verdict = to_agent(ctx, hook, protocol, &key, mapped, tgid, (__u32)id,
					   (__u32)ug, service_id, REDIRECT_INJECT, rec)
					  ? VERDICT_INJECT
					  : VERDICT_INJECT_DOWN;
		/* A fronted Service is reached through the tunnel only; without
		 * an agent to carry it the connect fails rather than go out in
		 * plaintext (the far side would drop it anyway). */
		else if (verdict == VERDICT_ALLOW && (svc_flags & SVC_MESH))
			verdict = to_agent(ctx, hook, protocol, &key, mapped, tgid, (__u32)id,
					   (__u32)ug, service_id, REDIRECT_MESH, rec)
					  ? VERDICT_MESH
					  : VERDICT_MESH_DOWN;
	}

	bump(verdict == VERDICT_ALLOW	 ? STAT_ALLOW
	     : verdict == VERDICT_DENY	 ? STAT_DENY
	     : verdict == VERDICT_HELD	 ? STAT_HELD
	     : verdict == VERDICT_MESH	 ? STAT_MESH
	     : verdict == VERDICT_MESH_DOWN ? STAT_DENY
	     : verdict == VERDICT_INJECT	 ? STAT_INJECT
	     : verdict == VERDICT_INJECT_DOWN ? STAT_DENY
					 : STAT_UNATTESTED);

	bool pass = verdict == VERDICT_ALLOW || verdict == VERDICT_HELD || verdict == VERDICT_MESH ||
		    verdict == VERDICT_INJECT;
	__u32 gflags = verdict == VERDICT_INJECT || verdict == VERDICT_HELD ? GUARD_MAKER_ONLY : 0;
	/* A connection that could not be guarded is not made (counted). */
	if (pass && tcp_connect && !guard_socket(ctx, tgid, service_id, rec, gflags)) {
		bump(STAT_UNGUARDED);
		pass = false;
		verdict = VERDICT_DENY;
		reason = REASON_UNGUARDED;
	}

	emit_full(bpf_get_socket_cookie(ctx), id, ug, subject, service_id, rule, verdict,
		  key.proto, key.port, key.addr, hook, reason, aux, rec ? rec->flags : 0, 0);

	/* 0 makes connect()/sendmsg() fail with EPERM. */
	return pass ? 1 : 0;
}

/* ---- socket hooks ------------------------------------------------------ */

SEC("cgroup/connect4")
int tether_connect4(struct bpf_sock_addr *ctx)
{
	return decide(ctx, HOOK_CONNECT4, 0);
}

SEC("cgroup/connect6")
int tether_connect6(struct bpf_sock_addr *ctx)
{
	return decide(ctx, HOOK_CONNECT6, 1);
}

SEC("cgroup/sendmsg4")
int tether_sendmsg4(struct bpf_sock_addr *ctx)
{
	return decide(ctx, HOOK_SENDMSG4, 0);
}

SEC("cgroup/sendmsg6")
int tether_sendmsg6(struct bpf_sock_addr *ctx)
{
	return decide(ctx, HOOK_SENDMSG6, 1);
}

/* getpeername() on a held connection names the original destination, not
 * the agent, so the application sees what it connected to. */
static __always_inline int peer(struct bpf_sock_addr *ctx, bool v6)
{
	struct redirect *r = bpf_sk_storage_get(&redirects, ctx->sk, 0, 0);

	if (!r)
		return 1;
	if (v6) {
		__u32 a[4];

		__builtin_memcpy(a, r->addr, 16);
		ctx->user_ip6[0] = a[0];
		ctx->user_ip6[1] = a[1];
		ctx->user_ip6[2] = a[2];
		ctx->user_ip6[3] = a[3];
	} else {
		__u32 a;

		__builtin_memcpy(&a, &r->addr[12], 4);
		ctx->user_ip4 = a;
	}
	ctx->user_port = r->port;
	return 1;
}

SEC("cgroup/getpeername4")
int tether_peer4(struct bpf_sock_addr *ctx)
{
	return peer(ctx, 0);
}

SEC("cgroup/getpeername6")
int tether_peer6(struct bpf_sock_addr *ctx)
{
	return peer(ctx, 1);
}

/* Reads a sock_ops address (local or remote) as IPv4-mapped or IPv6. */
static __always_inline void sockops_addr(__u8 out[16], __u32 family, __u32 ip4, const __u32 *ip6)
{
	if (family == 2 /* AF_INET */) {
		__builtin_memset(out, 0, 10);
		out[10] = 0xff;
		out[11] = 0xff;
		__builtin_memcpy(&out[12], &ip4, 4);
	} else {
		__builtin_memcpy(out, ip6, 16);
	}
}

static __always_inline bool same_addr(const __u8 a[16], const __u8 b[16])
{
	__u8 diff = 0;

	for (int i = 0; i < 16; i++)
		diff |= a[i] ^ b[i];
	return diff == 0;
}

/* A connection accepted on this host. For a permissive Service, one from
 * another host is plaintext that skipped the tunnel: reported for audit
 * (the agent's own connections to the service come from this host). */
static __always_inline int accepted(struct bpf_sock_ops *skops)
{
	struct dst_key key = { .prefixlen = 32 + 128, .proto = IPPROTO_TCP };
	__u8 remote[16];
	__u32 family = skops->family;
	__u32 l4 = skops->local_ip4, r4 = skops->remote_ip4;
	__u32 l6[4] = { skops->local_ip6[0], skops->local_ip6[1], skops->local_ip6[2],
			skops->local_ip6[3] };
	__u32 r6[4] = { skops->remote_ip6[0], skops->remote_ip6[1], skops->remote_ip6[2],
			skops->remote_ip6[3] };
	__u32 lport = skops->local_port, rport = skops->remote_port;

	full_width(family);
	full_width(l4);
	full_width(r4);
	full_width(lport);
	full_width(rport);
	sockops_addr(key.addr, family, l4, l6);
	sockops_addr(remote, family, r4, r6);
	key.port = bpf_htons((__u16)lport);
	struct svc *svc = service_of(&key);
	if (!svc || (svc->flags & (SVC_MESH | SVC_PERMISSIVE)) != (SVC_MESH | SVC_PERMISSIVE))
		return 1;
	if (is_loopback(remote) || same_addr(remote, key.addr))
		return 1;
	/* sock_ops hands remote_port in network order, shifted into the
	 * upper half of the u32 (little-endian hosts). */
	emit(bpf_get_socket_cookie(skops), 0, 0, 0, svc->service_id, 0, VERDICT_PLAINTEXT,
	     IPPROTO_TCP, (__be16)(rport >> 16), remote, HOOK_INGRESS);
	return 1;
}

/* A guarded connection is up: from now on its sends go through tether_send.
 * A full map leaves the connection unguarded (counted). */
static __always_inline void guard_established(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;

	if (!sk)
		return;
	if (!bpf_sk_storage_get(&guards, sk, 0, 0))
		return;
	__u64 cookie = bpf_get_socket_cookie(skops);
	if (bpf_sock_hash_update(skops, &guarded, &cookie, BPF_ANY))
		bump(STAT_UNGUARDED);
}

/* Once connect() has picked the client's local port, publish the held
 * record under it: that port is all the agent sees when it accepts. The
 * entry goes when the socket closes, so a later connection that happens to
 * reuse the port cannot be mistaken for this one. */
SEC("sockops")
int tether_sockops(struct bpf_sock_ops *skops)
{
	__u32 op = skops->op;

	if (op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return accepted(skops);
	if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
		guard_established(skops);
		return 1;
	}
	if (op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_STATE_CB)
		return 1;
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return 1;
	struct redirect *r = bpf_sk_storage_get(&redirects, sk, 0, 0);
	if (!r)
		return 1;
	struct held_key k = { .v6 = r->flow_v6, .netns = r->netns };
	__u64 cookie = bpf_get_socket_cookie(skops);

	if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
		struct held h;

		if (r->flow_v6) {
			__u32 a0 = skops->local_ip6[0], a1 = skops->local_ip6[1];
			__u32 a2 = skops->local_ip6[2], a3 = skops->local_ip6[3];

			full_width(a0);
			full_width(a1);
			full_width(a2);
			full_width(a3);
			__builtin_memcpy(&r->local_addr[0], &a0, 4);
			__builtin_memcpy(&r->local_addr[4], &a1, 4);
			__builtin_memcpy(&r->local_addr[8], &a2, 4);
			__builtin_memcpy(&r->local_addr[12], &a3, 4);
		} else {
			__u32 a = skops->local_ip4;

			full_width(a);
			__builtin_memset(r->local_addr, 0, 10);
			r->local_addr[10] = 0xff;
			r->local_addr[11] = 0xff;
			__builtin_memcpy(&r->local_addr[12], &a, 4);
		}
		r->local_port = (__u16)skops->local_port;
		__builtin_memcpy(k.addr, r->local_addr, 16);
		k.port = r->local_port;
		__builtin_memcpy(&h.r, r, sizeof(h.r));
		h.cookie = cookie;
		bpf_map_update_elem(&held, &k, &h, BPF_ANY);
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	} else if (skops->args[1] == BPF_TCP_CLOSE) {
		__builtin_memcpy(k.addr, r->local_addr, 16);
		k.port = r->local_port;
		struct held *h = bpf_map_lookup_elem(&held, &k);
		if (h && h->cookie == cookie)
			bpf_map_delete_elem(&held, &k);
	}
	return 1;
}

/* Every send on a protected TCP connection. The process that made it may
 * use it while it still runs the image that made it and nobody has marked
 * it; anyone else (a socket taken with pidfd_getfd, passed with
 * SCM_RIGHTS, inherited across fork or exec) needs a current allowing
 * verdict of its own for the connection's Service. Refused sends fail with
 * EACCES and are audited; nothing reaches the peer. */
SEC("sk_msg")
int tether_send(struct sk_msg_md *msg)
{
	struct guard *g = bpf_sk_storage_get(&guards, msg->sk, 0, 0);

	if (!g)
		return SK_PASS;
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32, aux = 0, rule = 0, subject = 0;
	struct exec_rec *rec = bpf_map_lookup_elem(&execs, &tgid);
	struct proc_state *ps = bpf_map_lookup_elem(&procs, &tgid);
	__u8 reason = suspect(current_task(), rec, &aux);

	if (!reason) {
		if (tgid == g->tgid && rec && rec->exec_id == g->exec_id &&
		    rec->start_ns == g->start_ns)
			return SK_PASS;
		bool inject = false;

		if (is_current(ps, rec) && !(g->flags & GUARD_MAKER_ONLY)) {
			subject = ps->subject;
			if (verdict_for(subject, g->service_id, &rule, &reason, &inject) ==
			    VERDICT_ALLOW)
				return SK_PASS;
		}
		if (!reason)
			reason = REASON_BORROWED;
		aux = g->tgid;
	}
	bump(STAT_SEND_DENIED);
	__u8 dst[16] = {};
	__u32 family = msg->family, port = msg->remote_port, r4 = msg->remote_ip4;
	__u32 r6[4] = { msg->remote_ip6[0], msg->remote_ip6[1], msg->remote_ip6[2],
			msg->remote_ip6[3] };

	full_width(family);
	full_width(port);
	full_width(r4);
	sockops_addr(dst, family, r4, r6);
	/* remote_port: network order in the upper half, as in sock_ops. */
	emit_full(0, id, bpf_get_current_uid_gid(), subject, g->service_id, rule, VERDICT_DENY,
		  IPPROTO_TCP, (__be16)(port >> 16), dst, HOOK_SEND, reason, aux,
		  rec ? rec->flags : 0, g->tgid);
	return SK_DROP;
}

/* Raw IP sockets (other than plain ICMP) can put any datagram on the wire
 * or on loopback, past every connect/sendmsg hook: in the enforced cgroup
 * they are not created. Ping keeps working (ICMP raw and datagram sockets
 * are untouched; the header-include option is refused below). Packet
 * sockets are stopped in the syscall hook (see tether_sysenter). */
#define AF_INET 2
#define AF_INET6 10
#define AF_PACKET 17
#define AF_XDP 44
#define SOCK_RAW 3
#define IPPROTO_ICMPV6 58

static __always_inline bool is_agent(__u32 tgid)
{
	struct proc_state *ps = bpf_map_lookup_elem(&procs, &tgid);

	return ps && (ps->flags & PROC_AGENT) && ps->exec_id == exec_id_of(tgid);
}

static __always_inline int socket_refused(__u32 family, __u32 type, __u32 protocol)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct exec_rec *rec;
	__u32 tgid = id >> 32;

	if (is_agent(tgid))
		return 1;
	rec = bpf_map_lookup_elem(&execs, &tgid);
	bump(STAT_SOCKET_DENIED);
	emit_full(0, id, bpf_get_current_uid_gid(), 0, 0, 0, VERDICT_DENY, (__u8)protocol, 0, 0,
		  HOOK_SOCKET, REASON_RAW_SOCKET, 0, rec ? rec->flags : 0, (family << 16) | type);
	return 0;
}

/* A connection sent to the agent in a network namespace where it has no
 * listener yet: its packets are dropped until it has. A dropped SYN is not
 * an error to TCP (only ECONNREFUSED is): connect() keeps waiting and the
 * SYN is sent again after the retransmission timeout, by which time the
 * agent has a listener there. Nothing reaches whatever else may listen on
 * that port meanwhile; if the agent's listener took another port, the
 * connection never completes. */
SEC("cgroup_skb/egress")
int tether_egress(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;

	if (!sk)
		return 1;
	sk = bpf_sk_fullsock(sk);
	if (!sk || sk->protocol != IPPROTO_TCP || sk->state != BPF_TCP_SYN_SENT)
		return 1;
	struct redirect *r = bpf_sk_storage_get(&redirects, sk, 0, 0);
	if (!r || !(r->flags & REDIRECT_F_PENDING))
		return 1;
	struct hold_ns *ns = bpf_map_lookup_elem(&hold_ns, &r->netns);
	if (!ns || !ns->port || ns->port != r->hold_port ||
	    !(ns->flags & (r->flow_v6 ? HOLD_V6 : HOLD_V4)))
		return 0;
	r->flags &= ~REDIRECT_F_PENDING;
	return 1;
}

SEC("cgroup/sock_create")
int tether_socket(struct bpf_sock *sk)
{
	__u32 family = sk->family, type = sk->type, protocol = sk->protocol;

	if (type == SOCK_RAW && ((family == AF_INET && protocol != IPPROTO_ICMP) ||
				 (family == AF_INET6 && protocol != IPPROTO_ICMPV6)))
		return socket_refused(family, type, protocol);
	return 1;
}

#define SOL_IP 0
#define SOL_IPV6 41
#define IP_HDRINCL 3
#define IPV6_HDRINCL 36

SEC("cgroup/setsockopt")
int tether_sockopt(struct bpf_sockopt *ctx)
{
	int level = ctx->level, optname = ctx->optname;
	struct bpf_sock *sk = ctx->sk;

	if (!sk || sk->type != SOCK_RAW)
		return 1;
	if ((level == SOL_IP && optname == IP_HDRINCL) ||
	    (level == SOL_IPV6 && optname == IPV6_HDRINCL))
		return socket_refused(sk->family, sk->type, sk->protocol);
	return 1;
}

/* Packets from another host to a Service agents front are dropped at the
 * service's socket: the only way in is the agent's mesh port, which
 * authenticates the peer and applies ingress policy. Loopback traffic (the
 * agent itself, and local clients, which the connect hooks judge) passes.
 * The destination address comes from the fixed IP header, the port from the
 * receiving socket, so no extension header can hide either. */
#define LOOPBACK_IFINDEX 1
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD

SEC("cgroup_skb/ingress")
int tether_ingress(struct __sk_buff *skb)
{
	struct dst_key key = { .prefixlen = 32 + 128, .proto = IPPROTO_TCP };

	if (skb->ifindex == LOOPBACK_IFINDEX)
		return 1;
	struct bpf_sock *sk = skb->sk;
	if (!sk)
		return 1;
	sk = bpf_sk_fullsock(sk);
	if (!sk || sk->protocol != IPPROTO_TCP)
		return 1;
	key.port = bpf_htons((__u16)sk->src_port);
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		key.addr[10] = 0xff;
		key.addr[11] = 0xff;
		if (bpf_skb_load_bytes(skb, 16, &key.addr[12], 4))
			return 1;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		if (bpf_skb_load_bytes(skb, 24, key.addr, 16))
			return 1;
	} else {
		return 1;
	}
	struct svc *svc = service_of(&key);
	if (!svc)
		svc = local_port(IPPROTO_TCP, (__u16)sk->src_port);
	if (!svc || !(svc->flags & SVC_MESH) || (svc->flags & SVC_PERMISSIVE))
		return 1;
	bump(STAT_INGRESS_DROPPED);
	return 0;
}

/* ---- process lifecycle ------------------------------------------------- */
/*
 * Raw tracepoints, not tracefs tracepoints: they attach by name without a
 * mounted tracefs, and they hand us task_struct pointers, so fork can tell a
 * new process from a new thread exactly. Arguments follow TP_PROTO:
 *   sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *)
 *   sched_process_fork(struct task_struct *parent, struct task_struct *child)
 *   sched_process_exit(struct task_struct *p[, bool group_dead])  (group_dead: 6.16+)
 *   sys_enter(struct pt_regs *regs, long id), sys_exit(struct pt_regs *regs, long ret)
 */

/* Only used to ask (CO-RE) whether this kernel passes group_dead. */
struct trace_event_raw_sched_process_exit {
	bool group_dead;
} __attribute__((preserve_access_index));

#define FUSE_SUPER_MAGIC 0x65735546
#define FUSEBLK_SUPER_MAGIC 0x65735546

struct env_scan {
	__u64 pos;
	__u64 end;
	__u32 flags;
	__u32 mid; /* pos is inside a string, not at its start */
};

static __always_inline bool prefix(const char *s, const char *p, int n)
{
	for (int i = 0; i < n; i++)
		if (s[i] != p[i])
			return false;
	return true;
}

/* See EXEC_RUNTIME_ENV. */
static __always_inline bool runtime_env(const char *b)
{
	switch (b[0]) {
	case 'O':
		return prefix(b, "OPENSSL_CONF=", 13) || prefix(b, "OPENSSL_MODULES=", 16) ||
		       prefix(b, "OPENSSL_ENGINES=", 16);
	case 'J':
		return prefix(b, "JAVA_TOOL_OPTIONS=", 18) || prefix(b, "JDK_JAVA_OPTIONS=", 17);
	case '_':
		return prefix(b, "_JAVA_OPTIONS=", 14);
	case 'D':
		return prefix(b, "DOTNET_STARTUP_HOOKS=", 21) || prefix(b, "DOTNET_PROFILER", 15);
	case 'C':
		return prefix(b, "CORECLR_", 8) || prefix(b, "COR_PROFILER", 12) ||
		       prefix(b, "COR_ENABLE_PROFILING=", 21);
	case 'S':
		return prefix(b, "SASL_PATH=", 10);
	case 'G':
		return prefix(b, "GST_PLUGIN_", 11) || prefix(b, "GIO_EXTRA_MODULES=", 18) ||
		       prefix(b, "GTK_MODULES=", 12) || prefix(b, "GTK3_MODULES=", 13);
	case 'Q':
		return prefix(b, "QT_PLUGIN_PATH=", 15);
	}
	return false;
}

/* One step over the new image's environment strings (in its own stack, as
 * the loader will read them): read up to ENV_CHUNK bytes; classify a string
 * at its start; continue past its end. */
static long env_step(__u64 index, struct env_scan *s)
{
	__u32 zero = 0;
	char *buf;
	long n;

	if (s->pos >= s->end)
		return 1;
	buf = bpf_map_lookup_elem(&scratch, &zero);
	if (!buf) {
		s->flags |= EXEC_ENV_UNSCANNED;
		return 1;
	}
	n = bpf_probe_read_user_str(buf, ENV_CHUNK, (const void *)s->pos);
	if (n <= 0) {
		s->flags |= EXEC_ENV_UNSCANNED;
		return 1;
	}
	if (!s->mid) {
		if (prefix(buf, "LD_", 3)) {
			if (prefix(buf, "LD_PRELOAD=", 11))
				s->flags |= EXEC_LD_PRELOAD;
			else if (prefix(buf, "LD_AUDIT=", 9))
				s->flags |= EXEC_LD_AUDIT;
			else if (prefix(buf, "LD_LIBRARY_PATH=", 16))
				s->flags |= EXEC_LD_LIBRARY_PATH;
			else
				s->flags |= EXEC_LD_OTHER;
		} else if (prefix(buf, "GCONV_PATH=", 11)) {
			s->flags |= EXEC_GCONV_PATH;
		} else if (prefix(buf, "GLIBC_TUNABLES=", 15)) {
			s->flags |= EXEC_GLIBC_TUNABLES;
		} else if (runtime_env(buf)) {
			s->flags |= EXEC_RUNTIME_ENV;
		}
	}
	/* n counts the NUL; a full chunk may end mid-string. */
	if (n == ENV_CHUNK) {
		s->pos += ENV_CHUNK - 1;
		s->mid = 1;
	} else {
		s->pos += n;
		s->mid = 0;
	}
	return 0;
}

/* Longest environment we scan (64 Ki chunks, 16 MiB: more than exec
 * accepts); anything left over marks the record unscanned. */
#define ENV_STEPS 65536

/* Whether the process's root is the root of its mount namespace: walk from
 * its root mount to the namespace root, each mount mounted at its parent's
 * root. A chroot (or a root mount stacked elsewhere) fails the walk. */
static __always_inline bool rooted_at_namespace(struct task_struct *task, struct mnt_namespace *ns)
{
	struct vfsmount *vroot = BPF_CORE_READ(task, fs, root.mnt);
	struct dentry *droot = BPF_CORE_READ(task, fs, root.dentry);
	struct mount *ns_root = BPF_CORE_READ(ns, root);
	struct mount *m;

	if (!vroot || !ns_root)
		return false;
	m = core_container_of(vroot, struct mount, mnt);
	if (droot != BPF_CORE_READ(m, mnt.mnt_root))
		return false;
	for (int i = 0; i < 16; i++) {
		struct mount *parent;

		if (m == ns_root)
			return true;
		parent = BPF_CORE_READ(m, mnt_parent);
		if (!parent || parent == m)
			return false;
		if (BPF_CORE_READ(m, mnt_mountpoint) != BPF_CORE_READ(parent, mnt.mnt_root))
			return false;
		m = parent;
	}
	return false;
}

/* Whether the caller is inside the enforced cgroup (the workload). */
static __always_inline bool in_workload(void)
{
	__u32 zero = 0;
	struct scope *sc = bpf_map_lookup_elem(&scope, &zero);

	return sc && sc->cgroup_id && bpf_get_current_ancestor_cgroup_id(sc->level) == sc->cgroup_id;
}

/* Exec, fork and exit of workload processes, for the agent's process
 * table: from the tracepoints, so they arrive whatever network namespace
 * the agent or the process is in (the proc connector answers only in the
 * initial one). An exec or fork wakes the reader at once: the agent
 * attests the new process while it starts. */
static __always_inline void emit_proc(__u32 tgid, __u32 kind, __u32 parent)
{
	if (!in_workload())
		return;
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);

	if (!e) {
		bump(STAT_DROPPED_EVENTS);
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_ns = bpf_ktime_get_boot_ns();
	e->tgid = tgid;
	e->pid = tgid;
	e->verdict = VERDICT_ALLOW;
	e->hook = HOOK_PROC;
	e->aux = kind;
	e->aux2 = parent;
	bpf_ringbuf_submit(e, kind == PROC_EV_EXIT ? BPF_RB_NO_WAKEUP : BPF_RB_FORCE_WAKEUP);
}

SEC("raw_tp/sched_process_exec")
int tether_exec(struct bpf_raw_tracepoint_args *ctx)
{
	/* Runs after the point of no return, before the new image's first
	 * instruction: the old image's verdicts die here, synchronously, and
	 * what was executed is recorded before the loader runs. */
	struct task_struct *task = (struct task_struct *)ctx->args[0];
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct exec_rec rec = {};

	bpf_map_delete_elem(&procs, &tgid);

	rec.exec_id = bpf_ktime_get_boot_ns();
	rec.start_ns = BPF_CORE_READ(task, group_leader, start_boottime);
	struct file *exe = BPF_CORE_READ(task, mm, exe_file);
	rec.file = (__u64)exe;
	if (exe) {
		struct super_block *sb = BPF_CORE_READ(exe, f_inode, i_sb);
		const unsigned char *name = BPF_CORE_READ(exe, f_path.dentry, d_name.name);

		rec.ino = BPF_CORE_READ(exe, f_inode, i_ino);
		rec.dev = BPF_CORE_READ(sb, s_dev);
		if (BPF_CORE_READ(sb, s_magic) == FUSE_SUPER_MAGIC ||
		    BPF_CORE_READ(sb, s_user_ns, level) > 0)
			rec.flags |= EXEC_UNTRUSTED_FS;
		if (name)
			bpf_probe_read_kernel_str(rec.name, sizeof(rec.name), name);
	}

	struct mnt_namespace *ns = BPF_CORE_READ(task, nsproxy, mnt_ns);
	if (!ns || BPF_CORE_READ(ns, user_ns, level) > 0)
		rec.flags |= EXEC_USERNS_MOUNTS;
	if (!ns || !rooted_at_namespace(task, ns))
		rec.flags |= EXEC_CHROOT;
	if (ns)
		rec.mnt_ns = BPF_CORE_READ(ns, ns.inum);
	if (BPF_CORE_READ(task, cred, user_ns, level) > 0)
		rec.flags |= EXEC_USER_NS;
	struct seccomp_filter *f = BPF_CORE_READ(task, seccomp.filter);
	for (int i = 0; i < 32 && f; i++) {
		if (BPF_CORE_READ(f, notif)) {
			rec.flags |= EXEC_SECCOMP_NOTIFY;
			break;
		}
		f = BPF_CORE_READ(f, prev);
	}
	/* 32 filters deep without an answer: assume the worst. */
	if (f && !(rec.flags & EXEC_SECCOMP_NOTIFY) && BPF_CORE_READ(f, prev))
		rec.flags |= EXEC_SECCOMP_NOTIFY;

	if (BPF_CORE_READ(task, ptrace)) {
		rec.flags |= TAINT_TRACED_AT_EXEC;
		rec.tracer = BPF_CORE_READ(task, parent, tgid);
	}

	struct env_scan scan = {
		.pos = BPF_CORE_READ(task, mm, env_start),
		.end = BPF_CORE_READ(task, mm, env_end),
	};
	bpf_loop(ENV_STEPS, (void *)env_step, &scan, 0);
	if (scan.pos < scan.end)
		scan.flags |= EXEC_ENV_UNSCANNED;
	rec.flags |= scan.flags;

	/* If execs is full there is no record: the process gets no identity
	 * (the procs delete above already removed the old verdicts). */
	bpf_map_update_elem(&execs, &tgid, &rec, BPF_ANY);
	emit_proc(tgid, PROC_EV_EXEC, 0);
	if (rec.flags & TAINTS) {
		bump(STAT_TAINTED);
		emit_full(0, (__u64)rec.tracer << 32, 0, 0, 0, 0, VERDICT_TAINT, 0, 0, 0,
			  HOOK_TAINT, REASON_TRACED, tgid, rec.flags, 0);
	}
	return 0;
}

SEC("raw_tp/sched_process_fork")
int tether_fork(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *child = (struct task_struct *)ctx->args[1];
	__u32 child_pid = BPF_CORE_READ(child, pid);
	__u32 child_tgid = BPF_CORE_READ(child, tgid);

	/* A new thread shares its process's tgid-keyed entry: nothing to do. */
	if (child_pid != child_tgid)
		return 0;

	/* The tracepoint fires before the child first runs. Set *or clear*
	 * the child's entries: a stale entry for a reused pid (say, written
	 * by the agent just after the previous owner exited) must not leak
	 * to the new process. */
	__u32 parent = bpf_get_current_pid_tgid() >> 32;
	struct proc_state *ps = bpf_map_lookup_elem(&procs, &parent);
	struct exec_rec *ex = bpf_map_lookup_elem(&execs, &parent);
	struct exec_rec rec = {};

	/* The child runs the parent's image, marks included; its own start
	 * time tells it apart from any earlier owner of its pid. */
	if (ex)
		__builtin_memcpy(&rec, ex, sizeof(rec));
	rec.start_ns = BPF_CORE_READ(child, start_boottime);
	bpf_map_update_elem(&execs, &child_tgid, &rec, BPF_ANY);
	/* The agent's exemption is the agent's alone: a child it forks starts
	 * unattested. */
	if (ps && !(ps->flags & PROC_AGENT)) {
		struct proc_state cps = *ps;

		cps.start_ns = rec.start_ns;
		bpf_map_update_elem(&procs, &child_tgid, &cps, BPF_ANY);
	} else {
		bpf_map_delete_elem(&procs, &child_tgid);
	}
	emit_proc(child_tgid, PROC_EV_FORK, parent);
	return 0;
}

SEC("raw_tp/sched_process_exit")
int tether_exit(struct bpf_raw_tracepoint_args *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32, pid = (__u32)id;
	bool group_dead;

	/* Free only when the whole process is gone: a leader thread that
	 * exits early (pthread_exit) leaves a live process. Before 6.16 the
	 * tracepoint has no group_dead; fall back to "the leader exited".
	 * The branch on a CO-RE constant is pruned, so older kernels never
	 * see the args[1] read. */
	if (bpf_core_field_exists(((struct trace_event_raw_sched_process_exit *)0)->group_dead))
		group_dead = ctx->args[1] != 0;
	else
		group_dead = pid == tgid;
	if (group_dead) {
		bpf_map_delete_elem(&procs, &tgid);
		bpf_map_delete_elem(&execs, &tgid);
		emit_proc(tgid, PROC_EV_EXIT, 0);
	}
	return 0;
}

/* ---- memory and image changes by others -------------------------------- */
/*
 * Code can be put into a running process from outside: ptrace, writing its
 * memory (process_vm_writev, /proc/PID/mem), or, by the process itself,
 * re-pointing its exe link (PR_SET_MM). Without LSM hooks the syscall
 * tracepoints are where we see these. The target is marked before the
 * write can land (ptrace attach needs further calls to change anything;
 * process_vm_writev is seen on entry), and a marked process has no
 * authority until it execs a new image. A caller inside the workload that
 * writes another process's memory is also killed before it returns: the
 * SIGKILL is pending before process_vm_writev pins its first page, so the
 * write fails.
 * Reading another process's memory (process_vm_readv, /proc/PID/mem opened
 * to read, or /proc/PID/environ) takes what it was delivered: its
 * credential files' contents, tokens, keys, and an env file it sourced.
 * So does a ptrace attach, which from the workload is fatal at sys_enter
 * (the tracer dies before it can make a request of its tracee). The same holds: from the workload, process_vm_readv is
 * fatal before it copies a page, and an open of /proc/PID/mem is fatal
 * before the call returns to the caller (another thread of the caller
 * racing a read of the new descriptor in between gets at most what one
 * read copies before the kill is pending, as the kernel stops remote
 * access at the next page once it is). The target is marked as read: its
 * memory may have been seen, so nothing more is delivered to it until it
 * execs. Syscall numbers and registers are x86-64's; other
 * architectures build without these two programs' logic.
 */
#if defined(__TARGET_ARCH_x86)
struct pt_regs {
	unsigned long di;
	unsigned long si;
	unsigned long dx;
	unsigned long r10;
	unsigned long orig_ax;
} __attribute__((preserve_access_index));

#define NR_open 2
#define NR_socket 41
#define NR_creat 85
#define NR_ptrace 101
#define NR_prctl 157
#define NR_openat 257
#define NR_process_vm_readv 310
#define NR_process_vm_writev 311
#define NR_openat2 437
#define NR_pidfd_getfd 438
#define ARG0(r) BPF_CORE_READ(r, di)
#define ARG1(r) BPF_CORE_READ(r, si)
#define ARG2(r) BPF_CORE_READ(r, dx)
#define SYSCALL_NR(r) BPF_CORE_READ(r, orig_ax)
#define SYSCALL_HOOKS 1
#endif

#define PTRACE_ATTACH 16
#define PTRACE_SEIZE 0x4206
#define PR_SET_MM 35
#define O_ACCMODE 3
#define PROC_SUPER_MAGIC 0x9fa0
#define FMODE_READ 0x1
#define FMODE_WRITE 0x2
#define SOCK_PACKET 10
#define SIGKILL 9

/* Marks `target` (a tgid) so it has no authority until its next exec. */
static __always_inline void taint(__u32 target, __u32 bit, __u8 reason, bool killed)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 me = id >> 32;
	struct exec_rec *rec = bpf_map_lookup_elem(&execs, &target);

	if (rec && bit) {
		__sync_fetch_and_or(&rec->flags, bit);
		rec->tracer = me;
	}
	bump(STAT_TAINTED);
	emit_full(0, id, bpf_get_current_uid_gid(), 0, 0, 0, VERDICT_TAINT, 0, 0, 0, HOOK_TAINT,
		  killed ? REASON_KILLED : reason, target, rec ? rec->flags : 0, reason);
}

/* Marks the process of `t`, and the process that owns its memory when
 * that is another (a vfork child shares its parent's: code written
 * through the child runs in the parent). */
static __always_inline void taint_task(struct task_struct *t, __u32 bit, __u8 reason, bool killed)
{
	__u32 tgid = BPF_CORE_READ(t, tgid);

	taint(tgid, bit, reason, killed);
	if (bpf_core_field_exists(((struct mm_struct *)0)->owner)) {
		__u32 owner = BPF_CORE_READ(t, mm, owner, tgid);

		if (owner && owner != tgid)
			taint(owner, bit, reason, killed);
	}
}

/* The task behind a struct pid (its first task). */
static __always_inline struct task_struct *task_of_pid(struct pid *p)
{
	struct hlist_node *first = BPF_CORE_READ(p, tasks[0].first);

	if (!first)
		return 0;
	return core_container_of(first, struct task_struct, pid_links[0]);
}

/* The file at descriptor `fd` of the current task. */
static __always_inline struct file *file_of_fd(struct task_struct *task, long fd)
{
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds;
	struct file *f = 0;

	if (!fdt || fd < 0 || fd >= BPF_CORE_READ(fdt, max_fds))
		return 0;
	fds = BPF_CORE_READ(fdt, fd);
	bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]);
	return f;
}

/* i386 syscall numbers that matter here. A 64-bit process can make them
 * with `int $0x80` (IA32 emulation): the numbers and registers differ from
 * x86-64's, so rather than decode them, in the workload they are fatal. */
#define IA32_open 5
#define IA32_creat 8
#define IA32_ptrace 26
#define IA32_socketcall 102
#define IA32_prctl 172
#define IA32_openat 295
#define IA32_process_vm_readv 347
#define IA32_process_vm_writev 348
#define IA32_socket 359
#define IA32_setsockopt 366
#define IA32_openat2 437
#define IA32_pidfd_getfd 438
#define TS_COMPAT 0x0002
/* x32 system calls carry this bit in their number; none are decoded (the
 * ABI is off on most kernels): in the workload every one is fatal. */
#define X32_SYSCALL_BIT 0x40000000

static __always_inline bool ia32_watched(long nr)
{
	return nr == IA32_open || nr == IA32_creat || nr == IA32_ptrace || nr == IA32_socketcall ||
	       nr == IA32_prctl || nr == IA32_openat || nr == IA32_process_vm_readv ||
	       nr == IA32_process_vm_writev ||
	       nr == IA32_socket || nr == IA32_setsockopt || nr == IA32_openat2 ||
	       nr == IA32_pidfd_getfd;
}

/* Tracees walked per ptrace attach; a tracer with more, in the workload,
 * is killed. */
#define MAX_TRACEES 1024

struct tracee_walk {
	struct list_head *pos;
	void *head;
};

/* One step along a tracer thread's `ptraced` list: marks a tracee not
 * marked for ptrace yet (one audit record per tracee, not per attach). */
static long mark_tracee(__u64 index, struct tracee_walk *w)
{
	if (!w->pos || (void *)w->pos == w->head)
		return 1;
	struct task_struct *t = core_container_of(w->pos, struct task_struct, ptrace_entry);
	__u32 tgid = BPF_CORE_READ(t, tgid);
	struct exec_rec *rec = bpf_map_lookup_elem(&execs, &tgid);

	if (!rec || !(rec->flags & TAINT_PTRACE))
		taint_task(t, TAINT_PTRACE, REASON_PTRACE, false);
	w->pos = BPF_CORE_READ(t, ptrace_entry.next);
	return 0;
}

SEC("raw_tp/sys_enter")
int tether_sysenter(struct bpf_raw_tracepoint_args *ctx)
{
#ifdef SYSCALL_HOOKS
	long nr = ctx->args[1];

	if (ia32_watched(nr) || (nr & X32_SYSCALL_BIT)) {
		struct task_struct *task = current_task();

		if (((nr & X32_SYSCALL_BIT) ||
		     (BPF_CORE_READ(task, thread_info.status) & TS_COMPAT)) &&
		    in_workload() && !is_agent(bpf_get_current_pid_tgid() >> 32)) {
			taint(0, 0, REASON_COMPAT, true);
			bpf_send_signal(SIGKILL);
			return 0;
		}
	}
	if (nr != NR_process_vm_writev && nr != NR_process_vm_readv && nr != NR_prctl &&
	    nr != NR_socket && nr != NR_pidfd_getfd && nr != NR_ptrace)
		return 0;
	struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
	__u32 me = bpf_get_current_pid_tgid() >> 32;

	if (nr == NR_ptrace) {
		/* An attach from the workload is fatal: a tracer reads and
		 * writes its tracee at will (PEEKDATA takes what the tracee was
		 * delivered). The attach itself may still complete (it does not
		 * wait on signals), but the SIGKILL is pending when it returns,
		 * so the tracer thread makes no further call; only the tracer
		 * may use a ptrace attachment, and it dies with it (a PTRACE_ATTACH
		 * leaves the tracee stopped). Outside the workload the attach is
		 * marked at sys_exit. The pid names a thread in the caller's
		 * namespace: marked when it is a process of the initial one. */
		long req = ARG0(regs);

		if ((req != PTRACE_ATTACH && req != PTRACE_SEIZE) || !in_workload() || is_agent(me))
			return 0;
		bool global = BPF_CORE_READ(current_task(), thread_pid, level) == 0;

		/* Named, not marked: the kernel has not checked the caller may
		 * attach (a mark here would let anyone strip any process of
		 * its authority with a call that fails). An attach that does
		 * complete marks its tracee at sys_exit. */
		taint(global ? (__u32)ARG1(regs) : 0, 0, REASON_PTRACE, true);
		bpf_send_signal(SIGKILL);
		return 0;
	}

	if (nr == NR_pidfd_getfd) {
		/* A descriptor taken out of another process: from the workload,
		 * fatal before the call runs, whatever it names (what the
		 * descriptors say at exit could be swapped by another thread).
		 * The target is looked up only to name it in the audit. */
		if (!in_workload() || is_agent(me))
			return 0;
		struct file *pidfd = file_of_fd(current_task(), (int)ARG0(regs));
		struct pid *p = 0;

		/* pidfs (6.9+) keeps the struct pid in the inode; an anonymous
		 * inode pidfd (before) in the file. */
		if (pidfd) {
			p = BPF_CORE_READ(pidfd, f_inode, i_private);
			if (!p)
				p = BPF_CORE_READ(pidfd, private_data);
		}
		struct task_struct *owner = p ? task_of_pid(p) : 0;

		taint(owner ? BPF_CORE_READ(owner, tgid) : 0, 0, REASON_GETFD, true);
		bpf_send_signal(SIGKILL);
		return 0;
	}

	if (nr == NR_socket) {
		/* Packet and XDP sockets never pass the cgroup socket hooks
		 * (those are for IP sockets): in the workload, creating one
		 * is fatal before the call returns. The kernel turns the old
		 * (AF_INET, SOCK_PACKET) into a packet socket too. */
		__u32 family = (__u32)ARG0(regs), type = (__u32)ARG1(regs) & 0xf;

		if ((family == AF_PACKET || family == AF_XDP ||
		     (family == AF_INET && type == SOCK_PACKET)) &&
		    in_workload() && !is_agent(me)) {
			socket_refused(family, type, (__u32)ARG2(regs));
			bpf_send_signal(SIGKILL);
		}
		return 0;
	}

	if (nr == NR_prctl) {
		/* Any PR_SET_MM (exe file, memory map) rewrites what /proc
		 * says this process is. */
		/* The kernel takes the option as an int: compare only that. */
		if ((int)ARG0(regs) == PR_SET_MM)
			taint(me, TAINT_SET_MM, REASON_SET_MM, false);
		return 0;
	}
	if (is_agent(me))
		return 0;
	/* process_vm_{read,write}v(pid, ...): pid is in the caller's pid
	 * namespace; only the initial namespace's numbers are our keys. */
	__u32 target = (__u32)ARG0(regs);
	struct task_struct *task = current_task();
	bool global = BPF_CORE_READ(task, thread_pid, level) == 0;
	bool reading = nr == NR_process_vm_readv;
	__u32 bit = reading ? TAINT_MEM_READ : TAINT_MEM_WRITE;
	__u8 reason = reading ? REASON_MEM_READ : REASON_MEM_WRITE;

	if (global && target == me)
		return 0; /* its own memory */
	bool kill = in_workload();
	if (reading) {
		/* A read changes nothing in the target: it is marked at
		 * sys_exit, once the kernel allowed it and bytes came back
		 * (marking here would let anyone strip any process of its
		 * authority with a call that fails). From the workload it is
		 * fatal before it copies a byte: named, not marked. */
		if (kill) {
			taint(global ? target : 0, 0, reason, true);
			bpf_send_signal(SIGKILL);
		}
		return 0;
	}
	if (global)
		taint(target, bit, reason, kill);
	else
		taint(0, bit, reason, kill);
	if (kill)
		bpf_send_signal(SIGKILL);
#endif
	return 0;
}

SEC("raw_tp/sys_exit")
int tether_sysexit(struct bpf_raw_tracepoint_args *ctx)
{
#ifdef SYSCALL_HOOKS
	long ret = ctx->args[1];

	if (ret < 0)
		return 0;
	struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
	long nr = SYSCALL_NR(regs);

	if (nr != NR_ptrace && nr != NR_open && nr != NR_openat && nr != NR_openat2 &&
	    nr != NR_creat && nr != NR_process_vm_readv)
		return 0;
	struct task_struct *task = current_task();
	__u32 me = bpf_get_current_pid_tgid() >> 32;

	if (nr == NR_process_vm_readv) {
		/* Bytes of another process were read (the kernel allowed it):
		 * what it was delivered may be known. */
		__u32 target = (__u32)ARG0(regs);

		if (ret > 0 && target != me && !is_agent(me) &&
		    BPF_CORE_READ(task, thread_pid, level) == 0)
			taint(target, TAINT_MEM_READ, REASON_MEM_READ, false);
		return 0;
	}

	if (nr == NR_ptrace) {
		long req = ARG0(regs);

		if (req != PTRACE_ATTACH && req != PTRACE_SEIZE)
			return 0;
		/* The new tracee is on this thread's list, but not surely at
		 * its head: children of its other tracees auto-attached since
		 * (CLONE_PTRACE, PTRACE_O_TRACECLONE) go there too. Every
		 * process on the list is being traced: mark them all. */
		struct tracee_walk w = {
			.pos = BPF_CORE_READ(task, ptraced.next),
			.head = (void *)task + bpf_core_field_offset(struct task_struct, ptraced),
		};

		bpf_loop(MAX_TRACEES, mark_tracee, &w, 0);
		if (w.pos && (void *)w.pos != w.head && in_workload() && !is_agent(me)) {
			/* More than we walk: from the workload, fatal. */
			taint(0, 0, REASON_PTRACE, true);
			bpf_send_signal(SIGKILL);
		}
		return 0;
	}

	/* The file the call just installed at `ret`. */
	struct file *f = file_of_fd(task, ret);
	if (!f)
		return 0;

	/* An open that returned a /proc/<pid>/mem file: to write (a change),
	 * or only to read (an exposure), by the file's own mode (the call's
	 * flags could be changed under us). */
	__u32 mode = BPF_CORE_READ(f, f_mode);
	/* O_PATH: neither mode, no access check, nothing readable; anyone
	 * may make one, so it must mark nothing. */
	if (!(mode & (FMODE_READ | FMODE_WRITE)))
		return 0;
	__u32 bit = (mode & FMODE_WRITE) ? TAINT_MEM_WRITE : TAINT_MEM_READ;
	struct inode *inode = BPF_CORE_READ(f, f_inode);
	if (BPF_CORE_READ(inode, i_sb, s_magic) != PROC_SUPER_MAGIC)
		return 0;
	char name[8] = {};
	bpf_probe_read_kernel_str(name, sizeof(name), BPF_CORE_READ(f, f_path.dentry, d_name.name));
	bool mem = name[0] == 'm' && name[1] == 'e' && name[2] == 'm' && name[3] == 0;
	/* environ: what a process was started with, credentials sourced
	 * from an env-format file among them. */
	bool env_file = name[0] == 'e' && name[1] == 'n' && name[2] == 'v' && name[3] == 'i' &&
		       name[4] == 'r' && name[5] == 'o' && name[6] == 'n' && name[7] == 0;
	if (!mem && !env_file)
		return 0;
	struct proc_inode *pi = core_container_of(inode, struct proc_inode, vfs_inode);
	struct task_struct *target = task_of_pid(BPF_CORE_READ(pi, pid));
	if (!target || BPF_CORE_READ(target, tgid) == me || is_agent(me))
		return 0;
	bool kill = in_workload();
	taint_task(target, env_file ? TAINT_MEM_READ : bit, env_file ? REASON_PROC_ENVIRON : REASON_PROC_MEM,
		   kill);
	if (kill)
		bpf_send_signal(SIGKILL);
#endif
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
