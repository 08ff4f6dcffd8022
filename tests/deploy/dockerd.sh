#!/usr/bin/env bash
# Start a Docker engine for the Docker tests when none answers, and stop only the one we started.
#   tests/deploy/dockerd.sh start   # prints "dockerd: already running" or starts one
#   tests/deploy/dockerd.sh stop    # stops the engine `start` started, if any
# The engine is Debian's docker.io (`make test` installs it); its pid is kept in $PIDFILE so
# that `stop` never touches an engine someone else runs.
set -euo pipefail
PIDFILE=${CNNSERVE_DOCKERD_PIDFILE:-/run/cnnserve-dockerd.pid}
LOG=${CNNSERVE_DOCKERD_LOG:-/var/log/cnnserve-dockerd.log}
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)

answers() { timeout 10 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

case "${1:-}" in
  start)
    if answers; then
      echo "dockerd: already running"
      exit 0
    fi
    command -v dockerd >/dev/null || { echo "dockerd: not installed (apt-get install docker.io)" >&2; exit 1; }
    echo "dockerd: starting one (log in $LOG)"
    $SUDO bash -c "setsid dockerd >>'$LOG' 2>&1 < /dev/null & echo \$! > '$PIDFILE'"
    for _ in $(seq 120); do
      answers && { echo "dockerd: up (pid $(cat "$PIDFILE"))"; exit 0; }
      sleep 0.5
    done
    echo "dockerd: did not answer within 60 s; the end of $LOG:" >&2
    tail -n 20 "$LOG" >&2 || true
    exit 1
    ;;
  stop)
    [ -f "$PIDFILE" ] || exit 0
    pid=$(cat "$PIDFILE")
    if [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = dockerd ]; then
      echo "dockerd: stopping the engine these tests started (pid $pid)"
      $SUDO kill -TERM "$pid"
      for _ in $(seq 60); do [ -d /proc/"$pid" ] || break; sleep 0.5; done
    fi
    $SUDO rm -f "$PIDFILE"
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
