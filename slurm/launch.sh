#!/usr/bin/env bash
# srun --ntasks-per-node=1 slurm/launch.sh train --config my.yaml --stage gad
#
# Run by srun from the slurm/*.sbatch scripts (see slurm/common.sh), one task per node; the
# arguments are a `gad` command line. Starts this node's share of the job: torchrun with
# GPUS_PER_NODE processes that meet in a c10d rendezvous on the allocation's first node, or a
# single plain process when the whole job is one process (collect, generate, eval).
# Output goes to <run_dir>/logs/<job name>-<job id>-<node>.log, appended across requeues.
#
# Environment (all optional): GPUS_PER_NODE (default: the GPUs Slurm gave this node, else 1),
# MASTER_PORT, PYTHON (default python), OMP_NUM_THREADS, NCCL_* / GLOO_SOCKET_IFNAME.
set -euo pipefail

# Slurm delivers the job's USR1 to every process of the step. A training stage's workers act on
# it (gad_megatron.preemption: checkpoint, stop); this shell and torchrun must outlive them, so
# they ignore it and pass the ignore on (a signal that comes before a worker installs its handler
# is lost, not fatal). Other commands die of it; requeued, they resume from what they saved.
if [[ ${1:-} == train ]]; then
    trap '' USR1
fi

: "${SLURM_JOB_ID:?run me with srun inside a Slurm job}"
python=${PYTHON:-python}
nnodes=${SLURM_NNODES:-1}
procs=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}

run_dir=$("$python" "$(dirname "$0")/run_info.py" run-dir "$@")
node=${SLURMD_NODENAME:-$(hostname -s)}
mkdir -p "$run_dir/logs"
log="$run_dir/logs/${SLURM_JOB_NAME:-gad}-${SLURM_JOB_ID}-${node}.log"
echo "launch.sh on $node: $* (log: $log)"
exec >>"$log" 2>&1
echo "=== $(date -Is) job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} node $node: $*"

# Threads: the node's CPUs shared by its processes (torchrun would pin everything to 1 thread).
cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus / procs > 0 ? cpus / procs : 1))}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}  # forked workers + Rust threads deadlock
# A collective that hangs (a dead peer) raises after its timeout instead of holding the job forever.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Megatron's tensor-parallel communication overlap requires a single CUDA work queue.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

if ((nnodes * procs == 1)); then
    exec "$python" -m gad_megatron.cli "$@"
fi

# The address Slurm itself uses for a node (NodeAddr; the host name on most clusters).
node_addr() { timeout 30 scontrol show node "$1" | grep -oP 'NodeAddr=\K\S+'; }
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
master_addr=$(node_addr "${hosts[0]}")
local_addr=$(node_addr "$node")
# Every node derives the same port from the job id, without talking to the others.
port=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
# torchrun, from $PYTHON's environment. The first node hosts the rendezvous store (is_host),
# said outright rather than guessed from host names; --local-addr is what the other nodes'
# workers dial to reach this node's.
exec "$python" -m torch.distributed.run \
    --nnodes "$nnodes" --nproc-per-node "$procs" --max-restarts 0 \
    --rdzv-backend c10d --rdzv-id "$SLURM_JOB_ID" --rdzv-endpoint "$master_addr:$port" \
    --rdzv-conf "is_host=$((SLURM_NODEID == 0))" --local-addr "$local_addr" \
    -m gad_megatron.cli "$@"
