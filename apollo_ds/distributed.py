"""Process start-up and teardown: rank discovery (DeepSpeed launcher, torchrun, srun, mpirun),
the accelerator and device of this rank, the torch.distributed backend, megatron-core's
TP/PP/DP groups, the adapter DeepSpeed needs to see those groups, and the one helper every
host-side reduction goes through (so no CPU tensor ever reaches an NCCL group)."""
from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
from dataclasses import dataclass

import torch

from apollo_ds import cpu_compat


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
    pp_rank: int = 0

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"


def _first_node_addr(nodelist: str) -> str:
    """An address of the job's first node. Its name when that resolves; otherwise the NodeAddr
    Slurm itself reaches it by (emulated nodes, e.g. slurm/local_cluster.sh's node1/node2, and
    sites whose node names are not in DNS)."""
    try:
        first = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                               capture_output=True, text=True).stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        m = re.match(r"([^,\[]+)(?:\[(\d+))?", nodelist)   # "node[1-2],gpu7" -> "node1"
        return m.group(1) + (m.group(2) or "") if m else nodelist
    try:
        socket.getaddrinfo(first, None)
        return first
    except OSError:
        pass
    try:
        out = subprocess.run(["scontrol", "show", "node", first, "-o"], check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return first
    m = re.search(r"\bNodeAddr=(\S+)", out)
    return m.group(1) if m else first


def _slurm_env() -> None:
    """srun starts one task per GPU without setting torch's variables: derive them. srun's
    default (block) distribution numbers the tasks node by node, so megatron's TP groups
    (consecutive ranks) lie inside a node; a cyclic distribution would spread them."""
    if "SLURM_PROCID" not in os.environ or "RANK" in os.environ:
        return
    if "OMPI_COMM_WORLD_RANK" in os.environ or "PMI_RANK" in os.environ:
        return  # mpirun inside an allocation: MPI discovery handles it
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _first_node_addr(os.environ.get("SLURM_JOB_NODELIST",
                                                                    "localhost"))
    # One port per job, so two jobs sharing a node do not collide.
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", 0)) % 20000))


def device_index(local_rank: int, visible: int) -> int:
    """CUDA device of a rank: with one visible device per task (``--gpus-per-task=1``) it is
    device 0 whatever LOCAL_RANK says; with several, LOCAL_RANK picks one of them."""
    if visible < 1:
        raise RuntimeError("CUDA is available but no device is visible (CUDA_VISIBLE_DEVICES)")
    return local_rank % visible


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


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _discover_env() -> None:
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* from srun or mpirun when no torch-style
    launcher set them (mpi4py). The rendezvous port is MASTER_PORT when given, else one that
    is free on rank 0's host (agreed over MPI): a fixed 29500 fails when another job holds it."""
    _slurm_env()
    needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
    if torch.distributed.is_initialized() or all(v in os.environ for v in needed):
        return
    if os.environ.get("WORLD_SIZE") == "1" and "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())   # one process told its world, no port
        if all(v in os.environ for v in needed):
            return
    from deepspeed.comm.comm import mpi_discovery
    from mpi4py import MPI
    port = os.environ.get("MASTER_PORT")
    if not port:
        comm = MPI.COMM_WORLD
        port = comm.bcast(free_port() if comm.Get_rank() == 0 else None, root=0)
    mpi_discovery(distributed_port=int(port), verbose=False)


def _init_process_group(on_cpu: bool, device: torch.device,
                        timeout_minutes: float | None = None) -> None:
    """torch.distributed first, then DeepSpeed's comm layer on top of it. Initialising it here
    (not in deepspeed.init_distributed) binds NCCL to *this rank's* device: DeepSpeed would bind
    cuda:LOCAL_RANK, which does not exist when each task sees a single GPU."""
    import deepspeed
    backend = "gloo" if on_cpu else "nccl"
    if not torch.distributed.is_initialized():
        kwargs = {}
        if timeout_minutes:
            # a backstop for collectives waiting on a dead peer: the watchdog (training/
            # watchdog.py) ends a stalled step after train.dist_timeout_minutes with one line;
            # start-up (one rank building a data index while the others wait) gets longer
            kwargs["timeout"] = datetime.timedelta(minutes=2 * timeout_minutes + 5)
        if not on_cpu and int(os.environ.get("WORLD_SIZE", 1)) > 1:
            kwargs["device_id"] = device
        torch.distributed.init_process_group(backend, **kwargs)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def init(tp: int = 1, pp: int = 1, seed: int = 0, *,
         timeout_minutes: float | None = None) -> Dist:
    on_cpu = cpu_compat.apply()
    _discover_env()
    from megatron.core import parallel_state

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if on_cpu:
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", device_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    _init_process_group(on_cpu, device, timeout_minutes)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if world % (tp * pp) != 0:
        raise SystemExit(f"error: world size {world} is not a multiple of parallel.tp*parallel.pp"
                         f"={tp * pp}; launch tp*pp*dp processes")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                                 pipeline_model_parallel_size=pp)
    # Seed the default generator and megatron-core's model-parallel RNG tracker before any
    # model exists: a forward with dropout on (the priming step of a reshaped resume) forks the
    # tracker and fails on an unseeded one. The Trainer reseeds both from train.seed before
    # every step, so this value only feeds forwards that precede the first step.
    from megatron.core import tensor_parallel
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device, tp=tp, pp=pp,
                dp=parallel_state.get_data_parallel_world_size(),
                dp_rank=parallel_state.get_data_parallel_rank(),
                tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                pp_rank=parallel_state.get_pipeline_model_parallel_rank())


def comm_device(group=None) -> torch.device:
    """Where tensors for a collective on ``group`` must live: the current CUDA device for NCCL,
    the CPU for gloo."""
    backend = torch.distributed.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values, op: str = "sum", group=None, dtype=torch.float64) -> torch.Tensor:
    """All-reduce a tensor or a list of numbers/0-d tensors on the device ``group``'s backend
    accepts; returns the reduced tensor (on that device: read it with one ``.tolist()``)."""
    dev = comm_device(group)
    if torch.is_tensor(values):
        t = values.detach().to(dev, dtype)
    else:
        # stacked where the device values live, then one copy: a CUDA run reducing over gloo
        # waits for the device once, not once per value
        src = next((v.device for v in values if torch.is_tensor(v)), dev)
        t = torch.stack([v.detach().to(src, dtype).reshape(()) if torch.is_tensor(v)
                         else torch.tensor(float(v), dtype=dtype, device=src)
                         for v in values]).to(dev)
    ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
           "min": torch.distributed.ReduceOp.MIN}
    torch.distributed.all_reduce(t, op=ops[op], group=group)
    return t


def all_gather_tensor(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    """All-gather equally shaped tensors on the device ``group``'s backend accepts; the parts
    come back on ``t``'s device."""
    dev = comm_device(group)
    src = t.detach().to(dev).contiguous()
    parts = [torch.empty_like(src) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, src, group=group)
    return [p.to(t.device) for p in parts]


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def shutdown() -> None:
    """Leave together and tear the process groups down before the interpreter exits: a
    process group destroyed by the interpreter's own teardown, while a peer still talks to
    it, aborts the process ('terminate called without an active exception', SIGABRT)."""
    if not torch.distributed.is_initialized():
        return
    try:
        torch.distributed.barrier()
    finally:
        from megatron.core import parallel_state
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()
