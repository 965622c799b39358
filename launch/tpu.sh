#!/usr/bin/env bash
# Train ldm_jax on a Cloud TPU VM or pod slice: every worker (host) runs the same command.
#
# Usage: launch/tpu.sh [OPTIONS] COMMAND [-- TRAIN_ARGS...]
#
# Commands:
#   create   create the TPU VM; skipped when it exists. With --queued, through a queued
#            resource, then wait until it is ACTIVE
#   setup    copy the code to every worker (~/ldm_jax) and install it with its TPU extra
#            (pip install -e '.[tpu]', with uv, into ~/ldm_venv)
#   run      on every worker: python -m ldm_jax.train --config CONFIG [--workdir DIR] TRAIN_ARGS,
#            streamed here and tee'd to ~/ldm_jax_train.log on each worker
#   logs     follow worker 0's log
#   delete   delete the TPU VM (with --queued, the queued resource); skipped when absent
#   all      create, setup, run, delete; the delete also runs when a step fails or is interrupted
#
# Options (default; environment variable):
#   --name NAME               TPU name (ldm-jax; LDM_NAME)
#   --zone ZONE               zone, required (LDM_ZONE)
#   --project PROJECT         GCP project (gcloud's default; LDM_PROJECT)
#   --accelerator-type TYPE   (v5litepod-16; LDM_ACCELERATOR_TYPE)
#   --runtime-version VER     TPU software version (v2-alpha-tpuv5-lite; LDM_RUNTIME_VERSION)
#   --spot                    spot capacity: cheaper, can be preempted (LDM_SPOT=1)
#   --queued                  create and delete through a queued resource (LDM_QUEUED=1)
#   --repo URL|PATH           git URL to clone, or local git checkout whose files (tracked and
#                             untracked, not ignored) are copied (this checkout; LDM_REPO)
#   --branch BRANCH           branch or tag to clone; git URL only (LDM_BRANCH)
#   --workdir DIR             trainer --workdir, e.g. gs://BUCKET/run1 (LDM_WORKDIR)
#   --config FILE             trainer --config, required by run and all (LDM_CONFIG)
#   --dry-run                 print the commands, one a line after "+ ", and run none; existence
#                             checks then answer "absent" for create and "present" for delete
#   -h, --help                this text

set -euo pipefail

name=${LDM_NAME:-ldm-jax}
zone=${LDM_ZONE:-}
project=${LDM_PROJECT:-}
accelerator_type=${LDM_ACCELERATOR_TYPE:-v5litepod-16}
runtime_version=${LDM_RUNTIME_VERSION:-v2-alpha-tpuv5-lite}
spot=${LDM_SPOT:-0}
queued=${LDM_QUEUED:-0}
repo=${LDM_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
branch=${LDM_BRANCH:-}
workdir=${LDM_WORKDIR:-}
config=${LDM_CONFIG:-}
dry_run=0
command=
train_args=()
log=ldm_jax_train.log  # in each worker's home

usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }
usage_error() { echo "tpu.sh: $1" >&2; usage >&2; exit 2; }

# opt --flag [VALUE]: set the variable of a valued option.
opt() {
  local var=${1#--}
  var=${var//-/_}
  case $var in
    name | zone | project | accelerator_type | runtime_version | repo | branch | workdir | config) ;;
    *) usage_error "unknown option: $1" ;;
  esac
  (($# == 2)) || usage_error "$1 needs a value"
  printf -v "$var" %s "$2"
}

while (($#)); do
  case $1 in
    --spot) spot=1 ;;
    --queued) queued=1 ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; train_args=("$@"); break ;;
    --*=*) opt "${1%%=*}" "${1#*=}" ;;
    -*) if (($# > 1)); then opt "$1" "$2"; shift; else opt "$1"; fi ;;
    *) [[ -z $command ]] || usage_error "unexpected argument: $1"; command=$1 ;;
  esac
  shift
done

case $command in
  create | setup | run | logs | delete | all) ;;
  '') usage_error "missing command" ;;
  *) usage_error "unknown command: $command" ;;
esac
[[ -n $zone ]] || usage_error "--zone is required (or LDM_ZONE)"
[[ -n $name ]] || usage_error "--name must not be empty"
[[ $spot == [01] ]] || usage_error "LDM_SPOT must be 0 or 1"
[[ $queued == [01] ]] || usage_error "LDM_QUEUED must be 0 or 1"
if [[ $command == run || $command == all ]] && [[ -z $config ]]; then
  usage_error "--config is required by $command (or LDM_CONFIG)"
fi
if [[ $command == setup || $command == all ]] && [[ -n $branch && -d $repo ]]; then
  usage_error "--branch needs --repo to be a git URL, not the local path $repo"
fi

loc=(--zone="$zone")
if [[ -n $project ]]; then loc+=(--project="$project"); fi
spot_flag=
if ((spot)); then spot_flag=--spot; fi

