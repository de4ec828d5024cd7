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
#define SVC_MESH 1
/* Migration: the service's host still accepts plaintext from other hosts,
 * and reports each such connection for audit. */
#define SVC_PERMISSIVE 2

/* exec_id is the value of execs[tgid] when the agent started attesting. A
 * process that exec'd in between has a different exec_id, so a verdict
 * computed for the old image can never apply to the new one, however late
 * the agent's write lands. */
struct proc_state {
	__u32 subject;
	__u32 flags; /* PROC_* */
	__u64 exec_id;
};

/* The agent itself: its connections (completing held ones) pass unchecked,
 * and while this entry lives (the exit tracepoint frees it when the agent
 * dies) unattested connections are held for it rather than refused. */
#define PROC_AGENT 1

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
	VERDICT_UNATTESTED = 2, /* refused: no agent to hold it for, or UDP */
	VERDICT_HELD = 3,       /* redirected to the agent, which decides */
	VERDICT_MESH = 4,       /* allowed, redirected to the agent's tunnel */
	VERDICT_MESH_DOWN = 5,  /* allowed, but no agent to tunnel it: refused */
	VERDICT_PLAINTEXT = 6,  /* permissive Service accepted plaintext (ingress) */
};

/* config[0]: where to hold connections of processes not attested yet. */
struct hold_cfg {
	__u32 agent_tgid;
	__be16 port; /* the agent's hold listener on loopback; 0 = no holding */
	__u8 flags;  /* HOLD_V4 | HOLD_V6: which loopback listeners exist */
	__u8 pad;
	__u64 netns; /* the agent's network namespace cookie */
};

#define HOLD_V4 1
#define HOLD_V6 2

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
	__u16 pad2;
	__u64 exec_id;
	__u64 start_ns; /* process start, CLOCK_BOOTTIME ns (as /proc stat) */
	__u8 local_addr[16]; /* client address, IPv4-mapped for IPv4; sock_ops */
};

/* The client's full address, not just its port: a process binding another
 * loopback address with the same port must not match someone else's
 * record. */
#define REDIRECT_HELD 0 /* unattested: the agent decides */
#define REDIRECT_MESH 1 /* allowed: the agent tunnels */

struct held_key {
	__u8 addr[16]; /* IPv4-mapped for IPv4 flows */
	__u16 port;    /* host order */
	__u8 v6;
	__u8 pad;
};

struct held {
	struct redirect r;
	__u64 cookie;
};

enum {
	HOOK_CONNECT4 = 0,
	HOOK_CONNECT6 = 1,
	HOOK_SENDMSG4 = 2,
	HOOK_SENDMSG6 = 3,
	HOOK_INGRESS = 4, /* accepted connection on this host (sock_ops) */
};

enum {
	STAT_ALLOW = 0,
	STAT_DENY = 1,
	STAT_UNATTESTED = 2,
	STAT_DROPPED_EVENTS = 3,
	STAT_HELD = 4,
	STAT_MESH = 5,
	STAT_INGRESS_DROPPED = 6, /* packets from other hosts to a fronted service */
	STAT_MAX = 8, /* room to grow without changing the pinned map */
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
_Static_assert(sizeof(struct hold_cfg) == 16, "hold_cfg ABI");
_Static_assert(sizeof(struct redirect) == 72, "redirect ABI");
_Static_assert(__builtin_offsetof(struct redirect, exec_id) == 40, "redirect ABI");
_Static_assert(sizeof(struct held_key) == 20, "held_key ABI");
_Static_assert(sizeof(struct held) == 80, "held ABI");
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

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct hold_cfg);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct redirect);
} redirects SEC(".maps");

/* Held connections by client address and port, waiting for the agent's accept. LRU: a
 * connection the agent never sees cannot fill it. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct held_key);
	__type(value, struct held);
} held SEC(".maps");

/* Ports of meshed Services on this host (host order) -> that Service. The
 * service's socket may listen on every address, including ones the Service
 * does not name (another NIC, loopback): packets from other hosts to the
 * port are dropped whatever their destination address, and local connects
 * to it over loopback are judged as connects to the Service. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct svc);
} mesh_ports SEC(".maps");

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

struct task_struct {
	int pid;
	int tgid;
	struct task_struct *group_leader;
	__u64 start_boottime;
} __attribute__((preserve_access_index));

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

/* Posts one decision for the agent's audit. Never waits for the reader: a
 * full buffer costs an event, counted, not a decision. */
static __always_inline void emit(__u64 cookie, __u64 pid_tgid, __u64 uid_gid, __u32 subject,
				 __u32 service_id, __u32 rule, __u8 verdict, __u8 proto,
				 __be16 port, const __u8 *addr, __u8 hook)
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
	__builtin_memcpy(e->addr, addr, 16);
	e->hook = hook;
	if (pid_tgid)
		bpf_get_current_comm(e->comm, sizeof(e->comm));
	/* Waking the reader on every decision costs the connecting process a
	 * context switch (measured: allowed connect 1.3x slower). The agent
	 * drains on a short timer instead and is woken only when the buffer
	 * is filling up. */
	__u64 wake = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) > EVENTS_WAKE_BYTES
			     ? BPF_RB_FORCE_WAKEUP
			     : BPF_RB_NO_WAKEUP;
	bpf_ringbuf_submit(e, wake);
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

