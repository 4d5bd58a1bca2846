#!/usr/bin/env bash
# Helm and the chart's validator (deploy/helm/validate), built with Go from the Go module
# proxy and cached under $DISPATCH_TOOLS (default ~/.cache/dispatch/tools), so only the
# first run builds (a few minutes); later runs only look. Prints helm's path, then the
# validator's. Used by `make test` and tests/deploy/test_helm.py.
set -euo pipefail

HELM_VERSION=v3.22.0

root="$(cd "$(dirname "$0")/.." && pwd)"
tools="${DISPATCH_TOOLS:-${HOME:?HOME must be set}/.cache/dispatch/tools}"
command -v go >/dev/null 2>&1 || PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null 2>&1 || { echo "ensure-helm: Go is required (https://go.dev/dl)" >&2; exit 1; }

# go install and go build write the binary whole; building into a fresh directory and
# renaming it keeps an interrupted run from leaving anything that looks done.
helm_dir="$tools/helm-$HELM_VERSION"
if [ ! -x "$helm_dir/helm" ]; then
  echo "ensure-helm: building helm $HELM_VERSION into $helm_dir (first run only) ..." >&2
  mkdir -p "$tools"
  tmp="$(mktemp -d "$tools/.helm.XXXXXX")"
  # Outside any module, so the repository's files play no part in the build.
  (cd "$tmp" && GOBIN="$tmp/bin" go install -trimpath "helm.sh/helm/v3/cmd/helm@$HELM_VERSION") >&2
  rm -rf "$helm_dir"
  mv "$tmp/bin" "$helm_dir"
  rm -rf "$tmp"
fi

# The validator is rebuilt whenever its sources change: its directory is named by their hash.
src="$root/deploy/helm/validate"
sum="$(cat "$src/go.mod" "$src/go.sum" "$src"/*.go | sha256sum | cut -c1-16)"
validate_dir="$tools/k8s-validate-$sum"
if [ ! -x "$validate_dir/k8s-validate" ]; then
  echo "ensure-helm: building the manifest validator into $validate_dir ..." >&2
  mkdir -p "$tools"
  tmp="$(mktemp -d "$tools/.validate.XXXXXX")"
  (cd "$src" && go build -trimpath -o "$tmp/k8s-validate" .) >&2
  rm -rf "$validate_dir"
  mv "$tmp" "$validate_dir"
  # Builds of older sources are not used again.
  find "$tools" -maxdepth 1 -name 'k8s-validate-*' ! -path "$validate_dir" -exec rm -rf {} +
fi

echo "$helm_dir/helm"
echo "$validate_dir/k8s-validate"
