#!/usr/bin/env bash
# Sets up a fresh Debian machine for blockrep: the QEMU/libnbd/fio peer tools (apt-get, as root
# or through sudo), pnpm, the workspace's npm dependencies, and a build of every package.
set -euo pipefail
cd "$(dirname "$0")/.."

# gcc-aarch64-linux-gnu: the linux-arm64 build of @blockrep/block's native addon (packed with x64's).
packages=(qemu-utils qemu-system-common qemu-system-x86 libnbd-bin python3-libnbd fio openssl graphviz etcd-server iproute2 nbdkit gcc gcc-aarch64-linux-gnu)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "setup: installing ${missing[*]}"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v pnpm >/dev/null 2>&1; then
  echo "setup: installing pnpm"
  npm install -g pnpm@10 >/dev/null
fi

pnpm install --frozen-lockfile
pnpm build