/* Redirects a TCP connect to the agent's listener on loopback and records
 * where it was going: unattested processes (held: the agent decides) and
 * allowed connects to meshed Services (the agent tunnels). Only when an
 * agent is alive to answer, in the agent's network namespace (a loopback
 * port elsewhere could be anyone's). */
static __always_inline bool to_agent(struct bpf_sock_addr *ctx, __u8 hook, __u32 protocol,
				     const struct dst_key *key, bool mapped, __u32 tgid,
				     __u32 pid, __u32 uid, __u32 service_id, __u8 kind)
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
	if (bpf_get_netns_cookie(ctx) != cfg->netns)
		return false;
	bool flow_v6 = hook == HOOK_CONNECT6 && !mapped;
	if (!(cfg->flags & (flow_v6 ? HOLD_V6 : HOLD_V4)))
		return false;

	struct redirect *r = bpf_sk_storage_get(&redirects, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!r)
		return false;
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();

	__builtin_memcpy(r->addr, key->addr, 16);
	r->port = key->port;
	r->flow_v6 = flow_v6;
	r->kind = kind;
	r->tgid = tgid;
	r->pid = pid;
	r->uid = uid;
	r->service_id = service_id;
	r->local_port = 0;
	r->pad2 = 0;
	r->exec_id = exec_id_of(tgid);
	r->start_ns = BPF_CORE_READ(task, group_leader, start_boottime);
	__builtin_memset(r->local_addr, 0, 16);

	__u32 port = cfg->port;
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
	/* A socket whose earlier connect was held and failed may connect
	 * again: its old record must not describe the new connection. */
	if (protocol == IPPROTO_TCP && (hook == HOOK_CONNECT4 || hook == HOOK_CONNECT6))
		bpf_sk_storage_delete(&redirects, ctx->sk);
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

	struct svc *svc = service_of(&key);
	bool local_port = false;
	if (!svc && is_loopback(key.addr)) {
		__u32 p = bpf_ntohs(key.port);

		svc = bpf_map_lookup_elem(&mesh_ports, &p);
		local_port = svc != 0;
	}
	if (!svc)
		return 1; /* not protected: untouched */
	__u32 service_id = svc->service_id;
	/* A meshed Service of this host reached over loopback: decided
	 * here, directly (no tunnel to ourselves). */
	__u32 svc_flags = local_port ? 0 : svc->flags;

	__u64 id = bpf_get_current_pid_tgid();
	__u64 ug = bpf_get_current_uid_gid();
	__u32 tgid = id >> 32;
	__u32 subject = 0, rule = 0;
	__u8 verdict;

	struct proc_state *ps = bpf_map_lookup_elem(&procs, &tgid);
	if (!ps || ps->exec_id != exec_id_of(tgid)) {
		/* Not attested (or attested for an image it no longer runs):
		 * never allowed blind. Held for the agent when possible, which
		 * attests, decides and completes or refuses it. */
		verdict = to_agent(ctx, hook, protocol, &key, mapped, tgid, (__u32)id, (__u32)ug,
				   service_id, REDIRECT_HELD)
				  ? VERDICT_HELD
				  : VERDICT_UNATTESTED;
	} else if (ps->flags & PROC_AGENT) {
		return 1; /* the agent completing a held connection */
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
		/* A fronted Service is reached through the tunnel only; without
		 * an agent to carry it the connect fails rather than go out in
		 * plaintext (the far side would drop it anyway). */
		if (verdict == VERDICT_ALLOW && (svc_flags & SVC_MESH))
			verdict = to_agent(ctx, hook, protocol, &key, mapped, tgid, (__u32)id,
					   (__u32)ug, service_id, REDIRECT_MESH)
					  ? VERDICT_MESH
					  : VERDICT_MESH_DOWN;
	}

	bump(verdict == VERDICT_ALLOW	 ? STAT_ALLOW
	     : verdict == VERDICT_DENY	 ? STAT_DENY
	     : verdict == VERDICT_HELD	 ? STAT_HELD
	     : verdict == VERDICT_MESH	 ? STAT_MESH
	     : verdict == VERDICT_MESH_DOWN ? STAT_DENY
					 : STAT_UNATTESTED);

	emit(bpf_get_socket_cookie(ctx), id, ug, subject, service_id, rule, verdict, key.proto,
	     key.port, key.addr, hook);

	/* 0 makes connect()/sendmsg() fail with EPERM. */
	return verdict == VERDICT_ALLOW || verdict == VERDICT_HELD || verdict == VERDICT_MESH ? 1 : 0;
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
	if (op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_STATE_CB)
		return 1;
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return 1;
	struct redirect *r = bpf_sk_storage_get(&redirects, sk, 0, 0);
	if (!r)
		return 1;
	struct held_key k = { .v6 = r->flow_v6 };
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
	if (!svc) {
		__u32 p = sk->src_port;

		svc = bpf_map_lookup_elem(&mesh_ports, &p);
	}
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
 */

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
	/* The agent's exemption is the agent's alone: a child it forks starts
	 * unattested. */
	if (ps && !(ps->flags & PROC_AGENT))
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
