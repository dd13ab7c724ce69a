#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for tests and development (never for production data).
#
#   bash scripts/pg-throwaway.sh start [DIR] [PORT]   # create (if needed) + start, print the URL
#   bash scripts/pg-throwaway.sh stop  [DIR]          # stop it (the files stay; rm -rf DIR to forget it)
#   bash scripts/pg-throwaway.sh url   [DIR]          # print the URL of a cluster started earlier
#
# DIR defaults to $PG_THROWAWAY_DIR or /tmp/tdcomfy-pg; PORT defaults to 55432, and `auto` picks
# the first free loopback port from 55432 up (retrying if a parallel run takes it first). The URL is
# postgres://postgres@127.0.0.1:PORT/postgres (superuser `postgres`, no password: trust auth,
# loopback only). `start` on a cluster that is already running just prints its URL, so it is safe
# to call twice; `start` on a stopped one restarts it on the port it was created with.
#
# Layout inside DIR: data/ (the cluster), sock/ (its unix socket, so it never collides with a
# system PostgreSQL in /var/run/postgresql), port (the port it runs on), server.log.
# Runs as root (the server then runs as the `postgres` OS user) or as any ordinary user.
set -euo pipefail

usage() {
  echo "usage: $0 start [DIR] [PORT|auto] | stop [DIR] | url [DIR]" >&2
  exit 2
}

cmd="${1:-}"
[[ -n "$cmd" ]] || usage
DIR="${2:-${PG_THROWAWAY_DIR:-/tmp/tdcomfy-pg}}"
# Absolute, since the server-side commands run from / (the postgres user may not enter our cwd).
DIR="$(realpath -m -- "$DIR")"
PORT_ARG="${3:-55432}"

