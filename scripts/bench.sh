#!/usr/bin/env bash
# make bench: runs the benchmarks (release build) and rewrites
# docs/benchmarks.md with the results, the machine and the command.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked --release -p tether -p tether-bench
issuance_doc() {
  echo "- *baseline*: generating a P-256 key and a CSR, the work every SVID needs."
  echo "- *CA only*: the same plus the CA signing step, no RPC."
  echo "- *end to end*: key generation, CSR, gRPC over TLS 1.3 to the server,"
  echo "  entitlement check, signing, and encoding the result as the Workload API"
  echo "  sends it. Client and server run in this process on the same 2 cores, so"
  echo "  per-CPU-second figures count both sides."
  echo "- *exec to SVID ready*: from just before \`spawn\` of a copy of"
  echo "  \`/bin/sleep\` (already hashed: cached binary) until the agent holds"
  echo "  the new process's SVID, driven by kernel process events."
}
connect_doc() {
  echo "- What is timed: one blocking \`connect()\` call to a 127.0.0.1 TCP listener"
  echo "  (a thread that accepts and drops), from a process inside the cgroup the"
  echo "  hook is attached to: the bench re-executes itself, moved into its own"
  echo "  \`<cgroup2>/tether-bench-<pid>\` before exec (never the root cgroup; removed"
  echo "  afterwards). Each iteration is socket, \`SO_LINGER\` 0, connect, close (RST,"
  echo "  so no TIME_WAIT piles up); only the connect is timed. 1000 untimed"
  echo "  connects first, then 20000 timed ones per run."
  echo "- *(a)* no programs attached; *(a')* \`Enforcer\` loaded on the cgroup, the"
  echo "  destination not a service (the hook's two service lookups miss);"
  echo "  *(b)* the port is a service and the process is attested (exec id read"
  echo "  first, then \`set_process\`) with a subject that has an allow verdict;"
  echo "  *(c)* attested with a subject that has no verdict, so connect fails with"
  echo "  EPERM before any packet is sent (hence faster than the baseline)."
  echo "- Every decision in (b) and (c) writes an event to the ring buffer. A"
  echo "  thread reads them the way the agent's audit pump does (poll, then"
  echo "  drain), so a decision also wakes that reader, as it would with an"
  echo "  agent running. The hook counters are checked after every round."
  echo "- The four configurations run interleaved, one round after another (the"
  echo "  enforcer is loaded and dropped every round); each figure is the median"
  echo "  over the rounds of the per-run p50/p99/mean, with the spread of p50"
  echo "  between runs. The last column divides each round's p50 by the same"
  echo "  round's baseline and gives the median and range of those ratios:"
  echo "  pairing cancels the machine's drift between rounds, and the goal is"
  echo "  judged on it."
  echo "- The kernel's own account of each program (BPF run-time stats, on for"
  echo "  one extra allowed run in the last round only: the accounting costs a"
  echo "  clock read per program run) shows where an allowed connect's added"
  echo "  time goes, free of the timing noise."
  echo "- System calls: the bench process itself (outside the enforced cgroup,"
  echo "  like any process on the host) times 200000 calls, without and with the"
  echo "  programs loaded, every round."
}
held_doc() {
  echo "- Each process is the bench binary re-executed (\`--connect-once PORT\`), moved"
  echo "  into \`<cgroup2>/tether-bench-<pid>-held\` before exec: it connects to"
  echo "  127.0.0.1 and reads the server's one-byte greeting, so it only counts if"
  echo "  its connection really reached the server. Timed: spawn to exit."
  echo "- A second in-process agent enforces that cgroup (\`tether_agent::start\` with"
  echo "  \`EnforceConfig\`, hold listener on loopback). The binary is registered by"
  echo "  sha256 and path, a Service covers the protected port, an AccessPolicy allows it."
  echo "- *baseline*: the same fresh processes connecting to an unprotected port"
  echo "  (the hook runs and finds no service). *protected*: each process's first"
  echo "  connect is decided in the kernel if the agent attested it in time, or held"
  echo "  and completed by the agent otherwise; the held share is reported."
  echo "  Baseline and protected rounds alternate."
}
mesh_doc() {
  echo "- Topology: network namespaces A and B, each with one veth port on a bridge"
  echo "  in a third namespace (no route out). B runs \`tether up\` (server and agent,"
  echo "  enforcing a cgroup of the bench's own) and the servers; A runs \`tether agent\`"
  echo "  and the clients, in A's enforced cgroup. Release builds of both binaries."
  echo "- *direct plaintext*: the client connects to B's server on a port no Service"
  echo "  covers. *Tether*: the same server behind a Service with \`mesh: {mode: mutual}\`:"
  echo "  the kernel redirects the connect to agent A, which opens TLS 1.3"
  echo "  (X25519MLKEM768, the process's own SVID) to agent B, which applies ingress"
  echo "  policy and connects to the server. *stunnel4*: a client stunnel on A's"
  echo "  loopback and a server stunnel on B, TLS 1.3 only, both sides verifying the"
  echo "  other's certificate (P-256, one CA), forwarding to the plaintext server."
  echo "  stunnel's logging is off (\`syslog = no\`, \`debug = 3\`): without a syslog"
  echo "  socket it writes every connection to /dev/console, which added ~10 ms each."
  echo "- Time to first byte: a fresh client process makes 20 untimed and then 300"
  echo "  timed connections, each timed from before \`connect()\` until the 1-byte echo"
  echo "  is back (so Tether's figure includes the redirect, the agent's TCP and TLS"
  echo "  handshakes and the ingress decision). The three setups alternate in each of"
  echo "  5 rounds; figures are medians over rounds. *conn/s* is back-to-back"
  echo "  connections per second of connecting time, one at a time."
  echo "- Throughput: \`iperf3 -c ... -t 4\`, one stream, receiver's figure; the three"
  echo "  setups alternate, 3 rounds, median. On 2 cores the client, both relays"
  echo "  (agents or stunnels) and the server share the CPUs."
}
credfs_doc() {
  echo "- Readers are the bench binary re-executed (\`--cred-reader PATH N\`): each"
  echo "  times N rounds of open, read to EOF in 4 KiB reads (32 bytes), close, as"
  echo "  \\`cat\\` does. The binary is registered by path with a static CredentialSource"
  echo "  bound as a file; the baseline is the same 32 bytes in a tmpfs file"
  echo "  (/dev/shm) read the same way."
  echo "- *FUSE floor*: that tmpfs file through bindfs (libfuse, passing calls"
  echo "  through) mounted with the credential filesystem's kernel settings: no"
  echo "  entry, attribute or negative caching, direct I/O. It is what any FUSE"
  echo "  filesystem bound by the issue's no-caching rule costs on this machine"
  echo "  (lookup, open, two reads and release reach the daemon on every read)."
  echo "- *one FUSE round trip*: stat of the credential directory, which the agent"
  echo "  answers without attestation: the cost of one request to the daemon and"
  echo "  back. A cached read is four (lookup, open, the read, the read at EOF;"
  echo "  release does not wait)."
  echo "- *cached*: reads 2..2000 of one process (attested, value fetched). *first"
  echo "  read*: the first read of a fresh process each (its attestation, if the"
  echo "  agent has not done it from the exec event yet, and the server round trip"
  echo "  for the secret). *100 processes*: reads per second of wall time while 100"
  echo "  readers run at once (spawn included, the same for both). Five rounds,"
  echo "  baseline and credential file alternating; medians, ratio ranges."
  echo "- \`tether-bench credfs\` runs this section alone."
}
containers_doc() {
  echo "- One \`tether up\` enforcing a cgroup of the bench's own; a greeter (one byte"
  echo "  per connection) on the host end of a veth pair is a Service. The client is"
  echo "  the bench binary (\`--timed-connect\`): it times one connect() up to the"
  echo "  greeting, so container start-up is not counted."
  echo "- *host process*: a fresh process in the enforced cgroup (held, or decided in"
  echo "  the kernel if the agent attested it first). *container, namespace already"
  echo "  served*: a fresh podman container (runc, an image assembled by the bench,"
  echo "  the host's /usr read-only) in a network namespace the agent already listens"
  echo "  in. *container, new network namespace*: a fresh container in a namespace"
  echo "  made just before it; its first connect may come before the agent's listener"
  echo "  there, and then waits for the SYN to be sent again (1 s). Identities:"
  echo "  \`process:sha256\` plus \`process:path\` (host) or \`container:image\`."
  echo "  The three alternate within each round. \`tether-bench containers\` runs it alone."
}
inject_doc() {
  echo "- One host. \`tether up\` enforces a cgroup of the bench's own; the client is"
  echo "  the bench binary re-executed in it (\`--http-keepalive ADDR N\` or"
  echo "  \`--redis-ping ADDR N\`), registered by sha256 and path, with one"
  echo "  CredentialBinding per protocol injecting into a Service."
  echo "- *HTTP*: Debian's nginx, one port behind injection (\`if\` on the bearer"
  echo "  token, 401 otherwise) and one no Service covers (direct). One connection,"
  echo "  \`GET /\` and its whole response, one request in flight; the kernel"
  echo "  redirects the connect to the agent, which frames each request, replaces"
  echo "  \`Authorization\`, and relays the response."
  echo "- *Redis*: a redis-server with \`requirepass\` behind injection (the agent sends"
  echo "  AUTH before relaying) and one without a password on a port no Service covers."
  echo "- Both sides of each pair alternate in every round; the ratio and the added"
  echo "  p50 are paired per round. \`tether-bench inject\` runs this section alone."
}
out=$(mktemp)
./target/release/tether-bench | tee "$out"
{
  echo "# Benchmarks"
  echo
  echo "Generated by \`make bench\` (\`scripts/bench.sh\`, which runs \`target/release/tether-bench\`)"
  echo "on $(date -u +%Y-%m-%d), $(nproc) cores, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')."
  echo "Ratios are against the baseline measured in the same run; figures are medians"
  echo "(these machines are noisy). Nothing here is asserted by tests."
  echo
  # The binary prints one "## ..." section per benchmark; each section's
  # description goes right under its heading.
  while IFS= read -r line; do
    printf '%s\n' "$line"
    case "$line" in
      "## SVID issuance"*) echo; issuance_doc ;;
      "## connect() latency"*) echo; connect_doc ;;
      "## First connects"*) echo; held_doc ;;
      "## Mesh between two hosts"*) echo; mesh_doc ;;
      "## Credential filesystem"*) echo; credfs_doc ;;
      "## Credential injection"*) echo; inject_doc ;;
      "## First connection of a fresh container"*) echo; containers_doc ;;
    esac
  done < "$out"
  echo
  cat docs/benchmarks-notes.md
} > docs/benchmarks.md
rm -f "$out"
echo "wrote docs/benchmarks.md"
