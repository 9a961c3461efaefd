#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM (all hosts of a pod slice at once), inside
# the code folder and virtual environment that launch/tpu_vm.sh set up. JAX programs need all
# hosts of a slice to start together: that is what --worker=all does.
#
#   launch/run_multihost.sh [--sync] [--log FILE] NAME -- COMMAND [ARGS...]
#
#   --sync      copy the local working tree to every worker first (launch/tpu_vm.sh sync)
#   --log FILE  also write each worker's output to ~/REMOTE_DIR/FILE on that worker
#               (the run keeps going if the ssh session drops: it runs under nohup)
#
# Example:
#   launch/run_multihost.sh --sync my-tpu -- python -m capo_jax.train --config configs/demo.py
#
# Environment: ZONE, PROJECT, REMOTE_DIR, VENV as for launch/tpu_vm.sh.
set -euo pipefail

usage() {
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

SYNC=0
LOG=""
while [[ $# -gt 0 && $1 == --* ]]; do
  case "$1" in
    --sync) SYNC=1; shift ;;
    --log) [[ $# -ge 2 ]] || usage; LOG=$2; shift 2 ;;
    *) usage ;;
  esac
done
[[ $# -ge 3 && $2 == "--" ]] || usage
NAME=$1
shift 2

ZONE=${ZONE:-us-central2-b}
REMOTE_DIR=${REMOTE_DIR:-capo_jax}
VENV=${VENV:-capo-venv}
GCLOUD_FLAGS=(--zone="$ZONE")
if [[ -n ${PROJECT:-} ]]; then
  GCLOUD_FLAGS+=(--project="$PROJECT")
fi

if [[ $SYNC == 1 ]]; then
  "$(dirname "$0")/tpu_vm.sh" sync "$NAME"
fi

# Quote every argument so that the remote shell sees exactly the local words.
COMMAND=$(printf '%q ' "$@")
REMOTE="cd ~/$REMOTE_DIR && source ~/$VENV/bin/activate && "
if [[ -n $LOG ]]; then
  REMOTE+="nohup $COMMAND > $(printf '%q' "$LOG") 2>&1 < /dev/null & wait \$!"
else
  REMOTE+="$COMMAND"
fi

exec gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command="$REMOTE"
