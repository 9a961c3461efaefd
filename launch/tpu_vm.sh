#!/usr/bin/env bash
# Create a Cloud TPU VM (one host or a pod slice), copy this repository to every worker and
# install capo_jax there with jax[tpu]; also sync code again, and delete the VM.
#
#   launch/tpu_vm.sh create   NAME   # create the VM (or pod slice), then sync + install
#   launch/tpu_vm.sh install  NAME   # (re)install the Python environment on every worker
#   launch/tpu_vm.sh sync     NAME   # copy the working tree to every worker again
#   launch/tpu_vm.sh delete   NAME   # delete the VM
#
# Settings come from the environment (defaults in brackets):
#   ZONE [us-central2-b]  ACCELERATOR [v4-8]  RUNTIME_VERSION [chosen from ACCELERATOR]
#   PROJECT [gcloud's default project]  SPOT [0]: 1 asks for a Spot VM
#   REMOTE_DIR [capo_jax]: folder under the remote home that holds the code
#   VENV [capo-venv]: virtual environment under the remote home
#   PYTHON_VERSION [3.11]  JAX_VERSION [0.10.2]
set -euo pipefail

usage() {
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

[[ $# -eq 2 ]] || usage
ACTION=$1
NAME=$2

ZONE=${ZONE:-us-central2-b}
ACCELERATOR=${ACCELERATOR:-v4-8}
SPOT=${SPOT:-0}
REMOTE_DIR=${REMOTE_DIR:-capo_jax}
VENV=${VENV:-capo-venv}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
JAX_VERSION=${JAX_VERSION:-0.10.2}
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)

GCLOUD_FLAGS=(--zone="$ZONE")
if [[ -n ${PROJECT:-} ]]; then
  GCLOUD_FLAGS+=(--project="$PROJECT")
fi

# The TPU software image that matches each TPU generation (see
# `gcloud compute tpus tpu-vm versions list --zone=$ZONE` for the current list).
default_runtime() {
  case "$1" in
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v4-* | v3-* | v2-*) echo "tpu-ubuntu2204-base" ;;
    *)
      echo "unknown accelerator type '$1': set RUNTIME_VERSION explicitly" >&2
      exit 2
      ;;
  esac
}

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command="$1"
}

create_vm() {
  local runtime=${RUNTIME_VERSION:-$(default_runtime "$ACCELERATOR")}
  local extra=()
  if [[ $SPOT == 1 ]]; then
    extra+=(--spot)
  fi
  echo "creating $NAME: $ACCELERATOR, runtime $runtime, zone $ZONE"
  gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_FLAGS[@]}" \
    --accelerator-type="$ACCELERATOR" --version="$runtime" "${extra[@]}"
}

# Copy the tracked and untracked-but-not-ignored files (no checkpoints, no venvs) as one tarball.
sync_code() {
  local tarball
  tarball=$(mktemp /tmp/capo_jax.XXXXXX.tar.gz)
  (cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard |
    tar --null -czf "$tarball" -T -)
  gcloud compute tpus tpu-vm scp "$tarball" "$NAME:capo_jax_src.tar.gz" \
    "${GCLOUD_FLAGS[@]}" --worker=all
  rm -f "$tarball"
  on_all_workers "mkdir -p ~/$REMOTE_DIR && tar -xzf ~/capo_jax_src.tar.gz -C ~/$REMOTE_DIR && rm ~/capo_jax_src.tar.gz"
}

# The TPU images ship an older system Python; uv fetches a standalone Python $PYTHON_VERSION.
# jax[tpu] (which pulls libtpu) replaces the CPU jax/jaxlib pins of requirements.txt.
install_env() {
  local script
  script=$(cat <<EOF
set -euo pipefail
python3 -m pip install --user --quiet --upgrade uv
export PATH=\$HOME/.local/bin:\$PATH
uv venv --quiet --python $PYTHON_VERSION ~/$VENV
source ~/$VENV/bin/activate
cd ~/$REMOTE_DIR
grep -v -E '^(jax|jaxlib)==' requirements.txt > /tmp/capo_requirements_tpu.txt
uv pip install --quiet 'jax[tpu]==$JAX_VERSION' -r /tmp/capo_requirements_tpu.txt
python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count(), jax.devices()[0].device_kind)'
EOF
)
  on_all_workers "$script"
}

case "$ACTION" in
  create)
    create_vm
    sync_code
    install_env
    echo "ready: launch/run_multihost.sh $NAME -- python -m capo_jax.train --config configs/demo.py"
    ;;
  install) install_env ;;
  sync) sync_code ;;
  delete) gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet ;;
  *) usage ;;
esac
