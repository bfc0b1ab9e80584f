#!/usr/bin/env bash
# On a machine where the project cannot be pip-installed (the lent GPU machine has no registry),
# lay the package out as pyproject.toml maps it and print a PYTHONPATH for it:
#   export PYTHONPATH=$(scripts/device_path.sh)
# then run tests with `pytest`, not `python -m pytest`: that puts the checkout itself first on
# sys.path, whose sts_edge/ lacks the backends and kernels laid out here.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
site=${1:-/tmp/sts_edge_site}
rm -rf "$site" && mkdir -p "$site"
cp -r "$root/sts_edge" "$site/sts_edge"
cp -r "$root/backends" "$site/sts_edge/backends"
cp -r "$root/triton_kernels" "$site/sts_edge/triton_kernels"
cp -r "$root/metal_kernels" "$site/sts_edge/metal_kernels"
cp -r "$root/cpu_kernels" "$site/sts_edge/cpu_kernels"
cp -r "$root/bench" "$site/sts_edge/bench"
echo "$site:$root/scripts"
