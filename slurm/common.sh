# source "${GAD_HOME:-$SLURM_SUBMIT_DIR}/slurm/common.sh" "$@"      (in every slurm/*.sbatch)
# shellcheck shell=bash
#
# What the batch scripts share: their arguments (CONFIG.yaml, then any `gad` options such as
# --set key=value), the srun line that starts slurm/launch.sh on every node (optionally in a
# container), and preemption: on USR1 the job step is told to stop, and a stage that stopped
# early (non-zero exit after the signal) is requeued; the requeued job resumes (--resume).
#
# Environment: GAD_HOME (the repository; default: where sbatch was run), CONTAINER_IMAGE
# (pyxis: run every step in this image), CONTAINER_MOUNTS (default: the submit directory at
# the same path; add the run directory's file system when it lies outside), and launch.sh's.
set -euo pipefail

GAD_HOME=${GAD_HOME:-$SLURM_SUBMIT_DIR}
gad_config=${1:?usage: sbatch [options] slurm/<stage>.sbatch CONFIG.yaml [gad options]}
shift
gad_options=("$@")
[[ -f $gad_config ]] || { echo "error: config $gad_config not found (relative to $PWD)" >&2; exit 2; }

# Steps run in the submit directory, where relative paths in the config point.
gad_srun=(srun --ntasks-per-node=1 --kill-on-bad-exit=1)
if [[ -n ${CONTAINER_IMAGE:-} ]]; then
    gad_srun+=(--container-image="$CONTAINER_IMAGE" --container-mounts="${CONTAINER_MOUNTS:-$PWD:$PWD}"
               --container-workdir="$PWD")
fi

# gad_step GAD ARGS...: one job step, slurm/launch.sh with a `gad` command line on every node.
# It runs in the background and the script waits for it, because bash runs a trap only
# between commands: a foreground srun would hold the USR1 trap until it exits.
# On USR1 the trap passes the signal to srun, which delivers it to every process of the step.
gad_step() {
    local stop_asked=0 step_pid rc
    trap 'stop_asked=1; echo "$(date -Is) USR1: asking the step to checkpoint and stop"; kill -USR1 "$step_pid" || true' USR1
    "${gad_srun[@]}" "$GAD_HOME/slurm/launch.sh" "$@" &
    step_pid=$!
    while true; do
        rc=0
        wait "$step_pid" || rc=$?
        kill -0 "$step_pid" 2>/dev/null || break  # still running: the trap cut the wait short
    done
    trap - USR1
    if ((stop_asked && rc != 0)); then
        echo "$(date -Is) step stopped early (exit $rc): requeueing job $SLURM_JOB_ID"
        # Slurm ends this script and starts the job again later (SLURM_RESTART_COUNT + 1).
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$rc"
}

# gad_train STAGE: one training stage on every node of the job; --resume once requeued.
gad_train() {
    local resume=()
    ((${SLURM_RESTART_COUNT:-0} == 0)) || resume=(--resume)
    gad_step train --config "$gad_config" --stage "$1" "${resume[@]}" "${gad_options[@]}"
}
