#!/usr/bin/env bash
# System packages the test suite needs and pip cannot provide, from Debian:
# a real PostgreSQL server (the store's conformance suite) and a real OpenSSH
# server and client (the exec service's SSH backend), and Chromium (the
# TypeScript client's browser test drives it headless with playwright-core).
# Idempotent: installs only what is missing.
set -euo pipefail

missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh-keygen >/dev/null 2>&1 || missing+=(openssh-client)
[ -x /usr/bin/chromium ] || missing+=(chromium)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  echo "missing system packages and no way to install them: apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "installing system packages for the test suite: ${missing[*]} ..."
"${as_root[@]}" apt-get update -q
DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
