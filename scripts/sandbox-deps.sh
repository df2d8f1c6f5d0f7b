#!/usr/bin/env bash
# The Debian tools of the plugin sandbox (kiln.tasks.plugin), installed when absent (as root; idempotent):
# runc runs Tier A containers (crun refuses hybrid cgroups), bwrap Tier B, umoci unpacks OCI images,
# skopeo reads `docker save` archives, busybox-static builds the tests' image, and mmdebstrap (with mount, for
# its chroot's /proc and /sys) builds the tests' Debian image with Python (tests/sandbox/python_image.py).
set -euo pipefail

missing=()
for pair in runc:runc umoci:umoci skopeo:skopeo bwrap:bubblewrap mount:mount; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
# Debian's dynamic `busybox` package has the same command name; the test image needs the static binary
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
# installed without recommends: as root mmdebstrap needs none of them (fakechroot and uidmap serve other users'
# modes), and uidmap would upgrade the host's passwd and login
bare=()
command -v mmdebstrap >/dev/null || bare+=(mmdebstrap)

if [ $((${#missing[@]} + ${#bare[@]})) -gt 0 ]; then
    apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ ${#bare[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${bare[@]}" >/dev/null
fi
