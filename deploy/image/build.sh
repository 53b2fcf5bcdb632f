#!/usr/bin/env bash
# Builds the tokenbroker image from the Containerfile at the repository root
# and writes it as an OCI archive. No Docker engine, no registry and no base
# image are needed: the image is FROM scratch and the binary is built here.
#
#   deploy/image/build.sh [ARCHIVE]
#
# ARCHIVE defaults to dist/tokenbroker-<version>.oci.tar. Environment:
#   VERSION   version to stamp and tag (default: git describe --tags --always --dirty)
#   IMAGE     image name (default: tokenbroker); the tag is VERSION
#   BUILDER   buildah (default; vfs storage in a temporary root, chroot
#             isolation, so it works as root without a daemon), podman or docker
set -euo pipefail
cd "$(dirname "$0")/../.."

VERSION=${VERSION:-$(git describe --tags --always --dirty 2>/dev/null || echo unknown)}
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
IMAGE=${IMAGE:-tokenbroker}
BUILDER=${BUILDER:-buildah}
ARCHIVE=${1:-dist/tokenbroker-$VERSION.oci.tar}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
mkdir -p "$(dirname "$ARCHIVE")"

work=$(mktemp -d)
cleanup() {
  if [ -d "$work/storage" ] && [ "$(id -u)" != 0 ]; then
    buildah unshare rm -rf "$work/storage" || true
  fi
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

# The build context holds exactly what the Containerfile copies.
ctx=$work/context
mkdir -p "$ctx"
echo "== building the static binary ($VERSION, $REVISION)"
CGO_ENABLED=0 GOOS=linux go build -trimpath -buildvcs=false \
  -ldflags "-s -w -X main.version=$VERSION -X main.commit=$REVISION" \
  -o "$ctx/tokenbroker" ./cmd/tokenbroker
cp Containerfile deploy/image/passwd deploy/image/group "$ctx/"
cp "$CA_BUNDLE" "$ctx/ca-certificates.crt"
mkdir -p "$ctx/rootfs" && mkdir -m 0700 "$ctx/rootfs/data"
"$ctx/tokenbroker" version

tag="$IMAGE:$VERSION"
build_args=(--build-arg "VERSION=$VERSION" --build-arg "REVISION=$REVISION" -f "$ctx/Containerfile" -t "$tag")
echo "== building $tag with $BUILDER"
case "$BUILDER" in
buildah)
  store=(--storage-driver vfs --root "$work/storage" --runroot "$work/run")
  buildah "${store[@]}" bud --isolation chroot --layers=false "${build_args[@]}" "$ctx"
  rm -f "$ARCHIVE"
  buildah "${store[@]}" push "$tag" "oci-archive:$ARCHIVE:$tag"
  ;;
podman)
  podman build "${build_args[@]}" "$ctx"
  rm -f "$ARCHIVE"
  podman save --format oci-archive -o "$ARCHIVE" "$tag"
  ;;
docker)
  docker build "${build_args[@]}" "$ctx"
  rm -f "$ARCHIVE"
  docker save -o "$ARCHIVE" "$tag"
  ;;
*)
  echo "BUILDER must be buildah, podman or docker, not $BUILDER" >&2
  exit 2
  ;;
esac
echo "== wrote $ARCHIVE ($tag)"
