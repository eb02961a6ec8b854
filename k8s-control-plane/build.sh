#!/usr/bin/env bash
# Builds the test control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
# kubectl) from the Go modules beside this script into target/k8s-control-plane/bin, once: a stamp
# of the modules' go.mod and go.sum and of this script says whether the binaries there are current.
# Prints the directory of the binaries on its last line. Needs `go` and the Go module proxy.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
out="${FIREBRAND_CONTROL_PLANE_DIR:-$root/target/k8s-control-plane}"
bin="$out/bin"
version=v1.37.2
mkdir -p "$out"
# One build at a time: test binaries and benches that start at once wait for the first.
exec 9>"$out/.lock"
flock 9
stamp="$(cat "$here/build.sh" "$here/kube/go.mod" "$here/kube/go.sum" "$here/etcd/go.mod" "$here/etcd/go.sum" | sha256sum | cut -c1-16)"
if [[ -f "$bin/.stamp" && "$(cat "$bin/.stamp")" == "$stamp" ]]; then
  echo "$bin"
  exit 0
fi
echo "k8s-control-plane: building Kubernetes $version and etcd from Go modules into $bin (minutes on a cold machine)" >&2
start=$SECONDS
mkdir -p "$bin"
rm -f "$bin/.stamp"
# GOFLAGS replaces the machine's `go env -w GOFLAGS`, so keep -buildvcs=false in it.
export GOFLAGS="-trimpath -buildvcs=false -mod=readonly"
export CGO_ENABLED=0
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=37"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
(cd "$here/etcd" && go build -ldflags "-s -w" -o "$bin/etcd" .)
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  (cd "$here/kube" && go build -ldflags "$ldflags" -o "$bin/$cmd" "k8s.io/kubernetes/cmd/$cmd")
  echo "k8s-control-plane: built $cmd ($((SECONDS - start)) s so far)" >&2
done
echo "$stamp" > "$bin/.stamp"
echo "k8s-control-plane: built in $((SECONDS - start)) s" >&2
echo "$bin"
