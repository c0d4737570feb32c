#!/usr/bin/env bash
# Installs what the tests need, and only what is missing (fast when all is present):
#   * qemu-img, qemu-io, qemu-storage-daemon (Debian qemu-utils, preferably 10.x from
#     bookworm-backports, the version the tests were written against);
#   * a Python virtualenv at $REPO/.venv with libvhdi-python (module pyvhdi), an independent
#     VHDX reader used as a test peer;
#   * for the guest end-to-end tests (tests/guest.rs, tests/guest/guest-run): qemu-system-x86
#     matching the installed qemu-utils, and busybox-static, cpio, kmod, xz-utils, fio and
#     e2fsprogs, from which guest-run builds its guest image (the guest kernel is downloaded by
#     guest-run itself with apt-get download, never installed).
#
# Usage: contrib/setup-test-deps.sh [--without-guest]
#   --without-guest     skip what only the guest end-to-end tests need (qemu-system-x86 etc.).
#   --with-qemu-system  accepted for compatibility: the guest tools are installed by default.
#
# Environment: VHDX_VENV (default $REPO/.venv), PYTHON (interpreter that creates the venv,
# default python3), LIBVHDI_PYTHON_SPEC (pip requirement, default pinned below),
# VHDX_APT_CACHE (private apt state for backports, default ~/.cache/vhost-user-vhdx/apt-backports).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VHDX_VENV:-$REPO/.venv}
PYTHON=${PYTHON:-python3}
# Pinned so that every machine tests against the same reader; bump deliberately.
LIBVHDI_PYTHON_SPEC=${LIBVHDI_PYTHON_SPEC:-libvhdi-python==20260901}
APT_BACKPORTS=${VHDX_APT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vhost-user-vhdx/apt-backports}
BACKPORTS_LINE="deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main"

