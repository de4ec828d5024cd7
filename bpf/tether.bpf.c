// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Tether connection-time enforcement (kernel half).
 *
 * cgroup sock_addr hooks decide every connect()/sendmsg() to a protected
 * destination from (process identity, service) verdicts that the agent keeps
 * in maps; raw tracepoints keep those verdicts tied to the process image:
 * exec clears, fork inherits, exit frees.
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

typedef _Bool bool;

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
};

/* exec_id is the value of execs[tgid] when the agent started attesting. A
 * process that exec'd in between has a different exec_id, so a verdict
 * computed for the old image can never apply to the new one, however late
 * the agent's write lands. */
struct proc_state {
	__u32 subject;
	__u32 flags; /* reserved, 0 */
	__u64 exec_id;
};

struct policy_key {
	__u32 subject;
	__u32 service_id;
};

struct verdict {
	__u32 allow;
	__u32 rule;
};

enum {
	VERDICT_DENY = 0,
	VERDICT_ALLOW = 1,
	VERDICT_UNATTESTED = 2,
};

enum {
	HOOK_CONNECT4 = 0,
	HOOK_CONNECT6 = 1,
	HOOK_SENDMSG4 = 2,
	HOOK_SENDMSG6 = 3,
};

enum {
	STAT_ALLOW = 0,
	STAT_DENY = 1,
	STAT_UNATTESTED = 2,
	STAT_DROPPED_EVENTS = 3,
	STAT_MAX = 4,
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
};

_Static_assert(sizeof(struct dst_key) == 24, "dst_key ABI");
_Static_assert(sizeof(struct proc_state) == 16, "proc_state ABI");
_Static_assert(sizeof(struct event) == 88, "event ABI");
_Static_assert(__builtin_offsetof(struct event, verdict) == 44, "event ABI");
_Static_assert(__builtin_offsetof(struct event, addr) == 48, "event ABI");
_Static_assert(__builtin_offsetof(struct event, hook) == 64, "event ABI");
_Static_assert(__builtin_offsetof(struct event, comm) == 65, "event ABI");

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

/* tgid -> boot-time ns of its last exec seen since load (absent = 0). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 131072);
	__type(key, __u32);
	__type(value, __u64);
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

/* ---- helpers ----------------------------------------------------------- */

/* Keep clang from narrowing a 4-byte ctx load: sock_addr ctx fields such as
 * user_port only accept full-width loads, and the verifier rejects others. */
#define full_width(x) asm volatile("" : "+r"(x))

static __always_inline void bump(__u32 idx)
{
	__u64 *c = bpf_map_lookup_elem(&stats, &idx);

	if (c)
		__sync_fetch_and_add(c, 1);
}

static __always_inline __u64 exec_id_of(__u32 tgid)
{
	__u64 *e = bpf_map_lookup_elem(&execs, &tgid);

	return e ? *e : 0;
}

