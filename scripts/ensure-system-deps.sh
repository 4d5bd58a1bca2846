#!/usr/bin/env bash
# System packages the test suite needs and pip cannot provide: a real
# PostgreSQL server (Debian's package) for the store's conformance suite.
# Idempotent: installs only what is missing.
set -euo pipefail

if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  echo "PostgreSQL is missing and this user cannot install it: apt-get install postgresql" >&2
  exit 1
fi
echo "installing PostgreSQL (Debian package) for the test suite ..."
"${as_root[@]}" apt-get update -q
DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -q --no-install-recommends postgresql
