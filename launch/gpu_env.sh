#!/usr/bin/env bash
# Start one process of a multi-host GPU training run without SLURM: run it on every host, each
# with its own PROCESS_ID (0 on the coordinator host), from the repository root.
#
# Usage: launch/gpu_env.sh [--dry-run] COORDINATOR_HOST:PORT NUM_PROCESSES PROCESS_ID -- TRAIN_ARGS...
#   e.g. launch/gpu_env.sh 10.0.0.1:12345 2 0 -- --config configs/base.py --workdir /shared/run1
#
# Exports JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, then execs
# python -m ldm_jax.train TRAIN_ARGS. --dry-run prints those and the command instead.

set -euo pipefail

usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }
usage_error() { echo "gpu_env.sh: $1" >&2; usage >&2; exit 2; }

dry_run=0
positional=()
while (($#)); do
  case $1 in
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    -*) usage_error "unknown option: $1" ;;
    *) positional+=("$1") ;;
  esac
  shift
done
(($# > 0)) || usage_error "missing -- TRAIN_ARGS (at least --config FILE)"
((${#positional[@]} == 3)) || usage_error "expected COORDINATOR_HOST:PORT NUM_PROCESSES PROCESS_ID"
[[ ${positional[0]} =~ ^.+:[0-9]+$ ]] || usage_error "COORDINATOR_HOST:PORT expected, got ${positional[0]}"
[[ ${positional[1]} =~ ^[1-9][0-9]*$ ]] || usage_error "NUM_PROCESSES must be a positive integer, got ${positional[1]}"
if ! [[ ${positional[2]} =~ ^(0|[1-9][0-9]*)$ ]] || ((positional[2] >= positional[1])); then
  usage_error "PROCESS_ID must be in [0, NUM_PROCESSES), got ${positional[2]}"
fi

export JAX_COORDINATOR_ADDRESS=${positional[0]} JAX_NUM_PROCESSES=${positional[1]} JAX_PROCESS_ID=${positional[2]}
train=(python -m ldm_jax.train "$@")
if ((dry_run)); then
  printf 'export %s=%q\n' JAX_COORDINATOR_ADDRESS "$JAX_COORDINATOR_ADDRESS" JAX_NUM_PROCESSES "$JAX_NUM_PROCESSES" \
    JAX_PROCESS_ID "$JAX_PROCESS_ID"
  echo "+$(printf ' %q' "${train[@]}")"
  exit
fi
exec "${train[@]}"
