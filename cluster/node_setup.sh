#!/usr/bin/env bash
# Prepares one node of a Ray cluster-launcher cluster (cluster/aws.yaml, cluster/gcp.yaml) for
# umask-trainer. The launcher runs it on every node, head and workers, from the copy of this
# repository it syncs to ~/umask-trainer (file_mounts). Idempotent: the launcher reruns it when a
# node restarts or `ray up` is run again. docs/cluster.md explains each step.
#
#   UMASK_SHARED_NFS=HOST:/EXPORT   the shared file system for features and runs (EFS, Filestore)
#   UMASK_SHARED_DIR=/mnt/shared    where it is mounted on every node
#   UMASK_TOKEN_COMMAND="..."       prints the Ray auth token, read from the cloud's secret store
#   UMASK_ACCEL=cuda|cpu            the fbgemm build cluster/install.sh installs (default: nvidia-smi decides)
#
# The token never enters the repository or the cluster YAML: it goes from the secret store to
# ~/.ray/auth_token (mode 600) on each node, where Ray reads it once RAY_AUTH_MODE=token is set.
set -euo pipefail

: "${UMASK_SHARED_NFS:?set UMASK_SHARED_NFS to the shared file system, HOST:/EXPORT}"
: "${UMASK_TOKEN_COMMAND:?set UMASK_TOKEN_COMMAND to the command that prints the Ray auth token}"
SHARED_DIR=${UMASK_SHARED_DIR:-/mnt/shared}
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=$HOME/venv

# 1. Python 3.11 (install.sh builds the venv with it) and the NFS client
if ! command -v python3.11 >/dev/null || ! command -v mount.nfs4 >/dev/null; then
  sudo apt-get update -q
  sudo apt-get install -y -q software-properties-common nfs-common
  if ! command -v python3.11 >/dev/null; then
    sudo add-apt-repository -y ppa:deadsnakes/ppa
    sudo apt-get update -q
    sudo apt-get install -y -q python3.11 python3.11-venv python3.11-dev
  fi
fi

# 2. Shared storage: the features (data.features) and the runs (ray.storage_path) live here
sudo mkdir -p "$SHARED_DIR"
if ! mountpoint -q "$SHARED_DIR"; then
  sudo mount -t nfs4 -o nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2 \
    "$UMASK_SHARED_NFS" "$SHARED_DIR"
fi
sudo chown "$(id -u):$(id -g)" "$SHARED_DIR"

# 3. The Ray auth token, from the secret store, readable by this user only
mkdir -p "$HOME/.ray"
( umask 077; bash -c "$UMASK_TOKEN_COMMAND" >"$HOME/.ray/auth_token.new" )
[ -s "$HOME/.ray/auth_token.new" ] || { echo "node_setup.sh: UMASK_TOKEN_COMMAND printed no token" >&2; exit 1; }
mv "$HOME/.ray/auth_token.new" "$HOME/.ray/auth_token"

# 4. Every later command of the launcher (ray start, ray job submit on the head) runs in a login
#    shell: give it the venv and token authentication
grep -q 'umask-trainer: ray env' "$HOME/.bashrc" 2>/dev/null || cat >>"$HOME/.bashrc" <<EOF
# umask-trainer: ray env (cluster/node_setup.sh)
export PATH="$VENV/bin:\$PATH"
export RAY_AUTH_MODE=token
EOF

# 5. The pinned stack, in the one order that works
bash "$REPO/cluster/install.sh" "$VENV"
