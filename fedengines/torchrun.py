"""The torchrun engine: the sampled clients of each round spread over G processes (one per GPU; gloo on CPU).

    torchrun --standalone --nproc_per_node=G pretrain.py CONFIG [--key=value ...]

Every rank loads the data onto its own device and holds the same global state. In round r the active clients
(client order) are dealt round-robin: position i trains on rank i % G with `engine.Clients.update`, the
same client function the in-process engine calls. The server step then runs on every rank at once: for each
client in client order, its rank broadcasts the update and every rank folds it into the run's strategy. So
every rank ends the round with the same global state, bit-identical to the in-process run (an all-reduce of
fp64 sums would add in a different order and differ in the last bits). The price: each rank receives all K
updates (K model copies per round instead of an all-reduce's ~2), which is small next to local training.
Rank 0 alone logs, evaluates and writes last.pt. A stop signal on any rank is posted in the rendezvous store;
the others see it after their current step, all ranks agree at the end of the round's training, and all stop.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from engine import LostWorker
from federation import ClientUpdate
from local_update import Interrupted

STOP_KEY = "fssuavl/stop"


def launched() -> bool:
    """True in a process started by torchrun (or any launcher that sets the env:// rendezvous variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def local_device(device: torch.device) -> torch.device:
    """Under torchrun with CUDA, each rank takes the GPU of its LOCAL_RANK; otherwise `device` as it is."""
    if device.type == "cuda" and launched():
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
        return dev
    return device


def threads_per_rank(threads: int, device: torch.device) -> int:
    """run.threads is a process's CPU thread budget; under torchrun on CPU the LOCAL_WORLD_SIZE ranks of a machine
    split it (at least 1 each), so `--run.threads=2` with 2 ranks gives each rank 1 thread, not 4 on 2 cores."""
    if device.type == "cpu" and launched():
        return max(1, threads // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return threads


class Group:
    """This process's place in the torchrun job: NCCL between GPUs, gloo on CPU."""

    def __init__(self, device_type: str, timeout_s: float = 1800):
        self.cuda = device_type == "cuda"
        if self.cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if self.cuda else "gloo", timeout=timedelta(seconds=timeout_s))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.dev = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        try:  # the rendezvous store: a non-collective place to post a stop (no rank waits on it)
            self.store = dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001  (a private helper; without it a stop waits for the end of the round)
            self.store = None

    def broadcast_object(self, obj, src: int = 0):
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self.dev if self.cuda else None)
        return box[0]

    def any(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], device=self.dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        dist.barrier()

    def post_stop(self) -> None:
        if self.store is not None:
            self.store.set(STOP_KEY, "1")

    def stop_posted(self) -> bool:
        return self.store is not None and self.store.check([STOP_KEY])

    def engine(self, clients) -> "Torchrun":
        return Torchrun(clients, self)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _flatten(state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The state's tensors as one flat buffer per dtype, in key order."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for v in state.values():
        groups.setdefault(v.dtype, []).append(v.detach().reshape(-1))
    return [torch.cat(vs) for vs in groups.values()]


def _unflatten(bufs: list[torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    dtypes = list(dict.fromkeys(v.dtype for v in like.values()))
    offsets = {d: 0 for d in dtypes}
    bufmap = dict(zip(dtypes, bufs))
    out = {}
    for k, v in like.items():
        o, n = offsets[v.dtype], v.numel()
        out[k] = bufmap[v.dtype][o:o + n].view(v.shape)
        offsets[v.dtype] = o + n
    return out


class Torchrun:
    """The torchrun engine (engine.Engine), driven by pretraining.Pretraining like engine.InProcess."""

    def __init__(self, clients, group: Group):
        self.c, self.g = clients, group
        self.main = group.rank == 0
        self.template = {k: v.detach() for k, v in clients.model.state_dict().items()}

    def _should_stop(self, local) -> bool:
        if local is not None and local():
            self.g.post_stop()
            return True
        return self.g.stop_posted()

    def round(self, r, active, global_state, client_state, should_stop):
        """Train this rank's share of `active`, agree that no rank was stopped, then return fetch(cid): the
        client's update, broadcast from the rank that trained it (called by every rank, in client order)."""
        owner = {cid: i % self.g.world for i, cid in enumerate(active)}
        mine: dict[int, ClientUpdate] = {}
        stopped = False
        self.c.upcoming = [cid for cid in active if owner[cid] == self.g.rank]  # host/disk tiers: prefetch the next
        try:
            for cid in active:
                if owner[cid] == self.g.rank:
                    upd = self.c.update(global_state, cid, r, client_state.get(cid), lambda: self._should_stop(should_stop))
                    mine[cid] = ClientUpdate(cid, {k: v.detach().clone() for k, v in upd.state.items()}, upd.samples,
                                             upd.metrics)
        except Interrupted:
            stopped = True
        if self._collective(self.g.any, stopped):  # every rank reaches this once per round: nobody waits on a stopped one
            raise Interrupted

        def fetch(cid: int) -> ClientUpdate:
            return self._collective(receive, cid)

        def receive(cid: int) -> ClientUpdate:
            src = owner[cid]
            upd = mine.pop(cid, None)
            samples, metrics = self.g.broadcast_object(None if upd is None else (upd.samples, upd.metrics), src)
            bufs = _flatten(upd.state) if upd is not None else [
                torch.empty(sum(v.numel() for v in self.template.values() if v.dtype == d), dtype=d, device=self.c.device)
                for d in dict.fromkeys(v.dtype for v in self.template.values())]
            for b in bufs:
                dist.broadcast(b, src=src)
            return ClientUpdate(cid, _unflatten(bufs, self.template), samples, metrics)
        return fetch

    def stop_requested(self, local: bool) -> bool:
        return self._collective(lambda: self.g.any(local or self.g.stop_posted()))

    def _collective(self, fn, *args):
        """A collective of the round; a rank that died (killed, out of memory) makes it fail on the others: said as
        one LostWorker line instead of gloo's or NCCL's traceback."""
        try:
            return fn(*args)
        except (RuntimeError, ConnectionError) as e:  # DistBackendError / DistNetworkError are RuntimeErrors
            raise LostWorker(f"a torchrun rank was lost mid-round ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from e

    def close(self) -> None:
        pass
