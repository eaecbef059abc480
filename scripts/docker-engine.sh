#!/usr/bin/env bash
# Make sure a Docker engine answers, start one when none does, and stop only the engines
# that this script started. Works as root without systemd and never reads standard input.
#
#   scripts/docker-engine.sh ensure                 # the local engine at DOCKER_HOST
#   export "$(scripts/docker-engine.sh ensure --name node-b)"   # a second engine ("node")
#   scripts/docker-engine.sh status [--name node-b]
#   scripts/docker-engine.sh stop   [--name node-b]
#   scripts/docker-engine.sh certs  --tls-dir DIR [--name node-b]     # CA, client, server certs
#   scripts/docker-engine.sh ensure --name node-b --tls-listen 127.0.0.1:2376 --tls-dir DIR
#
# Run with --help for the details.
set -euo pipefail

PROG=${0##*/}
DEFAULT_SOCKET="unix:///var/run/docker.sock"
# dockerd flags for a machine without a bridge: every container uses network_mode="host".
DOCKERD_BASE_ARGS=(--bridge=none --iptables=false --ip-masq=false)

usage() {
    cat <<EOF
Usage: $PROG COMMAND [OPTIONS] [-- EXTRA_DOCKERD_ARGS...]

Commands:
  ensure   If an engine answers at the target address, do nothing. Otherwise install the
           Debian package docker.io when dockerd is missing, start
           "dockerd ${DOCKERD_BASE_ARGS[*]}" in the background and wait until it answers.
  stop     Stop the engine at the target address, but only if this script started it
           (PID in its pidfile); then unmount <exec-root>/netns/default if left mounted.
           Never touches an engine that this script did not start.
  status   Say whether the engine answers, its version and whether this script started it.
           Exit status 0 when it answers, 3 when it does not.
  certs    Make the TLS files for engines reached over TCP (needs openssl), keeping any
           that exist: DIR/ca.pem + DIR/ca-key.pem (the certificate authority; keep the key
           off the nodes), DIR/client/{ca,cert,key}.pem (the NSML server's client
           certificate: point DOCKER_CERT_PATH at DIR/client), and with --name NAME
           DIR/NAME/{ca,server-cert,server-key}.pem (that engine's server certificate,
           valid for the names in --san). Prints nothing on standard output.

The target engine:
  (default)        DOCKER_HOST, or $DEFAULT_SOCKET when unset; the engine keeps
                   dockerd's default data and exec roots. Its log and pidfile live in
                   STATE/dockerd/.
  --name NAME      A second engine on this machine, e.g. one more "node" for tests, with
                   its own roots, socket and pidfile under STATE/NAME/:
                   socket unix://STATE/NAME/docker.sock, data-root STATE/NAME/data,
                   exec-root STATE/NAME/exec, pidfile STATE/NAME/dockerd.pid,
                   log STATE/NAME/dockerd.log. Images must be loaded into each engine.

TCP with TLS (ensure, certs):
  --tls-listen ADDR:PORT
                   Also serve the engine on tcp://ADDR:PORT with --tlsverify: only clients
                   with a certificate signed by DIR/ca.pem get in (ADDR defaults to
                   127.0.0.1 when only a port is given; 0.0.0.0 serves every interface).
                   Uses DIR/NAME/{ca,server-cert,server-key}.pem, made first (see certs)
                   only when one of them is missing.
  --tls-dir DIR    Folder of the TLS files (see certs). Needed with --tls-listen.
  --san LIST       Names the server certificate is valid for, openssl subjectAltName
                   syntax (default IP:127.0.0.1,DNS:localhost,DNS:NAME). Add the address the
                   NSML server dials, e.g. IP:10.0.0.5 or DNS:node-b.example.org.
  --days N         Validity of new certificates in days (default 825).

Options:
  --state-dir DIR  STATE, default \${NSML_STATE_DIR:-/var/lib/jupyter-nsml}.
  --timeout SEC    How long ensure waits for a new engine to answer, and how long stop
                   waits after SIGTERM before SIGKILL (default 30).
  -h, --help       This help.

Arguments after "--" are appended to the dockerd command line (ensure only).

Standard output carries exactly one line, DOCKER_HOST=<address> (ensure and status), so
that 'export "\$($PROG ensure --name node-b)"' points a shell at that engine. Messages go
to standard error.
EOF
}

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# --- arguments -------------------------------------------------------------------------

COMMAND=""
NAME=""
STATE_DIR=${NSML_STATE_DIR:-/var/lib/jupyter-nsml}
TIMEOUT=30
EXTRA_ARGS=()
TLS_LISTEN=""
TLS_DIR=""
SAN=""
DAYS=825

parse_args() {
    while (($#)); do
        case $1 in
            -h | --help)
                usage
                exit 0
                ;;
            --name)
                (($# >= 2)) || die "--name needs a value"
                NAME=$2
                shift 2
                ;;
            --name=*)
                NAME=${1#*=}
                shift
                ;;
            --state-dir)
                (($# >= 2)) || die "--state-dir needs a value"
                STATE_DIR=$2
                shift 2
                ;;
            --state-dir=*)
                STATE_DIR=${1#*=}
                shift
                ;;
            --timeout)
                (($# >= 2)) || die "--timeout needs a value"
                TIMEOUT=$2
                shift 2
                ;;
            --timeout=*)
                TIMEOUT=${1#*=}
                shift
                ;;
            --tls-listen | --tls-dir | --san | --days)
                (($# >= 2)) || die "$1 needs a value"
                set_option "$1" "$2"
                shift 2
                ;;
            --tls-listen=* | --tls-dir=* | --san=* | --days=*)
                set_option "${1%%=*}" "${1#*=}"
                shift
                ;;
            --)
                shift
                EXTRA_ARGS=("$@")
                break
                ;;
            ensure | stop | status | certs)
                [[ -z $COMMAND ]] || die "only one command, got '$COMMAND' and '$1'"
                COMMAND=$1
                shift
                ;;
            *)
                die "unknown argument '$1' (valid commands: ensure, stop, status, certs; see --help)"
                ;;
        esac
    done
    [[ -n $COMMAND ]] || die "no command given (valid commands: ensure, stop, status, certs; see --help)"
    [[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a whole number of seconds > 0, got '$TIMEOUT'"
    if [[ -n $NAME ]]; then
        [[ $NAME =~ ^[a-z0-9][a-z0-9_.-]{0,30}$ ]] ||
            die "--name must match [a-z0-9][a-z0-9_.-]{0,30}, got '$NAME'"
        [[ $NAME != dockerd ]] || die "--name 'dockerd' is reserved for the default engine"
    fi
    [[ $STATE_DIR == /* ]] || STATE_DIR="$PWD/$STATE_DIR"
    STATE_DIR=${STATE_DIR%/}
    if [[ -n $TLS_DIR ]]; then
        [[ $TLS_DIR == /* ]] || TLS_DIR="$PWD/$TLS_DIR"
        TLS_DIR=${TLS_DIR%/}
    fi
    [[ $DAYS =~ ^[1-9][0-9]*$ ]] || die "--days must be a whole number > 0, got '$DAYS'"
    if [[ $COMMAND == certs ]]; then
        [[ -n $TLS_DIR ]] || die "certs needs --tls-dir DIR"
        [[ -z $TLS_LISTEN ]] || die "--tls-listen is only valid with ensure"
    elif [[ -n $TLS_LISTEN ]]; then
        [[ $COMMAND == ensure ]] || die "--tls-listen is only valid with ensure"
        [[ -n $NAME ]] || die "--tls-listen needs --name (the default engine keeps its own settings)"
        [[ -n $TLS_DIR ]] || die "--tls-listen needs --tls-dir DIR (see certs)"
        [[ $TLS_LISTEN == *:* ]] || TLS_LISTEN="127.0.0.1:$TLS_LISTEN"
        [[ ${TLS_LISTEN##*:} =~ ^[1-9][0-9]{0,4}$ ]] ||
            die "--tls-listen must be [ADDR:]PORT with a port number, got '$TLS_LISTEN'"
    elif [[ -n $TLS_DIR || -n $SAN ]]; then
        die "--tls-dir and --san are only valid with certs or with ensure --tls-listen"
    fi
    if ((${#EXTRA_ARGS[@]})) && [[ $COMMAND != ensure ]]; then
        die "extra dockerd arguments are only valid with ensure"
    fi
}

set_option() {
    case $1 in
        --tls-listen) TLS_LISTEN=$2 ;;
        --tls-dir) TLS_DIR=$2 ;;
        --san) SAN=$2 ;;
        --days) DAYS=$2 ;;
    esac
}

# --- the target engine -------------------------------------------------------------------

# Sets HOST (the DOCKER_HOST address), ENGINE_DIR (log and pidfile), EXEC_ROOT, PIDFILE,
# LOGFILE and DOCKERD_ARGS (the roots and socket for dockerd).
resolve_target() {
    if [[ -n $NAME ]]; then
        ENGINE_DIR="$STATE_DIR/$NAME"
        HOST="unix://$ENGINE_DIR/docker.sock"
        EXEC_ROOT="$ENGINE_DIR/exec"
        DOCKERD_ARGS=(
            --host "$HOST"
            --data-root "$ENGINE_DIR/data"
            --exec-root "$EXEC_ROOT"
        )
    else
        ENGINE_DIR="$STATE_DIR/dockerd"
        HOST=${DOCKER_HOST:-$DEFAULT_SOCKET}
        EXEC_ROOT=/var/run/docker
        DOCKERD_ARGS=(--host "$HOST")
    fi
    PIDFILE="$ENGINE_DIR/dockerd.pid"
    LOGFILE="$ENGINE_DIR/dockerd.log"
    DOCKERD_ARGS+=(--pidfile "$PIDFILE")
}

# Succeeds when an engine answers at HOST within PROBE_TIMEOUT seconds; prints its version.
PROBE_TIMEOUT=5
engine_version() {
    if command -v docker >/dev/null 2>&1; then
        DOCKER_HOST=$HOST timeout "$PROBE_TIMEOUT" docker version --format '{{.Server.Version}}' \
            </dev/null 2>/dev/null
    elif [[ $HOST == unix://* ]] && command -v curl >/dev/null 2>&1; then
        local reply
        reply=$(timeout "$PROBE_TIMEOUT" curl -sf --unix-socket "${HOST#unix://}" http://engine/version \
            </dev/null 2>/dev/null) || return 1
        # Pull "Version" out of the JSON reply without needing jq.
        sed -n 's/^{.*"Version":"\([^"]*\)".*/\1/p' <<<"$reply" | head -n 1
        [[ -n $reply ]]
    else
        return 1
    fi
}

# Prints the PID from our pidfile if that process is alive and is a dockerd.
our_pid() {
    [[ -s $PIDFILE ]] || return 1
    local pid
    pid=$(tr -dc '0-9' <"$PIDFILE")
    [[ -n $pid ]] || return 1
    [[ -r /proc/$pid/comm ]] || return 1
    [[ $(cat "/proc/$pid/comm") == dockerd ]] || return 1
    printf '%s\n' "$pid"
}

print_host() { printf 'DOCKER_HOST=%s\n' "$HOST"; }

log_tail() {
    if [[ -s $LOGFILE ]]; then
        log "last lines of $LOGFILE:"
        tail -n 30 "$LOGFILE" | sed 's/^/    /' >&2
    else
        log "$LOGFILE is empty"
    fi
}

# --- certs -------------------------------------------------------------------------------

need_openssl() {
    command -v openssl >/dev/null 2>&1 ||
        die "openssl is missing (apt-get install openssl; scripts/setup-env.sh --test installs it)"
}

# $1: key file to make (EC P-256, private to its owner).
make_key() {
    (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" \
        2>/dev/null) || die "openssl could not make a key at $1"
}

# $1: certificate, $2: key, $3: subject CN, $4: extension lines (signed by the CA in TLS_DIR).
sign_cert() {
    local csr ext
    csr=$(mktemp) ext=$(mktemp)
    printf '%s\n' "$4" >"$ext"
    if ! openssl req -new -key "$2" -subj "/CN=$3" -out "$csr" 2>/dev/null ||
        ! openssl x509 -req -in "$csr" -CA "$TLS_DIR/ca.pem" -CAkey "$TLS_DIR/ca-key.pem" \
            -CAcreateserial -days "$DAYS" -sha256 -extfile "$ext" -out "$1" 2>/dev/null; then
        rm -f "$csr" "$ext" "$1"
        die "openssl could not sign $1"
    fi
    rm -f "$csr" "$ext"
}

# The CA and the client certificate (once), and NAME's server certificate when NAME is set.
make_certs() {
    need_openssl
    mkdir -p "$TLS_DIR"
    chmod 700 "$TLS_DIR"
    if [[ ! -s $TLS_DIR/ca.pem || ! -s $TLS_DIR/ca-key.pem ]]; then
        log "making the certificate authority $TLS_DIR/ca.pem"
        make_key "$TLS_DIR/ca-key.pem"
        openssl req -new -x509 -key "$TLS_DIR/ca-key.pem" -subj "/CN=jupyter-nsml engines CA" \
            -days "$DAYS" -sha256 -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$TLS_DIR/ca.pem" 2>/dev/null ||
            die "openssl could not make $TLS_DIR/ca.pem"
    fi
    local client=$TLS_DIR/client
    if [[ ! -s $client/cert.pem || ! -s $client/key.pem ]]; then
        log "making the client certificate $client/cert.pem (DOCKER_CERT_PATH=$client)"
        mkdir -p "$client"
        make_key "$client/key.pem"
        sign_cert "$client/cert.pem" "$client/key.pem" "nsml-server" \
            "extendedKeyUsage=clientAuth"
    fi
    cp "$TLS_DIR/ca.pem" "$client/ca.pem"
    [[ -n $NAME ]] || return 0
    local dir=$TLS_DIR/$NAME
    if [[ ! -s $dir/server-cert.pem || ! -s $dir/server-key.pem ]]; then
        local san=${SAN:-IP:127.0.0.1,DNS:localhost,DNS:$NAME}
        log "making the server certificate $dir/server-cert.pem ($san)"
        mkdir -p "$dir"
        make_key "$dir/server-key.pem"
        sign_cert "$dir/server-cert.pem" "$dir/server-key.pem" "$NAME" \
            "subjectAltName=$san
extendedKeyUsage=serverAuth"
    fi
    cp "$TLS_DIR/ca.pem" "$dir/ca.pem"
}

cmd_certs() { make_certs; }

# --- ensure ------------------------------------------------------------------------------

install_dockerd() {
    command -v apt-get >/dev/null 2>&1 ||
        die "dockerd is missing and apt-get is not available; install the Docker engine by hand"
    log "dockerd is missing; installing the Debian package docker.io"
    apt-get update </dev/null >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker.io \
        </dev/null >&2 || die "apt-get install docker.io failed"
    command -v dockerd >/dev/null 2>&1 || die "docker.io is installed but dockerd is not on PATH"
}

cmd_ensure() {
    local version pid
    if version=$(engine_version); then
        if pid=$(our_pid); then
            log "engine $version answers at $HOST (started by this script, pid $pid)"
        else
            log "engine $version already answers at $HOST; nothing to do"
        fi
        print_host
        return 0
    fi
    [[ $HOST == unix://* ]] ||
        die "no engine answers at $HOST and this script starts engines only on local unix sockets"
    [[ $(id -u) == 0 ]] || die "no engine answers at $HOST; starting one needs root"

    if pid=$(our_pid); then
        log "dockerd (pid $pid) started earlier by this script does not answer yet; waiting"
    else
        if [[ -z $NAME && -s /var/run/docker.pid ]]; then
            local other
            other=$(tr -dc '0-9' </var/run/docker.pid)
            if [[ -n $other && -r /proc/$other/comm && $(cat "/proc/$other/comm") == dockerd ]]; then
                die "a dockerd (pid $other, not started by this script) owns the default roots" \
                    "but does not answer at $HOST; fix or stop it by hand"
            fi
        fi
        command -v dockerd >/dev/null 2>&1 || install_dockerd
        if [[ -n $TLS_LISTEN ]]; then
            # A node keeps only its own server certificate (made elsewhere, where the CA key
            # lives); make one here only when it is missing.
            [[ -s $TLS_DIR/$NAME/ca.pem && -s $TLS_DIR/$NAME/server-cert.pem &&
                -s $TLS_DIR/$NAME/server-key.pem ]] || make_certs
            DOCKERD_ARGS+=(
                --host "tcp://$TLS_LISTEN"
                --tlsverify
                --tlscacert "$TLS_DIR/$NAME/ca.pem"
                --tlscert "$TLS_DIR/$NAME/server-cert.pem"
                --tlskey "$TLS_DIR/$NAME/server-key.pem"
            )
        fi
        command -v docker >/dev/null 2>&1 || command -v curl >/dev/null 2>&1 ||
            die "neither the docker client nor curl is available to check the engine"
        mkdir -p "$ENGINE_DIR"
        rm -f "$PIDFILE"
        log "starting dockerd for $HOST (log: $LOGFILE)"
        {
            printf '\n=== %s: %s dockerd %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$PROG" \
                "${DOCKERD_BASE_ARGS[*]} ${DOCKERD_ARGS[*]} ${EXTRA_ARGS[*]}"
        } >>"$LOGFILE"
        setsid dockerd "${DOCKERD_BASE_ARGS[@]}" "${DOCKERD_ARGS[@]}" "${EXTRA_ARGS[@]}" \
            </dev/null >>"$LOGFILE" 2>&1 &
        pid=$!
        disown "$pid"
    fi

    local deadline=$((SECONDS + TIMEOUT))
    local started=$pid remaining
    while
        remaining=$((deadline - SECONDS))
        PROBE_TIMEOUT=$((remaining < 1 ? 1 : remaining < 5 ? remaining : 5))
        ! version=$(engine_version)
    do
        # dockerd writes its pidfile once it is up; trust it over $! (setsid may fork).
        pid=$(our_pid) || pid=$started
        if [[ ! -d /proc/$pid ]]; then
            log_tail
            die "dockerd (pid $pid) exited before it answered at $HOST"
        fi
        if ((SECONDS >= deadline)); then
            log_tail
            log "dockerd (pid $pid) did not answer at $HOST within ${TIMEOUT}s; stopping it"
            stop_pid "$pid"
            unmount_leftovers
            rm -f "$PIDFILE"
            die "no engine answers at $HOST (see $LOGFILE)"
        fi
        sleep 0.2
    done
    log "engine $version answers at $HOST${TLS_LISTEN:+ and tcp://$TLS_LISTEN (TLS)} (dockerd pid $pid, log $LOGFILE)"
    print_host
}

# --- stop --------------------------------------------------------------------------------

stop_pid() {
    local pid=$1 deadline=$((SECONDS + TIMEOUT))
    kill -TERM "$pid" 2>/dev/null || return 0
    while [[ -d /proc/$pid ]]; do
        if ((SECONDS >= deadline)); then
            log "dockerd (pid $pid) still runs ${TIMEOUT}s after SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.2
    done
}

# Mount points under $1, deepest first (paths with spaces are not expected here).
mounts_under() {
    local top
    top=$(readlink -m "$1")
    awk -v top="$top" '$5 == top || index($5, top "/") == 1 { print $5 }' /proc/self/mountinfo |
        awk '{ print length($0) "\t" $0 }' | sort -rn | cut -f2-
}

# After dockerd exits: its network namespace mount, and for a named engine whatever it left
# mounted under its own folder (the data root, when it was killed). The default engine's
# data root is left alone: it may be a mount of its own.
unmount_leftovers() {
    local targets=() target
    mapfile -t targets < <(mounts_under "$EXEC_ROOT/netns")
    if [[ -n $NAME ]]; then
        mapfile -t -O "${#targets[@]}" targets < <(mounts_under "$ENGINE_DIR")
    fi
    for target in "${targets[@]}"; do
        [[ -n $target ]] || continue
        grep -qF " $target " /proc/self/mountinfo || continue
        log "unmounting $target"
        umount "$target" 2>/dev/null || umount -l "$target" || log "warning: could not unmount $target"
    done
}

cmd_stop() {
    local pid
    if ! pid=$(our_pid); then
        rm -f "$PIDFILE"
        if engine_version >/dev/null; then
            log "the engine at $HOST was not started by this script; leaving it alone"
        else
            log "no engine started by this script runs for $HOST"
        fi
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "stopping dockerd (pid $pid) needs root"
    log "stopping dockerd (pid $pid) at $HOST"
    stop_pid "$pid"
    unmount_leftovers
    rm -f "$PIDFILE"
    log "stopped"
}

# --- status ------------------------------------------------------------------------------

cmd_status() {
    local version pid rc=0
    if version=$(engine_version); then
        if pid=$(our_pid); then
            log "engine $version answers at $HOST (started by this script, pid $pid, log $LOGFILE)"
        else
            log "engine $version answers at $HOST (not started by this script)"
        fi
    else
        if pid=$(our_pid); then
            log "dockerd (pid $pid) started by this script runs but does not answer at $HOST"
        else
            log "no engine answers at $HOST"
        fi
        rc=3
    fi
    print_host
    return "$rc"
}

main() {
    parse_args "$@"
    resolve_target
    case $COMMAND in
        ensure) cmd_ensure ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        certs) cmd_certs ;;
    esac
}

main "$@"
