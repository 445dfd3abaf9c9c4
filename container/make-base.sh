#!/usr/bin/env bash
# One base image for both targets, made from Debian's own archive (no registry needed):
# debootstrap a minimal bookworm with Python 3.11, its headers and a C compiler (Triton builds a
# small launcher at run time), tini and CA certificates, then `docker import` it.
#   container/make-base.sh TAG [SUITE] [MIRROR]          (needs root and a Docker engine)
# Where a registry is reachable, debian:bookworm-slim works too: the Dockerfile's base stage
# installs whatever of this list the base lacks.
set -euo pipefail
tag=${1:?usage: make-base.sh TAG [SUITE] [MIRROR]}
suite=${2:-bookworm}
mirror=${3:-http://deb.debian.org/debian}
packages=python3,python3-venv,python3-dev,gcc,libc6-dev,tini,ca-certificates
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror"
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/* "$root"/usr/share/doc/* \
       "$root"/usr/share/man/* "$root"/usr/share/locale/*
tar --numeric-owner -C "$root" -c . | docker import \
  --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' \
  --message "debootstrap --variant=minbase --include=$packages $suite $mirror" - "$tag"
docker image inspect --format '{{.Id}} {{.Size}}' "$tag"
