"""Device, precision, seeding and data parallelism shared by every stage that trains or infers.

Data parallelism (DDP): launched by `torchrun`, which sets WORLD_SIZE, RANK and LOCAL_RANK, every
process joins one process group (NCCL on CUDA, gloo on the CPU) the first time a stage asks for
its device, and leaves it at exit. Without those variables everything here is a no-op: rank 0
of a world of 1.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import random
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from aepsl.config import Config
from aepsl.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
T = TypeVar("T")


# ------------------------------------------------------------------ CPU threads


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may run on: its affinity mask (taskset, a scheduler's cpuset),
    capped by its cgroup's CPU quota (a container given 2 CPUs of a 64-core host sees all 64 in
    its mask, and torch would start 64 threads)."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        count = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup)
    return max(1, min(count, int(quota))) if quota else count


def cgroup_cpu_quota(cgroup: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time the cgroup allows (cgroup v2 cpu.max, v1 cfs quota / period), or
    None when unlimited or unknown."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


_threads_configured = False


def process_cpus() -> int:
    """This process's share of the usable CPUs: the machine's torchrun processes
    (LOCAL_WORLD_SIZE) share them."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, usable_cpus() // local)


def loader_workers(config: Config) -> int:
    """data.num_workers, `auto` resolved: none on the CPU (its cores run the network), on a GPU
    this process's CPUs less one for itself, since there the loader is what the GPU waits on."""
    if config.data.num_workers != "auto":
        return config.data.num_workers
    return max(0, process_cpus() - 1) if wants_cuda(config) else 0