static __always_inline int decide(struct bpf_sock_addr *ctx, __u8 hook, bool v6)
{
	struct dst_key key = {};
	__u32 protocol = ctx->protocol;
	__u32 port = ctx->user_port;

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
	key.prefixlen = 32 + 128;
	/* user_port holds the port in network order in its low 16 bits. */
	key.port = (__be16)port;

	if (v6) {
		__u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1];
		__u32 a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];

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

	/* A rule for the exact port wins over an any-port (0) rule. */
	struct svc *svc = bpf_map_lookup_elem(&services, &key);
	if (!svc) {
		key.port = 0;
		svc = bpf_map_lookup_elem(&services, &key);
		if (!svc)
			return 1; /* not protected: untouched */
		key.port = (__be16)port;
	}
	__u32 service_id = svc->service_id;

	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;
	__u32 subject = 0, rule = 0;
	__u8 verdict;

	struct proc_state *ps = bpf_map_lookup_elem(&procs, &tgid);
	if (!ps || ps->exec_id != exec_id_of(tgid)) {
		/* Not attested (or attested for an image it no longer runs).
		 * Denied for now; the agent's "hold" (redirect to the agent,
		 * which attests and completes the connection) comes later. */
		verdict = VERDICT_UNATTESTED;
	} else {
		struct policy_key pk = { .subject = ps->subject, .service_id = service_id };
		struct verdict *v;

		subject = ps->subject;
		v = bpf_map_lookup_elem(&policy, &pk);
		if (v) {
			rule = v->rule;
			verdict = v->allow ? VERDICT_ALLOW : VERDICT_DENY;
		} else {
			verdict = VERDICT_DENY; /* protected means deny by default */
		}
	}

	bump(verdict == VERDICT_ALLOW ? STAT_ALLOW
	     : verdict == VERDICT_DENY ? STAT_DENY
				       : STAT_UNATTESTED);

	/* Never wait for the reader: a full buffer costs an event, counted,
	 * not a decision. */
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		bump(STAT_DROPPED_EVENTS);
	} else {
		__u64 ug = bpf_get_current_uid_gid();

		__builtin_memset(e, 0, sizeof(*e));
		e->ts_ns = bpf_ktime_get_boot_ns();
		e->cookie = bpf_get_socket_cookie(ctx);
		e->tgid = tgid;
		e->pid = (__u32)id;
		e->uid = (__u32)ug;
		e->gid = ug >> 32;
		e->subject = subject;
		e->service_id = service_id;
		e->rule = rule;
		e->verdict = verdict;
		e->proto = key.proto;
		e->port = key.port;
		__builtin_memcpy(e->addr, key.addr, 16);
		e->hook = hook;
		bpf_get_current_comm(e->comm, sizeof(e->comm));
		/* Waking the reader on every decision costs the connecting
		 * process a context switch (measured: allowed connect 1.3x
		 * slower). The agent drains on a short timer instead and is
		 * woken only when the buffer is filling up. */
		__u64 wake = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) > EVENTS_WAKE_BYTES
				     ? BPF_RB_FORCE_WAKEUP
				     : BPF_RB_NO_WAKEUP;
		bpf_ringbuf_submit(e, wake);
	}

	/* 0 makes connect()/sendmsg() fail with EPERM. */
	return verdict == VERDICT_ALLOW ? 1 : 0;
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

/* ---- process lifecycle ------------------------------------------------- */
/*
 * Raw tracepoints, not tracefs tracepoints: they attach by name without a
 * mounted tracefs, and they hand us task_struct pointers, so fork can tell a
 * new process from a new thread exactly. Arguments follow TP_PROTO:
 *   sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *)
 *   sched_process_fork(struct task_struct *parent, struct task_struct *child)
 *   sched_process_exit(struct task_struct *p[, bool group_dead])  (group_dead: 6.16+)
 */

struct task_struct {
	int pid;
	int tgid;
} __attribute__((preserve_access_index));

/* Only used to ask (CO-RE) whether this kernel passes group_dead. */
struct trace_event_raw_sched_process_exit {
	bool group_dead;
} __attribute__((preserve_access_index));

SEC("raw_tp/sched_process_exec")
int tether_exec(struct bpf_raw_tracepoint_args *ctx)
{
	/* Runs after the point of no return, before the new image's first
	 * instruction: the old image's verdicts die here, synchronously. */
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u64 now = bpf_ktime_get_boot_ns();

	bpf_map_delete_elem(&procs, &tgid);
	/* If execs is full the entry stays as it was: the procs delete above
	 * already removed the old verdict. */
	bpf_map_update_elem(&execs, &tgid, &now, BPF_ANY);
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
	__u64 *ex = bpf_map_lookup_elem(&execs, &parent);

	if (ex)
		bpf_map_update_elem(&execs, &child_tgid, ex, BPF_ANY);
	else
		bpf_map_delete_elem(&execs, &child_tgid);
	if (ps)
		bpf_map_update_elem(&procs, &child_tgid, ps, BPF_ANY);
	else
		bpf_map_delete_elem(&procs, &child_tgid);
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
	}
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