# Debian's server binaries. /usr/local/bin may hold shims named initdb/pg_ctl/postgres that are
# not a real PostgreSQL, so PATH is never consulted for them.
find_bindir() {
  if [[ -n "${PG_BINDIR:-}" ]]; then
    echo "$PG_BINDIR"
    return
  fi
  local d
  if command -v pg_config >/dev/null 2>&1; then
    d="$(pg_config --bindir 2>/dev/null || true)"
    if [[ -n "$d" && "$d" != /usr/local/* && -x "$d/initdb" && -x "$d/postgres" ]]; then
      echo "$d"
      return
    fi
  fi
  # Highest installed major version wins.
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  if [[ -n "$d" && -x "$d/initdb" ]]; then
    echo "$d"
    return
  fi
  echo "pg-throwaway: no PostgreSQL server binaries found (apt-get install postgresql, or set PG_BINDIR)" >&2
  exit 1
}

# initdb and postgres refuse to run as root, so as root every server-side command runs as the
# `postgres` OS user (created by Debian's postgresql package) and DIR is handed to that user.
as_pg() {
  if [[ "$(id -u)" == 0 ]]; then
    if ! id postgres >/dev/null 2>&1; then
      echo "pg-throwaway: running as root needs the postgres OS user (Debian's postgresql package creates it)" >&2
      exit 1
    fi
    (cd / && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

port_in_use() {
  # A successful connect means something is listening there already.
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

url_for() {
  echo "postgres://postgres@127.0.0.1:$1/postgres"
}

is_running() {
  [[ -f "$DIR/data/postmaster.pid" ]] && as_pg "$BIN/pg_ctl" status -D "$DIR/data" >/dev/null 2>&1
}

wait_ready() {
  local port="$1" i
  for i in $(seq 1 60); do
    if "$BIN/pg_isready" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres; then
      return 0
    fi
    sleep 0.5
  done
  echo "pg-throwaway: PostgreSQL on 127.0.0.1:$port did not become ready; see $DIR/server.log" >&2
  tail -n 20 "$DIR/server.log" >&2 || true
  exit 1
}

next_free_port() {
  local p="$1"
  while port_in_use "$p"; do
    p=$((p + 1))
    if ((p > 55532)); then
      echo "pg-throwaway: no free port in 55432..55532" >&2
      exit 1
    fi
  done
  echo "$p"
}

start() {
  local port auto=0
  if [[ -f "$DIR/port" ]]; then
    port="$(cat "$DIR/port")"
    if [[ "$PORT_ARG" != auto && -n "${3:-}" && "$PORT_ARG" != "$port" ]]; then
      echo "pg-throwaway: $DIR was created for port $port, not $PORT_ARG (stop it and rm -rf $DIR to change)" >&2
      exit 1
    fi
    if is_running; then
      wait_ready "$port"
      url_for "$port"
      return
    fi
  elif [[ "$PORT_ARG" == auto ]]; then
    auto=1
    port="$(next_free_port 55432)"
  else
    port="$PORT_ARG"
  fi

  if [[ ! -f "$DIR/data/PG_VERSION" ]]; then
    mkdir -p "$DIR/data" "$DIR/sock"
    touch "$DIR/server.log"
    if [[ "$(id -u)" == 0 ]]; then
      chown -R postgres: "$DIR"
    fi
    chmod 700 "$DIR/data"
    # Every parent of DIR must be searchable by the server's user (mktemp -d makes a 0700 one).
    if ! as_pg test -w "$DIR/data"; then
      echo "pg-throwaway: the postgres user cannot reach $DIR/data; make its parent directories searchable (chmod o+x)" >&2
      exit 1
    fi
    # -U postgres: the superuser is `postgres` whichever OS user runs this, so the URL is the same
    # everywhere. Trust auth is only acceptable because the server listens on loopback alone.
    as_pg "$BIN/initdb" -D "$DIR/data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >"$DIR/initdb.log" 2>&1 || {
      cat "$DIR/initdb.log" >&2
      # Leave no half-made cluster behind: initdb refuses a non-empty directory next time.
      rm -rf "$DIR/data"
      exit 1
    }
    # fsync/synchronous_commit/full_page_writes off: the fault tests SIGKILL brokers and workers,
    # never PostgreSQL or the machine, and a transaction committed by a killed broker is still
    # visible to the surviving PostgreSQL server (it lives in its shared buffers / the OS page
    # cache). Disk durability across an OS crash is not under test here, and skipping fsync keeps
    # the many small commits of the test suite from queueing on a shared CI disk. Never copy
    # these three lines to a real deployment.
    # The port is not in this file but passed at start (-p), so a lost race for it can retry.
    cat >>"$DIR/data/postgresql.conf" <<EOF

# --- added by scripts/pg-throwaway.sh (throwaway test cluster) ---
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR/sock'
# Three brokers with their own pools plus the tests' own connections.
max_connections = 300
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
  fi

  local attempt
  for attempt in 1 2 3 4 5 6 7 8 9 10; do
    if port_in_use "$port"; then
      if ((auto)); then
        port="$(next_free_port "$port")"
      else
        echo "pg-throwaway: 127.0.0.1:$port is already taken by another process; pick another port" >&2
        exit 1
      fi
    fi
    echo "$port" >"$DIR/port"
    if as_pg "$BIN/pg_ctl" start -w -t 60 -D "$DIR/data" -l "$DIR/server.log" -o "-p $port" >/dev/null 2>&1; then
      wait_ready "$port"
      url_for "$port"
      return
    fi
    # Two runs started at once can both see the same port free; the loser moves on to the next.
    if ((auto)) && port_in_use "$port"; then
      continue
    fi
    break
  done
  echo "pg-throwaway: pg_ctl start failed (attempt $attempt); last lines of $DIR/server.log:" >&2
  tail -n 20 "$DIR/server.log" >&2 || true
  exit 1
}

stop() {
  if is_running; then
    as_pg "$BIN/pg_ctl" stop -w -t 60 -m fast -D "$DIR/data" >/dev/null
  fi
}

url() {
  if [[ ! -f "$DIR/port" ]] || ! is_running; then
    echo "pg-throwaway: no running cluster in $DIR (run: $0 start $DIR)" >&2
    exit 1
  fi
  url_for "$(cat "$DIR/port")"
}

BIN="$(find_bindir)"
case "$cmd" in
  start) start "$@" ;;
  stop) stop ;;
  url) url ;;
  *) usage ;;
esac
