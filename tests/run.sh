#!/usr/bin/env bash
# The test command: lint, type check, proto checks, then unit → integration → e2e, each
# tier timed. Makes sure a Redis server answers: uses $FEATURESTEER_TEST_REDIS_URL when it
# pings, else starts redis-server on a free port for the run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
BUF=.tools/node_modules/.bin/buf
status=0
declare -a summary

step() {  # step NAME CMD...: run, time, remember the result
  local name=$1; shift
  local t0=$SECONDS
  echo "==> $name"
  "$@"
  local rc=$?
  summary+=("$(printf '%-14s %5ss  %s' "$name" $((SECONDS - t0)) "$([ $rc = 0 ] && echo ok || echo "FAILED (exit $rc)")")")
  [ $rc = 0 ] || status=1
}

tier() {  # pytest exit 5 (no tests collected) counts as a failure: every tier has tests
  "$PY" -m pytest -m "$1 and not slow" -p no:cacheprovider -q "${@:2}"
}

# -- Redis for the cache tests
redis_pid=""
if [ -z "${FEATURESTEER_TEST_REDIS_URL:-}" ] || ! redis-cli -u "$FEATURESTEER_TEST_REDIS_URL" ping >/dev/null 2>&1; then
  port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize no >/tmp/featuresteer-test-redis.log 2>&1 &
  redis_pid=$!
  export FEATURESTEER_TEST_REDIS_URL="redis://127.0.0.1:$port/0"
  for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
trap '[ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null' EXIT
echo "redis: $FEATURESTEER_TEST_REDIS_URL"

mapfile -t src < <(ls -d service clients/python tests benchmarks dictionaries 2>/dev/null)
step "ruff" .venv/bin/ruff check "${src[@]}"
step "ruff format" .venv/bin/ruff format --check "${src[@]}"
step "mypy" .venv/bin/mypy service/featuresteer_server clients/python/featuresteer
step "buf lint" "$BUF" lint proto
if git cat-file -e main:proto/featuresteer/v1/featuresteer.proto 2>/dev/null; then
  step "buf breaking" "$BUF" breaking proto --against '.git#branch=main,subdir=proto'
else
  echo "buf breaking: main has no proto yet, nothing to compare"
fi
step "unit" tier unit
step "integration" tier integration
step "e2e" tier e2e

echo
echo "== summary"
printf '%s\n' "${summary[@]}"
exit $status