# quote ARGS...: the arguments as one line that bash reads back as the same words.
quote() {
  local a flag sq="'\\''" words=()
  for a; do
    if [[ $a =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then words+=("$a"); continue; fi
    flag=
    if [[ $a =~ ^--[A-Za-z0-9._-]+= ]]; then flag=${BASH_REMATCH[0]} a=${a#*=}; fi  # --flag='value'
    words+=("$flag'${a//\'/$sq}'")
  done
  echo "${words[*]}"
}

# run CMD...: print the command after "+ " (to stdout in a dry run, else to stderr) and run it unless dry.
run() {
  if ((dry_run)); then echo "+ $(quote "$@")"; return; fi
  echo "+ $(quote "$@")" >&2
  "$@"
}

# exists tpu-vm|queued-resources ASSUMED: whether $name exists; a dry run answers ASSUMED (0 yes, 1 no).
exists() {
  local describe=(gcloud compute tpus "$1" describe "$name" "${loc[@]}") err
  if ((dry_run)); then
    echo "+ $(quote "${describe[@]}")  # dry run: assumed $(if (($2)); then echo absent; else echo present; fi)"
    return "$2"
  fi
  if err=$("${describe[@]}" 2>&1 >/dev/null); then return 0; fi
  [[ $err == *NOT_FOUND* ]] || { echo "$err" >&2; exit 1; }
  return 1
}

wait_active() {
  local describe=(gcloud compute tpus queued-resources describe "$name" "${loc[@]}" --format='value(state.state)') state
  if ((dry_run)); then echo "+ $(quote "${describe[@]}")  # polled until ACTIVE"; return; fi
  while state=$("${describe[@]}") && [[ $state != ACTIVE ]]; do
    case $state in FAILED | SUSPEND* | DELETING) echo "tpu.sh: queued resource $name is $state" >&2; exit 1 ;; esac
    echo "queued resource $name is $state; checking again in 30 s" >&2
    sleep 30
  done
  [[ $state == ACTIVE ]]
}

create() {
  if exists tpu-vm 1; then echo "TPU $name exists; not creating it" >&2; return; fi
  if ((queued)); then
    exists queued-resources 1 || run gcloud compute tpus queued-resources create "$name" --node-id="$name" "${loc[@]}" \
      --accelerator-type="$accelerator_type" --runtime-version="$runtime_version" ${spot_flag:+"$spot_flag"}
    wait_active
  else
    run gcloud compute tpus tpu-vm create "$name" "${loc[@]}" \
      --accelerator-type="$accelerator_type" --version="$runtime_version" ${spot_flag:+"$spot_flag"}
  fi
}

setup() {
  local fetch
  if [[ -d $repo ]]; then
    local tarball=${TMPDIR:-/tmp}/ldm_jax-$name.tar.gz
    run bash -c "set -o pipefail; cd $(quote "$repo") \
&& git ls-files -z --cached --others --exclude-standard | tar -czf $(quote "$tarball") --null -T -"
    run gcloud compute tpus tpu-vm scp "$tarball" "$name":ldm_jax.tar.gz "${loc[@]}" --worker=all
    if ((!dry_run)); then rm "$tarball"; fi
    fetch='rm -rf ~/ldm_jax && mkdir ~/ldm_jax && tar -xzf ~/ldm_jax.tar.gz -C ~/ldm_jax && rm ~/ldm_jax.tar.gz'
  else
    fetch="rm -rf ~/ldm_jax && git clone --depth=1 $(quote ${branch:+--branch="$branch"} "$repo") ~/ldm_jax"
  fi
  # The TPU images' Python can be older than the package needs: uv brings its own when it must.
  run gcloud compute tpus tpu-vm ssh "$name" "${loc[@]}" --worker=all --command="$fetch && cd ~/ldm_jax \
&& { [ -x ~/.local/bin/uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh; } \
&& rm -rf ~/ldm_venv && ~/.local/bin/uv venv --python \">=3.11\" ~/ldm_venv \
&& ~/.local/bin/uv pip install --python ~/ldm_venv/bin/python -e \".[tpu]\""
}

train() {
  local train=(python -m ldm_jax.train --config "$config")
  if [[ -n $workdir ]]; then train+=(--workdir "$workdir"); fi
  train+=(${train_args[@]+"${train_args[@]}"})
  run gcloud compute tpus tpu-vm ssh "$name" "${loc[@]}" --worker=all --command="set -o pipefail; cd ~/ldm_jax \
&& . ~/ldm_venv/bin/activate && PYTHONUNBUFFERED=1 $(quote "${train[@]}") 2>&1 | tee ~/$log"
}

logs() {
  run gcloud compute tpus tpu-vm ssh "$name" "${loc[@]}" --worker=0 --command="tail -n 100 -F ~/$log"
}

delete() {
  if ((queued)); then
    if exists queued-resources 0; then
      run gcloud compute tpus queued-resources delete "$name" "${loc[@]}" --force --quiet
      return
    fi
  elif exists tpu-vm 0; then
    run gcloud compute tpus tpu-vm delete "$name" "${loc[@]}" --quiet
    return
  fi
  echo "TPU $name not found; nothing to delete" >&2
}

case $command in
  all)
    trap delete EXIT
    create
    setup
    train
    ;;
  run) train ;;
  *) "$command" ;;
esac
