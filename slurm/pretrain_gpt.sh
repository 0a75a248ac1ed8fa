#!/bin/bash
# Pretrain a GPT with apollo_ds under Slurm: one task per GPU (or per CPU "device"), started by
# srun; apollo_ds/distributed.py turns SLURM_PROCID/NTASKS/LOCALID/JOB_NODELIST/JOB_ID into
# RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT itself.
#
#   CONFIG=configs/gpt2_small_apollo.yaml OVERRIDES="train.steps=2000 model.layers=6" \
#       sbatch slurm/pretrain_gpt.sh [more section.key=value overrides]
#
# Submit from the repository root (or set REPO). The #SBATCH lines below are defaults for one
# 8-GPU node; command-line options override them, e.g. 2 nodes x 4 GPUs:
#   sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 slurm/pretrain_gpt.sh
# and a CPU-only node with 2 ranks (gloo):
#   sbatch --ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 slurm/pretrain_gpt.sh
# Ranks are numbered node by node (srun's default block distribution), so with
# parallel.tp <= --ntasks-per-node each tensor-parallel group stays inside one node and only
# data-parallel (and pipeline) traffic crosses nodes; do not pass --distribution=cyclic.
#
# Environment knobs (sbatch exports the submitting shell's environment):
#   CONFIG       run preset YAML                               default configs/gpt2_small_apollo.yaml
#   OVERRIDES    space-separated section.key=value overrides (no spaces inside a value:
#                apollo.stages=[1,3,6]); arguments given to the script are appended
#   VENV         virtualenv to activate                        default $REPO/.venv when present
#   REPO         repository root                               default the submit directory
#   ACCELERATOR  cuda | cpu                                    default: cuda when nvidia-smi sees a GPU
#   SRUN_ARGS    extra srun options, e.g. "--label"
#   MASTER_ADDR, MASTER_PORT   override the rendezvous that distributed.py derives from the job
#
# Time limit: Slurm sends SIGUSR1 to every task 120 s before the limit (--signal=USR1@120).
# The trainer then finishes its step, writes a checkpoint and exits 0, and the job ends
# COMPLETED. Resubmitting the same command resumes from the newest checkpoint (a run that has
# already finished does nothing more), so long runs can be chained:
#   JID=$(sbatch --parsable slurm/pretrain_gpt.sh)
#   sbatch --dependency=afterok:$JID slurm/pretrain_gpt.sh
#
# Requeue (--requeue): `scontrol requeue <jobid>`, a preemption or a node failure puts the job
# back in the queue under the same id; on a requeue or preemption Slurm sends SIGTERM to every
# task, then SIGKILL after the site's KillWait (default 30 s). SIGTERM is handled like SIGUSR1 (finish the step, write a
# checkpoint); when Slurm starts the job again (SLURM_RESTART_COUNT=1, 2, ...) this script runs
# the same command, which resumes from the newest checkpoint: from the SIGTERM one, or from the
# newest periodic one (train.save_interval) if SIGKILL came first. Either way metrics.jsonl is
# cut back to the checkpoint's step, so every step is logged once. The log is appended
# (--open-mode=append), one block per start.
#
#SBATCH --job-name=apollo-gpt
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --signal=USR1@120
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
set -euo pipefail

die() { echo "pretrain_gpt.sh: error: $*" >&2; exit 2; }

[[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a Slurm job: submit with 'sbatch slurm/pretrain_gpt.sh'"

# sbatch runs a copy of this script from the spool folder, so find the repository explicitly.
if [[ -z ${REPO:-} ]]; then
    for cand in "${SLURM_SUBMIT_DIR:-}" "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)"; do
        if [[ -n $cand && -f $cand/apollo_ds/pretrain.py ]]; then REPO=$cand; break; fi
    done
fi
[[ -n ${REPO:-} && -f $REPO/apollo_ds/pretrain.py ]] \
    || die "cannot find the repository (apollo_ds/pretrain.py): submit from its root or set REPO"
cd "$REPO"

VENV=${VENV:-}
if [[ -z $VENV && -x $REPO/.venv/bin/python ]]; then VENV=$REPO/.venv; fi
if [[ -n $VENV ]]; then
    [[ -f $VENV/bin/activate ]] || die "VENV=$VENV has no bin/activate"
    # shellcheck disable=SC1091
    set +u; source "$VENV/bin/activate"; set -u
fi

CONFIG=${CONFIG:-configs/gpt2_small_apollo.yaml}
[[ -f $CONFIG ]] || die "CONFIG=$CONFIG not found (relative paths are from $REPO)"
read -r -a OVR <<<"${OVERRIDES:-}"

# Accelerator and communication defaults (explicit settings in the environment win).
if [[ -z ${ACCELERATOR:-} ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
        ACCELERATOR=cuda
    else
        ACCELERATOR=cpu
    fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1
case $ACCELERATOR in
    cuda)
        export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
        # fail fast (abort the job) on a collective error or timeout instead of hanging
        export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
        # keep kernel issue order (Megatron's recommendation for TP communication overlap)
        export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
        # site-specific, set them in your environment when needed:
        #   NCCL_SOCKET_IFNAME=ib0 / ^lo,docker   NCCL_IB_HCA=mlx5   NCCL_NET_GDR_LEVEL=...
        gpn=${SLURM_GPUS_ON_NODE:-}
        tpn=${SLURM_NTASKS_PER_NODE:-}
        tpn=${tpn%%(*}
        if [[ -n $gpn && -n $tpn && $gpn != "$tpn" ]]; then
            echo "pretrain_gpt.sh: warning: $tpn tasks per node but $gpn GPUs per node;" \
                 "use --ntasks-per-node equal to --gpus-per-node (one task per GPU)" >&2
        fi
        ;;
    cpu)
        export DS_ACCELERATOR=cpu      # DeepSpeed's CPU accelerator; torch.distributed uses gloo
        ;;
    *) die "ACCELERATOR=$ACCELERATOR: use cuda or cpu" ;;
esac

# Ranks come from srun (distributed.py); drop values a launcher may have left in the
# submitting shell so they cannot shadow SLURM_PROCID & co.
unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK

read -r -a EXTRA_SRUN <<<"${SRUN_ARGS:-}"
echo "pretrain_gpt.sh: job $SLURM_JOB_ID on ${SLURM_JOB_NODELIST:-?}: ${SLURM_NTASKS:-?} tasks" \
     "(${SLURM_NTASKS_PER_NODE:-?} per node), accelerator $ACCELERATOR, config $CONFIG," \
     "overrides: ${OVR[*]:-} $*"
if [[ ${SLURM_RESTART_COUNT:-0} -gt 0 ]]; then
    echo "pretrain_gpt.sh: requeued job, start $((SLURM_RESTART_COUNT + 1)): resuming from the newest checkpoint"
fi
echo "pretrain_gpt.sh: python $(command -v python), repo $REPO, started $(date -Is)"

# --mpi=none: ranks come from SLURM_* (no PMI needed), whatever the site's MpiDefault is.
# --kill-on-bad-exit: one failed rank ends the step instead of leaving the others hanging.
rc=0
srun --kill-on-bad-exit=1 --mpi=none "${EXTRA_SRUN[@]}" \
    python apollo_ds/pretrain.py --config "$CONFIG" "${OVR[@]}" "$@" || rc=$?
echo "pretrain_gpt.sh: srun exited $rc at $(date -Is)"
exit "$rc"
