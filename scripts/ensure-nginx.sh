#!/usr/bin/env bash
# nginx from Debian's package, unpacked rather than installed (so no service starts and
# nothing outside the cache changes) under $DISPATCH_TOOLS (default ~/.cache/dispatch/tools),
# for tests/deploy/test_compose.py to run deploy/nginx.conf for real. Prints its path.
set -euo pipefail

tools="${DISPATCH_TOOLS:-${HOME:?HOME must be set}/.cache/dispatch/tools}"
dir="$tools/nginx"
if [ ! -x "$dir/usr/sbin/nginx" ]; then
  echo "ensure-nginx: unpacking Debian's nginx into $dir ..." >&2
  mkdir -p "$tools"
  tmp="$(mktemp -d "$tools/.nginx.XXXXXX")"
  # apt-get download needs the package lists; refresh them once if it finds nothing.
  if ! (cd "$tmp" && apt-get download nginx) >&2 2>&1; then
    apt-get update -q >&2
    (cd "$tmp" && apt-get download nginx) >&2 2>&1
  fi
  dpkg-deb -x "$tmp"/nginx_*.deb "$tmp/root"
  rm -rf "$dir"
  mv "$tmp/root" "$dir"
  rm -rf "$tmp"
fi
echo "$dir/usr/sbin/nginx"