def labels_workers(config: Config, images: int) -> int:
    """labels.workers, `auto` resolved: this process's CPUs, at most one per
    LABELS_IMAGES_PER_WORKER images (a worker's start costs about what that many images do)."""
    if config.labels.workers != "auto":
        return config.labels.workers
    return max(1, min(process_cpus(), images // LABELS_IMAGES_PER_WORKER))


LABELS_IMAGES_PER_WORKER = 50


def crf_workers(config: Config) -> int:
    """crf.workers, `auto` resolved to this process's CPUs."""
    return process_cpus() if config.crf.workers == "auto" else config.crf.workers


def configure_threads(num_workers: int = 0) -> int:
    """torch's threads: the usable CPUs shared by the processes of this machine's torchrun job
    (LOCAL_WORLD_SIZE) less the DataLoader workers (one thread each), unless OMP_NUM_THREADS
    chose. Once per process; says in one line when the machine is already loaded, since torch's
    threads stall when another process holds a core. Returns the thread count."""
    global _threads_configured
    if _threads_configured or "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    _threads_configured = True
    cpus = usable_cpus()
    threads = max(1, process_cpus() - num_workers)
    torch.set_num_threads(threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > cpus + 0.5 and os.environ.get("RANK", "0") == "0":
        print(
            f"note: the machine is busy (load {load:.1f} on {cpus} usable CPUs): torch's threads "
            "stall when another process holds a core; run one heavy job at a time, give each its "
            "own cores (OMP_NUM_THREADS=1 taskset -c N aepsl ...), or let idle threads sleep "
            "(OMP_WAIT_POLICY=PASSIVE aepsl ...)"
        )
    return threads


# ------------------------------------------------------------------ data parallelism


def launched_by_torchrun() -> bool:
    return all(key in os.environ for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))


def distributed() -> bool:
    """True inside an initialised process group (a `torchrun` launch)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if distributed():
        dist.barrier()


def _init_distributed(config: Config) -> None:
    """Join the process group once: NCCL with one GPU per process, else gloo on the CPU."""
    if distributed() or not launched_by_torchrun():
        return
    cuda = config.device != "cpu" and torch.cuda.is_available()
    if cuda:
        local, count = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local >= count:
            raise UserError(
                f"torchrun started more processes on this machine than its {count} GPU(s); "
                f"use --nproc_per_node {count} or fewer"
            )
        torch.cuda.set_device(local)
    # Long collective timeout: the other ranks wait while rank 0 alone builds the pseudo labels.
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(hours=2))
    atexit.register(_teardown)
    if not is_main():  # one copy of the progress lines and tables (errors still go to stderr)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - closed by _teardown


def _teardown() -> None:
    if sys.stdout is not sys.__stdout__ and getattr(sys.stdout, "name", "") == os.devnull:
        sys.stdout.close()
        sys.stdout = sys.__stdout__
    if distributed():
        dist.destroy_process_group()


def wants_cuda(config: Config) -> bool:
    """`device` is cuda, or auto on a machine with a GPU."""
    return config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())


def select_device(config: Config) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is available; set device=cpu or auto")
    _init_distributed(config)
    configure_threads(loader_workers(config))
    cuda = wants_cuda(config)
    if cuda and distributed():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cuda" if cuda else "cpu")


def per_rank_batch(batch_size: int, key: str) -> int:
    """`batch_size` (the global batch, over all ranks) divided among the ranks."""
    world = world_size()
    if batch_size % world:
        raise UserError(
            f"{key}={batch_size} is the global batch and must be divisible by the number of "
            f"processes ({world}); choose a multiple of {world}"
        )
    return batch_size // world


def shard_batches(order: list[int], batch_size: int, rank: int, world: int) -> list[int]:
    """This rank's share of every complete global batch of `order` (batch_size / world items
    each, rank r taking the r-th slice); a last incomplete batch is dropped. One rank: `order`."""
    if world == 1:
        return order
    per = batch_size // world
    complete = len(order) - len(order) % batch_size
    return [
        index
        for start in range(0, complete, batch_size)
        for index in order[start + rank * per : start + (rank + 1) * per]
    ]


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn(*args, **kwargs)` on rank 0 only (e.g. to claim or write a shared file); every
    rank returns its (picklable) result once rank 0 is done, so this is also a barrier."""
    result = fn(*args, **kwargs) if is_main() else None
    if distributed():
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result  # type: ignore[return-value]


def all_gather(obj: T) -> list[T]:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over the ranks (a copy; on the tensor's device), no-op otherwise."""
    if not distributed():
        return tensor
    device = tensor.device
    work = tensor.detach().clone()
    if dist.get_backend() == "nccl" and device.type != "cuda":
        work = work.cuda()
    dist.all_reduce(work)
    return work.to(device)


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` (already on `device`) wrapped for DDP, its batch norms synchronised over the ranks
    so they normalise with the global batch's statistics; unchanged with one process."""
    if world_size() == 1:
        return model
    if device.type == "cuda":
        model = _convert_sync_batchnorm(model)
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    _sync_cpu_batchnorms(model)  # nn.SyncBatchNorm runs on GPUs only
    return nn.parallel.DistributedDataParallel(model)


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with a gradient: each rank's input gets the sum of all ranks' gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class _CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d with the batch statistics of all ranks (gloo), for CPU runs: the mean and
    variance are all-reduced by a differentiable sum, so gradients flow across ranks as in
    nn.SyncBatchNorm. Same parameters and buffers, so state dicts are unchanged."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and distributed()):
            return super().forward(input)
        all_reduce = _SumOverRanks.apply
        dims = [0, 2, 3]
        local = torch.tensor(float(input.numel() // input.shape[1]), device=input.device)
        count = all_reduce_sum(local)
        mean = all_reduce(input.sum(dims)) / count
        centred = input - mean[None, :, None, None]
        var = all_reduce((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum
                if m is None:  # cumulative moving average
                    m = 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * count / (count - 1).clamp(min=1)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        out = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out


def _convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """nn.SyncBatchNorm for every batch norm; timm's (efficientnet_lite0) fuse BN with its
    activation, which torch's conversion would silently drop, so timm converts those."""
    if any(type(m).__module__.startswith("timm.") for m in model.modules()):
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(model)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


class _CpuSyncBatchNormAct(_CpuSyncBatchNorm):
    """_CpuSyncBatchNorm for timm's BatchNormAct2d (efficientnet_lite0): the same batch norm,
    then the module's own `drop` and `act` (ReLU6), as BatchNormAct2d.forward does."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(input)))


def _sync_cpu_batchnorms(model: nn.Module) -> None:
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = _CpuSyncBatchNorm
        elif _is_timm_bn_act(module):
            module.__class__ = _CpuSyncBatchNormAct


def _is_timm_bn_act(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "BatchNormAct2d" and cls.__module__.startswith("timm.")


class _NoWriter:
    """Stands in for a SummaryWriter on ranks other than 0."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def summary_writer(log_dir: str) -> Any:
    """A tensorboard SummaryWriter on rank 0; elsewhere one that writes nothing."""
    if not is_main():
        return _NoWriter()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir)


# ------------------------------------------------------------------ device and precision


@functools.cache  # asked at every autocast; the answer is fixed for the process
def cpu_has_fast_bf16() -> bool:
    """True where oneDNN runs bf16 in hardware (AVX-512 / AMX). Elsewhere bf16 is emulated and
    far slower than fp32: on an AVX2-only AMD EPYC a bf16 matmul ran at 0.3 GFLOP/s against
    79 GFLOP/s in fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def effective_precision(config: Config) -> str:
    """`config.precision` with `auto` resolved for the device `config.device` selects: bf16 on a
    GPU that has it (else fp16) and on a CPU with bf16 hardware, fp32 on other CPUs."""
    if config.precision != "auto":
        return config.precision
    if wants_cuda(config):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def check_precision(config: Config, device: torch.device) -> None:
    if config.precision == "fp16" and device.type != "cuda":
        raise UserError("precision=fp16 needs CUDA; use auto, bf16 or fp32 on the CPU")


def grad_scaler(config: Config, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling, needed by fp16 alone."""
    return torch.amp.GradScaler(device.type, enabled=effective_precision(config) == "fp16")


@contextlib.contextmanager
def autocast(config: Config, device: torch.device) -> Iterator[None]:
    """Mixed precision for the forward pass as `effective_precision` says (fp32: none)."""
    precision = effective_precision(config)
    if precision == "fp32":
        yield
        return
    with torch.autocast(device.type, dtype=DTYPES[precision]):
        yield


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_rank(seed: int) -> None:
    """seed_everything(seed) on rank 0; a different stream on every other rank, so that what
    still draws from the global generators (dropout) is not repeated across ranks."""
    seed_everything(seed + 7919 * rank())


def prepare_model(model: torch.nn.Module, config: Config, device: torch.device) -> torch.nn.Module:
    """Move to `device`, in channels-last layout when set (faster convolutions, esp. bf16)."""
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def to_device(images: torch.Tensor, config: Config, device: torch.device) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    if config.channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images
