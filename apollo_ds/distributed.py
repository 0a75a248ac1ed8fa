"""Process start-up: rank discovery (DeepSpeed launcher, torchrun, srun, mpirun), the
torch.distributed backend, megatron-core's TP/PP/DP groups, and the adapter DeepSpeed needs to
see those groups."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import torch

from apollo_ds.model import cpu_compat


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    tp: int
    pp: int
    dp: int
    dp_rank: int
    tp_rank: int


def _slurm_env() -> None:
    """srun starts one task per GPU without setting torch's variables: derive them."""
    if "SLURM_PROCID" not in os.environ or "RANK" in os.environ:
        return
    if "OMPI_COMM_WORLD_RANK" in os.environ or "PMI_RANK" in os.environ:
        return  # mpirun inside an allocation: DeepSpeed's MPI discovery handles it
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST", "localhost")
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodes], check=True,
                                 capture_output=True, text=True).stdout.split()
            os.environ["MASTER_ADDR"] = out[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            os.environ["MASTER_ADDR"] = nodes.split(",")[0]
    # One port per job, so two jobs sharing a node do not collide.
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", 0)) % 20000))


class MegatronMPU:
    """DeepSpeed's ``mpu`` protocol over megatron-core's parallel_state. DeepSpeed's "model
    parallel" is Megatron's tensor parallel; ZeRO then partitions over the DP group only."""

    @staticmethod
    def _ps():
        from megatron.core import parallel_state
        return parallel_state

    def get_model_parallel_rank(self):
        return self._ps().get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self._ps().get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self._ps().get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self):
        return self._ps().get_tensor_model_parallel_src_rank()

    def get_data_parallel_rank(self):
        return self._ps().get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self._ps().get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self._ps().get_data_parallel_group()

    def get_pipeline_model_parallel_world_size(self):
        return self._ps().get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_rank(self):
        return self._ps().get_pipeline_model_parallel_rank()


def init(tp: int = 1, pp: int = 1) -> Dist:
    on_cpu = cpu_compat.apply()
    _slurm_env()
    import deepspeed
    from megatron.core import parallel_state

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl",
                                   auto_mpi_discovery=True, verbose=False,
                                   # MPI discovery would otherwise always pick port 29500
                                   distributed_port=int(os.environ.get("MASTER_PORT", 29500)))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if on_cpu:
        device = torch.device("cpu")
    else:
        # with --gpus-per-task=1 each task sees one device
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if world % (tp * pp) != 0:
        raise SystemExit(f"error: world size {world} is not a multiple of parallel.tp*parallel.pp"
                         f"={tp * pp}; launch tp*pp*dp processes")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                                 pipeline_model_parallel_size=pp)
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device, tp=tp, pp=pp,
                dp=parallel_state.get_data_parallel_world_size(),
                dp_rank=parallel_state.get_data_parallel_rank(),
                tp_rank=parallel_state.get_tensor_model_parallel_rank())


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
