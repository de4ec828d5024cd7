#!/usr/bin/env bash
# The main job on one machine: tether up, identities from an example
# manifest, two processes receiving their own identities, a third refused.
set -euo pipefail
cd "$(dirname "$0")/.."
TETHER=${TETHER:-$PWD/target/debug/tether}
DEMO=/var/tmp/tether-demo
RUN=$DEMO/run
export TETHER_ADMIN_SOCKET=$RUN/admin.sock TETHER_AGENT_SOCKET=$RUN/agent.sock
export SPIFFE_ENDPOINT_SOCKET=unix://$RUN/workload.sock

b=$(tput bold 2>/dev/null || true); n=$(tput sgr0 2>/dev/null || true)
step() { echo; echo "${b}== $*${n}"; }
show() { echo "\$ $*"; "$@"; }

# Enforcement applies to one cgroup of the demo's own (never the root).
CG_ROOT=$(awk '$3 == "cgroup2" {print $2; exit}' /proc/mounts)
CG=${CG_ROOT:+$CG_ROOT/tether-demo}

PIN=/sys/fs/bpf/tether-demo
cleanup() {
  [ -n "${UP_PID:-}" ] && kill "$UP_PID" 2>/dev/null && wait "$UP_PID" 2>/dev/null || true
  umount -l "$RUN/credentials" 2>/dev/null || true
  "$TETHER" detach --pin-dir "$PIN" ${CG:+--cgroup "$CG"} >/dev/null 2>&1 || true
  [ -n "${HOLD_PID:-}" ] && kill "$HOLD_PID" 2>/dev/null || true
  [ -n "${REDIS_PID:-}" ] && kill "$REDIS_PID" 2>/dev/null || true
  [ -n "${REDIS2_PID:-}" ] && kill "$REDIS2_PID" 2>/dev/null || true
  if [ -n "$CG" ] && [ -d "$CG" ]; then
    for p in $(cat "$CG/cgroup.procs" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    sleep 0.2; rmdir "$CG" 2>/dev/null || true
  fi
}
trap cleanup EXIT

umount -l "$RUN/credentials" 2>/dev/null || true
rm -rf "$DEMO"; mkdir -p "$DEMO/bin" "$RUN"; chmod 755 "$DEMO" "$DEMO/bin" "$RUN"
[ -n "$CG" ] || { echo "no cgroup2 mount found in /proc/mounts"; exit 1; }
[ -d "$CG" ] && rmdir "$CG" 2>/dev/null; mkdir -p "$CG"
# in_cg CMD...: run CMD inside the enforced cgroup.
in_cg() { sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$CG" "$@"; }
# The "workload": a copy of the tether binary, used only for its `fetch`
# command (a plain SPIFFE Workload API client).
install -m 755 "$TETHER" "$DEMO/bin/app"
install -m 755 "$TETHER" "$DEMO/bin/intruder"
install -m 755 "$(command -v cat)" "$DEMO/bin/dbclient"

step "1. Start Tether on this machine: server (CA, registry) + node agent, one process"
echo "\$ tether up --data-dir $DEMO/data --run-dir $RUN --enforce-cgroup $CG --bpf-pin-dir $PIN &"
"$TETHER" up --log-format text --data-dir "$DEMO/data" --run-dir "$RUN" \
  --listen 127.0.0.1:0 --metrics 127.0.0.1:0 --bpf-pin-dir "$PIN" \
  --enforce-cgroup "$CG" --audit-log "$DEMO/audit.log" >"$DEMO/tether.log" 2>&1 &
UP_PID=$!
for _ in $(seq 100); do grep -q "tether is up" "$DEMO/tether.log" 2>/dev/null && break; sleep 0.1; done
grep -q "tether is up" "$DEMO/tether.log" || { cat "$DEMO/tether.log"; exit 1; }
echo "up: the agent attested itself to the server with a join token and got a node SVID"
show "$TETHER" get nodes

step "2. Register identities from examples/demo.yaml"
show "$TETHER" apply -f examples/demo.yaml

step "3. /var/tmp/tether-demo/bin/app run as root gets its own identity (key made in the agent)"
show "$DEMO/bin/app" fetch --write "$DEMO/admin"

step "4. The same binary run as user 'nobody' gets a different identity"
echo "\$ setpriv --reuid=nobody --regid=nogroup --clear-groups $DEMO/bin/app fetch"
setpriv --reuid=nobody --regid=nogroup --clear-groups "$DEMO/bin/app" fetch

step "5. A copy of the same bytes at another path is refused"
echo "\$ $DEMO/bin/intruder fetch"
if "$DEMO/bin/intruder" fetch; then echo "UNEXPECTED: the intruder got an identity"; exit 1; fi

step "6. Why? For any live process, tether whoami lists every selector and what did not match"
install -m 755 /bin/sleep "$DEMO/bin/backdoor"
"$DEMO/bin/backdoor" 60 & HOLD_PID=$!
show "$TETHER" whoami --pid "$HOLD_PID"
kill "$HOLD_PID"; HOLD_PID=

step "7. The certificate is a standard X.509-SVID; OpenSSL verifies it against the trust bundle"
show openssl verify -CAfile "$DEMO/admin/bundle.pem" "$DEMO/admin/svid.pem"
openssl x509 -in "$DEMO/admin/svid.pem" -noout -ext subjectAltName | sed 's/^/    /'

step "8. Each live process holds its own key and SVID, destroyed when it exits"
METRICS=$(sed -n 's/.*metrics=\([0-9.:]*\).*/\1/p' "$DEMO/tether.log" | head -1)
svid_metrics() { curl -s "http://$METRICS/metrics" | grep -E '^tether_agent_(process_svids|svids_destroyed_total) ' | sed 's/^/    /'; }
echo "\$ $DEMO/bin/app fetch --watch &      # a long-running workload"
"$DEMO/bin/app" fetch --watch >/dev/null & HOLD_PID=$!
sleep 0.5
show "$TETHER" svids
svid_metrics
echo "\$ kill $HOLD_PID"
kill "$HOLD_PID"; wait "$HOLD_PID" 2>/dev/null || true; HOLD_PID=
sleep 0.3
show "$TETHER" svids
svid_metrics

step "9. Connection-time enforcement: a password-protected Redis on port 7379"
export REDISCLI_AUTH=demo-password   # every process below holds the password
redis-server --port 7379 --bind "127.0.0.1 ::1" --requirepass "$REDISCLI_AUTH" \
  --save "" --appendonly no --dir "$DEMO" >"$DEMO/redis.log" 2>&1 &
REDIS_PID=$!
for _ in $(seq 50); do redis-cli -p 7379 PING 2>/dev/null | grep -q PONG && break; sleep 0.1; done
RC=$(readlink -f "$(command -v redis-cli)")
echo "Only this machine's redis-cli (by sha256, path and uid 0) may use it:"
cat >"$DEMO/redis-cli.yaml" <<EOF
apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata: {name: redis-cli}
spec:
  spiffeId: spiffe://example.org/redis-cli
  selectors: [["process:sha256:$(sha256sum "$RC" | cut -d' ' -f1)", "process:path:$RC", "unix:uid:0"]]
EOF
sed 's/^/    /' "$DEMO/redis-cli.yaml"
show "$TETHER" apply -f "$DEMO/redis-cli.yaml"
sleep 0.3
echo "Processes below run inside the enforced cgroup $CG, with REDISCLI_AUTH set."
echo "The authorized client, started fresh (a connect made before the agent has"
echo "attested it is held for the agent, never refused and never let through blind):"
echo "\$ redis-cli -p 7379 SET report ready; redis-cli -h ::1 -p 7379 GET report"
in_cg "$RC" -p 7379 SET report ready | sed 's/^/    /'
in_cg "$RC" -h ::1 -p 7379 GET report | sed 's/^/    /'
echo "Everything else is refused at connect(), password or not:"
echo "\$ bash -c 'echo AUTH \$REDISCLI_AUTH > /dev/tcp/127.0.0.1/7379'   # a shell"
in_cg /bin/bash -c 'sleep 0.2; echo "AUTH $REDISCLI_AUTH" > /dev/tcp/127.0.0.1/7379' 2>&1 | sed 's/^/    /' || true
echo "\$ bash -c 'echo AUTH \$REDISCLI_AUTH > /dev/tcp/0.0.0.0/7379'     # the same port at another address"
in_cg /bin/bash -c 'sleep 0.2; echo "AUTH $REDISCLI_AUTH" > /dev/tcp/0.0.0.0/7379' 2>&1 | sed 's/^/    /' || true
echo "\$ python3 -c 'socket.create_connection((\"::1\", 7379))'      # another tool, over IPv6"
in_cg python3 -c 'import socket, time
time.sleep(0.2)
try:
    socket.create_connection(("::1", 7379)); print("    connected")
except OSError as e:
    print("    refused:", e)'
install -m 755 "$RC" "$DEMO/bin/redis-cli"
echo "\$ $DEMO/bin/redis-cli -p 7379 GET report   # the same bytes at another path"
in_cg "$DEMO/bin/redis-cli" -p 7379 GET report 2>&1 | sed 's/^/    /' || true
echo "\$ setpriv --reuid=nobody ... redis-cli -p 7379 GET report     # the real one, another user"
in_cg setpriv --reuid=nobody --regid=nogroup --clear-groups "$RC" -p 7379 GET report 2>&1 | sed 's/^/    /' || true
cc -shared -fPIC -o "$DEMO/bin/evil.so" tests/attacks/evil_preload.c
echo "\$ LD_PRELOAD=$DEMO/bin/evil.so redis-cli -p 7379 GET report   # code injected into the real one"
in_cg env LD_PRELOAD="$DEMO/bin/evil.so" "$RC" -p 7379 GET report 2>&1 | sed 's/^/    /' || true
echo "    (the kernel recorded LD_PRELOAD at exec, before the loader ran: no identity)"
echo "Redis accepted only the authorized connections (and this query's):"
redis-cli -p 7379 INFO stats | tr -d '\r' | grep total_connections_received | sed 's/^/    /'

step "10. No ambient secrets: the database password as a file only its client can see"
show "$TETHER" apply -f examples/demo-credentials.yaml
echo "The database client (run as nobody) reads its password from its credential file:"
echo "\$ setpriv --reuid=nobody --regid=nogroup --clear-groups $DEMO/bin/dbclient $RUN/credentials/db-password"
setpriv --reuid=nobody --regid=nogroup --clear-groups "$DEMO/bin/dbclient" "$RUN/credentials/db-password" | sed 's/^/    /'; echo
echo "A shell of the same user sees an empty directory and no such file:"
echo "\$ setpriv --reuid=nobody ... bash -c 'ls -A $RUN/credentials; cat $RUN/credentials/db-password'"
setpriv --reuid=nobody --regid=nogroup --clear-groups bash -c "ls -A '$RUN/credentials'; cat '$RUN/credentials/db-password'" 2>&1 | sed 's/^/    /' || true
echo "Every read and every refusal is audited (never the value):"
"$TETHER" events | python3 -c 'import json,sys
for l in sys.stdin:
    e = json.loads(l)
    if e.get("event") == "credential" and e.get("file") == "db-password":
        print("    {:5} {:7} pid {:<7} {}".format(e["verdict"], e["op"], e["pid"], e.get("exe") or e.get("reason", "")))'

step "11. No password anywhere in the workload: the agent injects it on the wire"
# A second Redis whose password exists only in the manifest below (and so in
# the control plane): no environment, no file the workload can read.
INJ_PW=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
redis-server --port 7380 --bind "127.0.0.1 ::1" --requirepass "$INJ_PW" \
  --save "" --appendonly no --dir "$DEMO" >"$DEMO/redis2.log" 2>&1 &
REDIS2_PID=$!
for _ in $(seq 50); do REDISCLI_AUTH=$INJ_PW redis-cli -p 7380 PING 2>/dev/null | grep -q PONG && break; sleep 0.1; done
cat >"$DEMO/inject.yaml" <<EOF
apiVersion: tether.dev/v1alpha1
kind: Service
metadata: {name: cache}
spec:
  addresses: [{cidr: 127.0.0.1/32, ports: [7380]}, {cidr: "::1/128", ports: [7380]}]
---
apiVersion: tether.dev/v1alpha1
kind: AccessPolicy
metadata: {name: cache-clients}
spec: {services: [cache], identities: [redis-cli]}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialSource
metadata: {name: cache-password}
spec: {static: {value: "$INJ_PW"}}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialBinding
metadata: {name: cache-inject}
spec: {identity: redis-cli, source: cache-password, inject: {service: cache, redis: {}}}
EOF
sed "s/$INJ_PW/<the password>/; s/^/    /" "$DEMO/inject.yaml"
show "$TETHER" apply -f "$DEMO/inject.yaml"
rm -f "$DEMO/inject.yaml"
sleep 0.5
echo "redis-cli with no password (REDISCLI_AUTH unset): the agent authenticates its connection:"
echo "\$ env -u REDISCLI_AUTH redis-cli -p 7380 SET greeting hello; ... GET greeting; ... CLIENT INFO"
in_cg env -u REDISCLI_AUTH "$RC" -p 7380 SET greeting hello | sed 's/^/    /'
in_cg env -u REDISCLI_AUTH "$RC" -h ::1 -p 7380 GET greeting | sed 's/^/    /'
in_cg env -u REDISCLI_AUTH "$RC" -p 7380 CLIENT INFO | grep -o 'user=[^ ]*' | sed 's/^/    /'
echo "Commands that would read the password back or replace it are not relayed:"
echo "\$ env -u REDISCLI_AUTH redis-cli -p 7380 CONFIG GET requirepass"
in_cg env -u REDISCLI_AUTH "$RC" -p 7380 CONFIG GET requirepass 2>&1 | sed 's/^/    /' || true
echo "The same command from a shell (no identity) is refused at connect(); and there"
echo "is no password to steal: it is in no environment and no file of the workload."
echo "\$ bash -c 'exec 3<>/dev/tcp/127.0.0.1/7380; echo PING >&3; head -1 <&3'"
in_cg env -u REDISCLI_AUTH /bin/bash -c 'sleep 0.2; exec 3<>/dev/tcp/127.0.0.1/7380 && echo PING >&3 && head -1 <&3' 2>&1 | sed 's/^/    /' || true
echo "\$ env | grep -c <the password>     # in the client's environment"
in_cg env -u REDISCLI_AUTH /bin/sh -c "env | grep -c '$INJ_PW' || true" | sed 's/^/    /'
echo "Each injected connection is audited (binding, protocol, upstream; never the value):"
"$TETHER" events | python3 -c 'import json,sys
for l in sys.stdin:
    e = json.loads(l)
    if e.get("event") == "inject":
        print("    {:6} pid {:<7} {:30} binding={} protocol={} upstream={}".format(e["verdict"], e["pid"], e.get("spiffeId", ""), e.get("binding"), e.get("protocol"), e.get("upstream", e.get("reason", ""))))'

step "12. Every decision is audited (held ones too); policy check names the rule"
sleep 0.3
echo "\$ tether events"
"$TETHER" events | python3 -c 'import json,sys
for l in sys.stdin:
    e = json.loads(l)
    if "destination" not in e:
        continue
    s = e.get("spiffeId", "")
    who = s if isinstance(s, str) else (",".join(s) or "no identity")
    why = ("  (" + e["reason"] + ")") if e.get("reason") else ""
    print("    {:6} {:9} pid {:<7} {:30} -> {:16} rule={}{}{}".format(e["verdict"], e.get("comm", ""), e.get("pid", ""), who, e["destination"], e["rule"], " (held)" if e.get("held") else "", why))'
show "$TETHER" policy check --identity redis-cli --to 127.0.0.1:7379
curl -s "http://$METRICS/metrics" | grep -E '^tether_agent_(connect_decisions|held_connections)_total' | sed 's/^/    /'

step "Done. Tether log: $DEMO/tether.log, audit log: $DEMO/audit.log"
