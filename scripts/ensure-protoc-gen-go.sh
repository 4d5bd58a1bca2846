#!/usr/bin/env bash
# protoc-gen-go and protoc-gen-go-grpc, the protoc plugins that make the Go client's generated
# code (clients/go/dispatchv1, through scripts/proto_go.py), built with Go from the Go module
# proxy at pinned versions and cached under $DISPATCH_TOOLS (default ~/.cache/dispatch/tools),
# so only the first run builds. Prints protoc-gen-go's path, then protoc-gen-go-grpc's.
# Used by `make proto`, `make test` (through deploy-tools) and scripts/gen_protos.py.
set -euo pipefail

# protoc-gen-go is google.golang.org/protobuf's: keep it at the version clients/go/go.mod requires.
PROTOC_GEN_GO_VERSION=v1.36.12
PROTOC_GEN_GO_GRPC_VERSION=v1.6.2

tools="${DISPATCH_TOOLS:-${HOME:?HOME must be set}/.cache/dispatch/tools}"
command -v go >/dev/null 2>&1 || PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null 2>&1 || { echo "ensure-protoc-gen-go: Go is required (https://go.dev/dl)" >&2; exit 1; }

# build NAME PACKAGE VERSION: go install into a fresh directory, then rename it, so an
# interrupted run leaves nothing that looks done. Outside any module: the repository's files
# play no part in the build.
build() {
  local name="$1" package="$2" version="$3"
  local dir="$tools/$name-$version"
  if [ ! -x "$dir/$name" ]; then
    echo "ensure-protoc-gen-go: building $name $version into $dir (first run only) ..." >&2
    mkdir -p "$tools"
    local tmp
    tmp="$(mktemp -d "$tools/.$name.XXXXXX")"
    (cd "$tmp" && GOBIN="$tmp/bin" go install -trimpath "$package@$version") >&2
    rm -rf "$dir"
    mv "$tmp/bin" "$dir"
    rm -rf "$tmp"
  fi
  echo "$dir/$name"
}

build protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go "$PROTOC_GEN_GO_VERSION"
build protoc-gen-go-grpc google.golang.org/grpc/cmd/protoc-gen-go-grpc "$PROTOC_GEN_GO_GRPC_VERSION"
