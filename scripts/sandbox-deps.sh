#!/usr/bin/env bash
# The Debian tools of the plugin sandbox (kiln.tasks.plugin), installed when absent (as root; idempotent):
# runc runs Tier A containers (crun refuses hybrid cgroups), bwrap Tier B, umoci unpacks OCI images,
# skopeo reads `docker save` archives, busybox-static builds the tests' image.
set -euo pipefail

missing=()
for pair in runc:runc umoci:umoci skopeo:skopeo bwrap:bubblewrap; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
# Debian's dynamic `busybox` package has the same command name; the test image needs the static binary
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)

if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