log() { echo "setup-test-deps: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

as_root() {
    if [[ $(id -u) == 0 ]]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "need root (or sudo) to run: $*"
    fi
}

export DEBIAN_FRONTEND=noninteractive
APT_UPDATED=0

apt_update_once() {
    ((APT_UPDATED)) && return 0
    log "apt-get update"
    as_root apt-get update -q >&2
    APT_UPDATED=1
}

# apt-get install that refreshes the package lists only when needed: when there are none
# (fresh machine) or when the first attempt fails (stale lists). --no-remove: never let a
# dependency resolution uninstall something (e.g. the backports qemu-utils).
apt_install() {
    compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null || apt_update_once
    log "apt-get install $*"
    if ! as_root apt-get install -y -q --no-install-recommends --no-remove "$@" >&2; then
        ((APT_UPDATED)) && die "apt-get install $* failed"
        apt_update_once
        as_root apt-get install -y -q --no-install-recommends --no-remove "$@" >&2
    fi
}

# apt-get with a private state dir whose sources are the system's plus bookworm-backports,
# leaving /etc/apt alone. Its lists are refreshed once per run of this script.
BACKPORTS_UPDATED=0
apt_backports() {
    local -a o=(-o "Dir::Etc::sourcelist=$APT_BACKPORTS/sources.list"
                -o "Dir::State::lists=$APT_BACKPORTS/lists" -o APT::Sandbox::User=root)
    if ((!BACKPORTS_UPDATED)); then
        mkdir -p "$APT_BACKPORTS/lists/partial"
        echo "$BACKPORTS_LINE" >"$APT_BACKPORTS/sources.list"
        log "apt-get update (private state with bookworm-backports in $APT_BACKPORTS)"
        as_root apt-get "${o[@]}" update -q >&2
        BACKPORTS_UPDATED=1
    fi
    as_root apt-get "${o[@]}" "$@"
}

installed_version() { # PACKAGE -> its installed version, or nothing
    local v
    v=$(dpkg-query -W -f='${db:Status-Abbrev}${Version}' "$1" 2>/dev/null || true)
    [[ $v == ii* ]] && echo "${v#ii }"
    return 0
}

# ---------------------------------------------------------------- QEMU tools
ensure_qemu_utils() {
    local cmd missing=()
    for cmd in qemu-img qemu-io qemu-storage-daemon; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    ((${#missing[@]})) || return 0
    log "missing: ${missing[*]}"
    # qemu-utils 10.x from bookworm-backports ships all three. (Bookworm's own qemu-utils 7.2
    # lacks qemu-storage-daemon, which there comes with qemu-system-common.)
    if [[ -e /usr/share/keyrings/debian-archive-keyring.gpg ]] &&
        apt_backports install -y -q --no-install-recommends --no-remove \
            -t bookworm-backports qemu-utils >&2; then
        :
    else
        log "backports qemu-utils not installable; falling back to the distribution's packages"
        apt_install qemu-utils
        command -v qemu-storage-daemon >/dev/null || apt_install qemu-system-common
    fi
    for cmd in qemu-img qemu-io qemu-storage-daemon; do
        command -v "$cmd" >/dev/null || die "$cmd still missing after installing qemu-utils"
    done
}

# qemu-system-x86_64 for the guest end-to-end tests (skipped with --without-guest).
# Bookworm's qemu-system-x86 7.2 drags in qemu-system-common 7.2, which also ships
# qemu-storage-daemon, so a plain "apt-get install qemu-system-x86" REMOVES a backports
# qemu-utils 10.x (and with it qemu-img). So when qemu-utils is a backports build, install the
# matching qemu-system-x86=<same version> from bookworm-backports through the private apt state.
ensure_qemu_system() {
    local v sys_v
    v=$(installed_version qemu-utils)
    sys_v=$(installed_version qemu-system-x86)
    if command -v qemu-system-x86_64 >/dev/null && [[ -n $sys_v && ( -z $v || $sys_v == "$v" ) ]]; then
        return 0
    fi
    if [[ $v == *bpo* ]]; then
        log "qemu-utils $v is from bookworm-backports: installing qemu-system-x86=$v from there"
        apt_backports install -y -q --no-install-recommends --no-remove \
            -t bookworm-backports "qemu-system-x86=$v" >&2
    else
        apt_install qemu-system-x86
    fi
    command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing after install"
    [[ -z $v || $(installed_version qemu-utils) == "$v" ]] ||
        die "installing qemu-system-x86 changed qemu-utils from $v to $(installed_version qemu-utils)"
}

# The host tools guest-run builds its guest image from and checks results with (command ->
# Debian package). busybox must be the static one: it is copied into the guest as is.
ensure_guest_tools() {
    local -A pkg_of=([cpio]=cpio [depmod]=kmod [modprobe]=kmod [xz]=xz-utils [fio]=fio
                     [e2fsck]=e2fsprogs [debugfs]=e2fsprogs [flock]=util-linux)
    local cmd missing=()
    for cmd in "${!pkg_of[@]}"; do
        PATH=$PATH:/usr/sbin:/sbin command -v "$cmd" >/dev/null || missing+=("${pkg_of[$cmd]}")
    done
    # A dynamically linked busybox (Debian's "busybox") would not run in the guest.
    [[ -x /bin/busybox ]] && ! ldd /bin/busybox >/dev/null 2>&1 || missing+=(busybox-static)
    ((${#missing[@]})) || return 0
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    apt_install "${missing[@]}"
}

# ---------------------------------------------------------------- Python peer
venv_ok() {
    [[ -x $VENV/bin/python ]] && "$VENV/bin/python" -c 'import pyvhdi' 2>/dev/null
}

ensure_venv() {
    venv_ok && return 0
    if [[ -e $VENV ]] && ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        log "removing broken virtualenv $VENV"
        rm -rf "$VENV"
    fi
    if [[ ! -x $VENV/bin/python ]]; then
        command -v "$PYTHON" >/dev/null || { apt_install python3; PYTHON=python3; }
        log "creating virtualenv $VENV with $PYTHON"
        if ! "$PYTHON" -m venv "$VENV" >&2; then
            rm -rf "$VENV"
            # Debian's python3 has venv/ensurepip in a separate package.
            apt_install python3-venv
            PYTHON=/usr/bin/python3
            "$PYTHON" -m venv "$VENV" >&2
        fi
    fi
    log "pip install $LIBVHDI_PYTHON_SPEC"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$LIBVHDI_PYTHON_SPEC" >&2
    "$VENV/bin/python" -c 'import pyvhdi; print("setup-test-deps: pyvhdi", pyvhdi.get_version())' >&2 ||
        die "pyvhdi is not importable in $VENV after installing $LIBVHDI_PYTHON_SPEC"
}

main() {
    local guest=1 arg
    for arg in "$@"; do
        case $arg in
            --with-qemu-system) guest=1 ;;
            --without-guest) guest=0 ;;
            -h|--help) sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; return 0 ;;
            *) die "unknown argument: $arg (try --help)" ;;
        esac
    done
    ensure_qemu_utils
    if ((guest)); then
        ensure_qemu_system
        ensure_guest_tools
    fi
    ensure_venv
    return 0
}

main "$@"
