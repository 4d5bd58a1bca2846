#!/usr/bin/env bash
# grpcurl, built with Go from the Go module proxy and cached under $DISPATCH_TOOLS (default
# ~/.cache/dispatch/tools), so only the first run builds (about a minute). Prints its path.
# Used by `make test` and tests/conformance/test_grpcurl.py.
set -euo pipefail

GRPCURL_VERSION=v1.9.3

tools="${DISPATCH_TOOLS:-${HOME:?HOME must be set}/.cache/dispatch/tools}"
command -v go >/dev/null 2>&1 || PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null 2>&1 || { echo "ensure-grpcurl: Go is required (https://go.dev/dl)" >&2; exit 1; }

dir="$tools/grpcurl-$GRPCURL_VERSION"
if [ ! -x "$dir/grpcurl" ]; then
  echo "ensure-grpcurl: building grpcurl $GRPCURL_VERSION into $dir (first run only) ..." >&2
  mkdir -p "$tools"
  tmp="$(mktemp -d "$tools/.grpcurl.XXXXXX")"
  # Outside any module; built whole into a fresh directory, then renamed: an interrupted run
  # leaves nothing that looks done.
  (cd "$tmp" && GOBIN="$tmp/bin" go install -trimpath "github.com/fullstorydev/grpcurl/cmd/grpcurl@$GRPCURL_VERSION") >&2
  rm -rf "$dir"
  mv "$tmp/bin" "$dir"
  rm -rf "$tmp"
fi
echo "$dir/grpcurl"
