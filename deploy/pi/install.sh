#!/bin/sh
# Install or upgrade the CWSNet agent as a systemd service: on a Raspberry Pi (Raspberry Pi OS
# Bookworm or later: Python 3.11) or any Debian-like machine with systemd. Run as root on the
# device, from a folder holding what `cwsnet flash pi` copies there (see docs/devices.md):
#
#   cwsnet-VERSION-py3-none-any.whl   the agent (pip installs its dependencies from PyPI)
#   bundle.json                       the device's provisioning bundle (secret: installed 0600)
#   agent.yaml                        its config (identity_file /etc/cwsnet-agent/bundle.json, ...)
#   ca.crt                            the CWSNet CA that issued the site broker's certificate
#   cwsnet-agent.service              the systemd unit
#
#   sudo sh install.sh                 install, enable and (re)start cwsnet-agent.service
#   sh install.sh --dry-run            print every step, change nothing
#   sh install.sh --root /tmp/x        install under /tmp/x (no root needed; no user, no systemctl)
#
# Running it again upgrades: the venv is reused, the wheel reinstalled, config, bundle and unit
# replaced; /var/lib/cwsnet-agent (the outbox: data not yet acknowledged) is never touched.
set -eu

PROG=install.sh
HERE=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)

ROOT=""
PREFIX=/opt/cwsnet
SVC_USER=cwsnet
PYTHON=python3
PIP_ARGS=""
DRY_RUN=0
START=1
WHEEL=""
BUNDLE=$HERE/bundle.json
CONFIG=$HERE/agent.yaml
CA=$HERE/ca.crt
UNIT=$HERE/cwsnet-agent.service

# fixed by the unit (StateDirectory=, ConfigurationDirectory=) and by the config flash renders
UNIT_NAME=cwsnet-agent.service
CONF_DIR=/etc/cwsnet-agent
STATE_DIR=/var/lib/cwsnet-agent
UNIT_DIR=/etc/systemd/system

usage() {
    cat <<EOF
usage: $PROG [options]

Install or upgrade the CWSNet agent as the systemd service $UNIT_NAME (run as root).

  --wheel FILE     the cwsnet wheel (default: the one cwsnet-*.whl next to this script)
  --bundle FILE    provisioning bundle (default: $HERE/bundle.json); installed 0600
  --config FILE    agent config (default: $HERE/agent.yaml)
  --ca FILE        the CWSNet CA certificate (default: $HERE/ca.crt)
  --unit FILE      the systemd unit (default: $HERE/cwsnet-agent.service)
  --prefix DIR     where the venv goes (default: /opt/cwsnet; the venv is DIR/venv)
  --user NAME      the service's system user (default: cwsnet)
  --python PY      the Python 3.11+ that makes the venv (default: python3)
  --pip-args ARGS  more pip install options, e.g. "--no-index --find-links /media/wheels"
  --root DIR       install under DIR instead of / (for tests): no user is created, files keep
                   the caller as owner, the unit is enabled with systemctl --root, nothing starts
  --no-start       enable the service but do not (re)start it
  --dry-run        print every step and change nothing
  -h, --help       this text
EOF
}

die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 2
}

say() {
    printf '%s\n' "$*"
}

# one shell word, quoted when needed, so a printed step can be pasted back into a shell
quote() {
    case $1 in
        '' | *[!A-Za-z0-9_./:=@%+,-]*)
            printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")" ;;
        *) printf '%s' "$1" ;;
    esac
}

# print a step as "+ command", then run it (unless --dry-run)
run() {
    line=""
    for word in "$@"; do
        line="$line${line:+ }$(quote "$word")"
    done
    printf '+ %s\n' "$line"
    if [ "$DRY_RUN" = 0 ]; then
        "$@"
    fi
}

need_value() {
    [ "$2" -ge 2 ] || die "$1 needs a value (see --help)"
}

