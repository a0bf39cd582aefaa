#!/usr/bin/env bash
# The Lux tutorial's four training runs (9 epochs, seed 0, 1350/150 MNIST images), plus the
# torch.compile variant of its type-stability section, recorded with the machine's details.
#
#   scripts/tutorial_runs.sh [OUTPUT]     (default: benchmarks/results/tutorial_runs.txt)
#
# Tutorial run                                         -> odeflux flags
#   InterpolatingAdjoint(ZygoteVJP), ComponentArray, GPU -> --sensealg interpolating --vjp autograd --params flat
#   GaussAdjoint(ZygoteVJP), NamedTuple parameters       -> --sensealg gauss --vjp autograd --params tree
#   InterpolatingAdjoint(ReverseDiffVJP), CPU            -> --sensealg interpolating --vjp func --device cpu
#   ReverseDiffAdjoint (discrete), CPU                   -> --sensealg direct --device cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
out="${1:-benchmarks/results/tutorial_runs.txt}"
mkdir -p "$(dirname "$out")"
tmp="$(mktemp "$(dirname "$out")/.tutorial_runs.XXXXXX")"
trap 'rm -f "$tmp"' EXIT

runs=(
  "train --sensealg interpolating --vjp autograd --params flat"
  "train --sensealg gauss --vjp autograd --params tree"
  "train --sensealg interpolating --vjp func --device cpu"
  "train --sensealg direct --device cpu"
  "train --sensealg interpolating --vjp autograd --params flat --compile"
)

{
  echo "# odeflux: the Lux MNIST Neural-ODE tutorial's runs"
  echo "# produced by: scripts/tutorial_runs.sh ($(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
  echo "# Time covers the training batches of each epoch (11 batches of <= 128 images); accuracies are"
  echo "# evaluated after each epoch in eval mode. Epoch 1 includes one-off costs (compilation for --compile)."
  echo "# Training uses one torch thread (odeflux train --threads, default 1), whatever info reports."
  echo
  echo "\$ odeflux info"
  "$PY" -m odeflux info
} >"$tmp"
for r in "${runs[@]}"; do
  echo "running: odeflux $r" >&2
  { echo; echo "\$ odeflux $r"; } >>"$tmp"
  "$PY" -m odeflux $r >>"$tmp"
done
chmod 644 "$tmp"
sync "$tmp"
mv -f "$tmp" "$out"
trap - EXIT
echo "wrote $out" >&2
