"""train.py's processes: joining torchrun's process group and leaving it, each process's device and,
on the CPU, its allocator; and the FSDP shards' tensors, gathered whole for a checkpoint and cut again
from it for a resumed run.

A run started by torchrun (RANK in the environment) is one process per GPU (NCCL) or per CPU worker
(gloo); any other run is one process, rank 0 of 1, with no process group.
"""

import ctypes
import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor


def join_processes(device):
    """Join torchrun's process group, if torchrun started this process -> (distributed, rank, world,
    device): `cuda` becomes this process's own GPU, cuda:LOCAL_RANK."""
    distributed = "RANK" in os.environ  # started by torchrun
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if distributed else (0, 1)
    if distributed:
        if device == "cuda":
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return distributed, rank, world, device


def leave_processes():
    """Leave the process group once every process is done with it."""
    dist.barrier()  # no process tears its group down while another still uses it (gloo aborted, once)
    dist.destroy_process_group()


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the system.

    A CPU training step allocates and frees the same few-MB tensors every step; by default each
    fresh allocation comes from the system again and every page costs a fault (a third of the
    tiny default's time). Other C libraries: nothing to do.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from <malloc.h>
    libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)  # allocations up to 32 MiB come from the reusable heap
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # and the heap is never trimmed


def gathered(tensor, keep=True):
    """The whole tensor on the CPU (None unless keep). Under FSDP each process holds a shard of it
    and every process must take part in the gather."""
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.cpu() if keep else None


def sharded_like_params(optimizer_state, optimizer):
    """A saved (whole) optimizer state cut like the optimizer's parameters: under FSDP each process
    keeps its own shard of every tensor (cut from its local copy, no communication)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, state in optimizer_state["state"].items():
        p = params[i]
        if isinstance(p, DTensor):
            optimizer_state["state"][i] = {
                k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None) if v.dim() else v
                for k, v in state.items()}
    return optimizer_state