while [ $# -gt 0 ]; do
    case $1 in
        --wheel) need_value "$1" $#; WHEEL=$2; shift 2 ;;
        --bundle) need_value "$1" $#; BUNDLE=$2; shift 2 ;;
        --config) need_value "$1" $#; CONFIG=$2; shift 2 ;;
        --ca) need_value "$1" $#; CA=$2; shift 2 ;;
        --unit) need_value "$1" $#; UNIT=$2; shift 2 ;;
        --prefix) need_value "$1" $#; PREFIX=$2; shift 2 ;;
        --user) need_value "$1" $#; SVC_USER=$2; shift 2 ;;
        --python) need_value "$1" $#; PYTHON=$2; shift 2 ;;
        --pip-args) need_value "$1" $#; PIP_ARGS=$2; shift 2 ;;
        --root) need_value "$1" $#; ROOT=$2; shift 2 ;;
        --no-start) START=0; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

# ---- checks: everything is verified before anything changes ---------------------------------
case $PREFIX in
    /*) PREFIX=${PREFIX%/} ;;
    *) die "--prefix must be an absolute path (got $PREFIX)" ;;
esac
if [ -n "$ROOT" ]; then
    case $ROOT in
        /*) ROOT=${ROOT%/} ;;
        *) ROOT=$(pwd)/$ROOT ;;
    esac
    [ "$ROOT" != "" ] || die "--root /: leave --root out to install into the real system"
fi
case $SVC_USER in
    '' | -* | *[!a-z0-9_-]*) die "--user: a system user name of a-z 0-9 _ - (got $SVC_USER)" ;;
esac
if [ -z "$WHEEL" ]; then
    for f in "$HERE"/cwsnet-*.whl; do
        [ -e "$f" ] || continue
        [ -z "$WHEEL" ] || die "more than one cwsnet-*.whl in $HERE: choose one with --wheel"
        WHEEL=$f
    done
    [ -n "$WHEEL" ] || die "no cwsnet-*.whl in $HERE: pass --wheel FILE"
fi
for pair in "wheel:$WHEEL" "bundle:$BUNDLE" "config:$CONFIG" "ca:$CA" "unit:$UNIT"; do
    what=${pair%%:*}
    file=${pair#*:}
    [ -f "$file" ] || die "--$what $file: no such file"
    [ -r "$file" ] || die "--$what $file: cannot read it (run as root)"
done
if [ -z "$ROOT" ] && [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then
    die "run as root (sudo sh $0 ...), or try --dry-run, or --root DIR to install under DIR"
fi
"$PYTHON" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
    die "$PYTHON is not Python 3.11 or later with venv and ensurepip (on Raspberry Pi OS: apt-get install python3-venv)"
if [ -z "$ROOT" ] && [ "$DRY_RUN" = 0 ]; then
    command -v systemctl >/dev/null 2>&1 || die "systemctl not found: this installer needs systemd"
fi

VENV=$PREFIX/venv
# owner of the secret and state files; under --root nobody is created, so the caller keeps them
if [ -n "$ROOT" ]; then
    OWN=""
    say "installing under $ROOT (--root): no user is created, files keep their owner $(id -un), nothing starts"
else
    OWN="-o $SVC_USER -g $SVC_USER"
fi

# install FILE MODE DEST [OWNER-ARGS]: written to DEST.new, then renamed over DEST, so a reader (the
# agent follows its bundle) sees the old file or the new one, never half of one
put() {
    # shellcheck disable=SC2086 # $4 is "-o USER -g GROUP" or empty, split on purpose
    run install -m "$2" $4 "$1" "$3.new"
    run mv -f "$3.new" "$3"
}

# ---- 1. the service user -----------------------------------------------------------------
if [ -n "$ROOT" ]; then
    say "# skipped (--root): useradd $SVC_USER"
elif getent passwd "$SVC_USER" >/dev/null 2>&1; then
    say "# user $SVC_USER exists"
else
    nologin=/usr/sbin/nologin
    [ -x "$nologin" ] || nologin=/bin/false
    run useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home --shell "$nologin" \
        --comment "CWSNet agent" "$SVC_USER"
fi

# ---- 2. the venv and the agent -------------------------------------------------------------
if [ -x "$ROOT$VENV/bin/python" ]; then
    say "# reusing the venv $ROOT$VENV"
else
    run install -d -m 0755 "$ROOT$PREFIX"
    run "$PYTHON" -m venv "$ROOT$VENV"
fi
# the wheel with its dependencies, then the wheel again even if its version is installed already
# (a rebuilt wheel of the same version replaces the code)
# shellcheck disable=SC2086 # PIP_ARGS is a list of options, split on purpose
run "$ROOT$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade $PIP_ARGS "$WHEEL"
# shellcheck disable=SC2086
run "$ROOT$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps \
    $PIP_ARGS "$WHEEL"

# ---- 3. config, bundle, CA ----------------------------------------------------------------
run install -d -m 0755 "$ROOT$CONF_DIR"
put "$BUNDLE" 0600 "$ROOT$CONF_DIR/bundle.json" "$OWN"
put "$CONFIG" 0644 "$ROOT$CONF_DIR/agent.yaml" ""
put "$CA" 0644 "$ROOT$CONF_DIR/ca.crt" ""

# ---- 4. the state directory: the outbox. Created if missing, never emptied -----------------
[ -z "$ROOT" ] || run mkdir -p "$ROOT$(dirname "$STATE_DIR")"
# shellcheck disable=SC2086
run install -d -m 0700 $OWN "$ROOT$STATE_DIR"

# ---- 5. the unit ----------------------------------------------------------------------------
[ -z "$ROOT" ] || run mkdir -p "$ROOT$UNIT_DIR"
if [ "$PREFIX" = /opt/cwsnet ]; then
    put "$UNIT" 0644 "$ROOT$UNIT_DIR/$UNIT_NAME" ""
else
    rendered=$ROOT$UNIT_DIR/.$UNIT_NAME.rendered
    say "+ sed 's#/opt/cwsnet/#$PREFIX/#g' $(quote "$UNIT") > $(quote "$rendered")"
    [ "$DRY_RUN" = 1 ] || sed "s#/opt/cwsnet/#$PREFIX/#g" "$UNIT" >"$rendered"
    put "$rendered" 0644 "$ROOT$UNIT_DIR/$UNIT_NAME" ""
    run rm -f "$rendered"
fi

# ---- 6. enable and (re)start ------------------------------------------------------------------
if [ -n "$ROOT" ]; then
    if command -v systemctl >/dev/null 2>&1; then
        run systemctl --root="$ROOT" --quiet enable "$UNIT_NAME"
    else
        run install -d -m 0755 "$ROOT$UNIT_DIR/multi-user.target.wants"
        run ln -sf "$UNIT_DIR/$UNIT_NAME" "$ROOT$UNIT_DIR/multi-user.target.wants/$UNIT_NAME"
    fi
    say "installed under $ROOT"
    exit 0
fi
if command -v systemd-analyze >/dev/null 2>&1; then
    run systemd-analyze verify "$UNIT_DIR/$UNIT_NAME"
fi
run systemctl daemon-reload
run systemctl --quiet enable "$UNIT_NAME"
if [ "$START" = 1 ]; then
    # Type=notify: this returns once the agent said READY=1, or fails if it could not start
    if ! run systemctl restart "$UNIT_NAME"; then
        journalctl -u "$UNIT_NAME" -n 30 --no-pager >&2 || true
        printf '%s: %s did not start; its last log lines are above\n' "$PROG" "$UNIT_NAME" >&2
        exit 1
    fi
fi
[ "$DRY_RUN" = 1 ] && exit 0
state="installed and enabled"
[ "$START" = 0 ] || state="$state, and running"
say ""
say "$UNIT_NAME $state."
say "  status:  systemctl status $UNIT_NAME"
say "  logs:    journalctl -u $UNIT_NAME -f"
say "  outbox:  $STATE_DIR/outbox.db (kept across upgrades)"
