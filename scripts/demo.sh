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

cleanup() {
  [ -n "${UP_PID:-}" ] && kill "$UP_PID" 2>/dev/null && wait "$UP_PID" 2>/dev/null || true
  [ -n "${HOLD_PID:-}" ] && kill "$HOLD_PID" 2>/dev/null || true
}
trap cleanup EXIT

rm -rf "$DEMO"; mkdir -p "$DEMO/bin" "$RUN"; chmod 755 "$DEMO" "$DEMO/bin" "$RUN"
# The "workload": a copy of the tether binary, used only for its `fetch`
# command (a plain SPIFFE Workload API client).
install -m 755 "$TETHER" "$DEMO/bin/app"
install -m 755 "$TETHER" "$DEMO/bin/intruder"

step "1. Start Tether on this machine: server (CA, registry) + node agent, one process"
echo "\$ tether up --data-dir $DEMO/data --run-dir $RUN &"
"$TETHER" up --log-format text --data-dir "$DEMO/data" --run-dir "$RUN" \
  --listen 127.0.0.1:0 --metrics 127.0.0.1:0 >"$DEMO/tether.log" 2>&1 &
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

step "Done. Tether log: $DEMO/tether.log"
