#!/bin/bash
# Container entry point: prepare the jail, then run the helper and/or Apache in the foreground.
#
#   chrootwsgi-entrypoint [all|apache|helper]     (default all: both in this container)
#
# TERM or INT stops both cleanly: Apache stops its mod_wsgi daemons, the helper closes its
# sockets, and the exit status is 0.  If either exits on its own, the other is stopped and the
# container exits with the first one's status, so the runtime's restart policy takes over.
set -euo pipefail

role=${1:-all}
config=${CHROOTWSGI_CONFIG:-/etc/chrootwsgi/demo.toml}
helper_config=${CHROOT_HELPER_CONFIG:-/etc/chroot-helper.toml}
pids=()
stopping=0

log() { echo "chrootwsgi-entrypoint: $*" >&2; }

prepare_jail() {
    chrootwsgi jail init --config "$config" >&2
    chrootwsgi check-config "$config" >&2
}

start_helper() {
    # exec, mail and DNS; its sockets in /run/chroot-helper, which the jail shows as /run.
    log "starting chroot-helper (exec, mail, DNS)"
    mkdir -p /run/chroot-helper
    /opt/chrootwsgi/bin/chroot-helper serve --config "$helper_config" &
    pids+=("$!")
}

start_apache() {
    set +u  # Debian's envvars reads variables that may be unset
    # shellcheck disable=SC1091
    . /etc/apache2/envvars
    set -u
    mkdir -p "$APACHE_RUN_DIR" "$APACHE_LOCK_DIR" "$APACHE_LOG_DIR"
    rm -f "$APACHE_PID_FILE"
    apache2 -DFOREGROUND &
    pids+=("$!")
}

stop_all() {
    stopping=1
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
}

trap 'log "stopping"; stop_all' TERM INT

case "$role" in
    all) prepare_jail; start_helper; start_apache ;;
    apache) prepare_jail; start_apache ;;
    helper) start_helper ;;
    *) echo "usage: chrootwsgi-entrypoint [all|apache|helper]" >&2; exit 2 ;;
esac

set +e
wait -n "${pids[@]}"
status=$?
if [ "$stopping" = 1 ]; then
    status=0  # wait -n was interrupted by the trapped signal
else
    log "a server exited with status $status; stopping the rest"
    stop_all
fi
for pid in "${pids[@]}"; do
    wait "$pid"
    code=$?
    # 143: ended by the TERM sent here, which is a clean stop as well.
    if [ "$status" = 0 ] && [ "$code" != 0 ] && [ "$code" != 143 ]; then
        status=$code
    fi
done
log "stopped (status $status)"
exit "$status"
