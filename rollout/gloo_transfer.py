"""A gloo backend for vLLM's weight-transfer protocol: the CPU route of the same push the GPUs make.

vLLM 0.32 ships `nccl` and `ipc` backends, and none runs on a CPU (they ask torch for an accelerator
device). This is the pair of engines a backend consists of, registered under "gloo" with both of
vLLM's factories (`register()`; the engine side runs inside vLLM's worker, which imports this module
through the worker extension, rollout/weight_sync.py; in a trainer rank, through its init info):

- `GlooWeightTransferEngine` (engine side): joins a process group with trainer rank 0 at rank
  `rank_offset + worker rank`, checks each round's names, shapes and dtypes against the running
  model before any byte moves, then receives tensor by tensor into vLLM's layer-wise reload.
- `GlooTrainerWeightTransferEngine` (trainer side): rank 0 drives start -> update -> finish through
  the client while it broadcasts the source's tensors, one at a time; other ranks only iterate the
  source, whose gathers are collectives.

The group is made with vLLM's `stateless_init_torch_distributed_process_group`, outside torch's
default group (the trainer's ZeRO-3 group), with a timeout, so a dead peer ends a push in bounded
time instead of hanging it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, ClassVar, Iterator

import torch
from vllm.distributed.weight_transfer.base import (ParamMeta, TrainerInitInfo, TrainerWeightTransferEngine,
                                                   VLLMWeightSyncClient, WeightSource, WeightTransferEngine,
                                                   WeightTransferInitInfo, WeightTransferUpdateInfo)

BACKEND = "gloo"


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """Trainer side: the group's rendezvous (trainer rank 0 hosts it) and size (1 + every engine worker)."""

    backend: ClassVar[str] = BACKEND

    master_address: str
    master_port: int
    world_size: int
    timeout_s: float = 600.0  # a peer silent this long fails the push


@dataclass
class GlooWeightTransferInitInfo(WeightTransferInitInfo):
    """Engine side: the same rendezvous, and the rank of this engine's first worker."""

    master_address: str
    master_port: int
    world_size: int
    rank_offset: int = 1
    timeout_s: float = 600.0


@dataclass
class GlooWeightTransferUpdateInfo(WeightTransferUpdateInfo):
    """One round: every parameter the trainer will send, in order."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]


def open_group(host: str, port: int, rank: int, world_size: int, timeout_s: float) -> Any:
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return stateless_init_torch_distributed_process_group(host, port, rank, world_size, backend="gloo",
                                                          timeout=timedelta(seconds=timeout_s))


def broadcast(group: Any, tensor: torch.Tensor) -> None:
    """Group rank 0's `tensor` into every member's (the group's own op: its ranks are its own)."""
    group.broadcast(tensor, 0).wait()


def agree(group: Any, ready: bool) -> bool:
    """Whether every member is ready for this round: a member that refuses it (an engine whose model
    does not match) would otherwise leave the others waiting in the first broadcast until the timeout."""
    flag = torch.tensor([int(ready)], dtype=torch.int32)
    options = torch.distributed.AllreduceOptions()
    options.reduceOp = torch.distributed.ReduceOp.MIN
    group.allreduce([flag], options).wait()
    return bool(flag.item())


class GlooWeightTransferEngine(WeightTransferEngine[GlooWeightTransferInitInfo, GlooWeightTransferUpdateInfo]):
    """Engine side: receive the trainer's tensors and load them layer by layer into the running model."""

    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = GlooWeightTransferUpdateInfo

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group: Any = None
        self.reloading = False  # layer-wise reload begun: the model's layers wait for their tensors

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        p = self.parallel_config
        rank = p.data_parallel_index * p.world_size + p.rank + init_info.rank_offset
        self.group = open_group(init_info.master_address, init_info.master_port, rank, init_info.world_size,
                                init_info.timeout_s)

    def start_weight_update(self) -> None:
        # The layer-wise reload starts in receive_weights, once the round is checked: started here, a
        # refused round would leave the layers on the meta device and the engine unable to generate.
        self.reloading = False

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # the base class ends with torch.accelerator.synchronize(); a CPU has nothing to wait for
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooWeightTransferUpdateInfo) -> None:
        from rollout.weight_names import WeightMismatchError

        if self.group is None:
            raise RuntimeError("gloo weight transfer not initialised: call init_weight_transfer_engine first")
        try:
            self._check(update_info)
            refusal = None
        except WeightMismatchError as exc:
            refusal = exc
        if not agree(self.group, refusal is None):
            raise refusal or WeightMismatchError("another engine refused this round's weights; none were loaded")
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)
        self.reloading = True
        for name, dtype_name, shape in zip(update_info.names, update_info.dtype_names, update_info.shapes):
            tensor = torch.empty(shape, dtype=getattr(torch, dtype_name))
            broadcast(self.group, tensor)
            self.model.load_weights([(name, tensor)])

    def _check(self, update_info: GlooWeightTransferUpdateInfo) -> None:
        """Names, shapes and dtypes against the running model's, before the first byte moves."""
        from rollout.weight_names import WeightMismatchError, check_shapes, expected_shapes

        expected, optional = expected_shapes(self.vllm_config)
        check_shapes({n: tuple(s) for n, s in zip(update_info.names, update_info.shapes)}, expected, optional)
        dtype = str(self.model_config.dtype).removeprefix("torch.")
        wrong = sorted({d for d in update_info.dtype_names if d != dtype})
        if wrong:
            raise WeightMismatchError(f"weights arrive as {', '.join(wrong)}; the engine runs {dtype}")

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        if self.reloading:
            finalize_layerwise_reload(self.model, self.model_config)
            self.reloading = False

    def shutdown(self) -> None:
        self.group = None


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Trainer side. Rank 0 broadcasts; every rank iterates the source (its gathers are collectives)."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client: VLLMWeightSyncClient, source: WeightSource, is_sender: bool) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.group: Any = None

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client: VLLMWeightSyncClient,
                     source: WeightSource | None = None) -> GlooTrainerWeightTransferEngine:
        if source is None:
            raise ValueError("the gloo weight transfer needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender)
        if not engine.is_sender:
            return engine
        worker_info = GlooWeightTransferInitInfo(init_info.master_address, init_info.master_port,
                                                 init_info.world_size, rank_offset=1, timeout_s=init_info.timeout_s)
        # the engines block in the rendezvous until rank 0 joins it: both at once
        with ThreadPoolExecutor(max_workers=1) as pool:
            joined = pool.submit(client.init_weight_transfer_engine, asdict(worker_info))
            engine.group = open_group(init_info.master_address, init_info.master_port, 0, init_info.world_size,
                                      init_info.timeout_s)
            joined.result()
        return engine

    def send_weights(self) -> None:
        meta = self.source.metadata()
        if not self.is_sender:
            for _ in self.source:  # the gathers are collectives: every rank walks them in step
                pass
            return
        update = GlooWeightTransferUpdateInfo(names=[m.name for m in meta],
                                              dtype_names=[str(m.dtype).removeprefix("torch.") for m in meta],
                                              shapes=[list(m.shape) for m in meta])
        self.client.start_weight_update()
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            # the engines receive while rank 0 sends: both sides meet inside each broadcast
            received = pool.submit(self.client.update_weights, asdict(update))
            if not agree(self.group, True):
                received.result()  # an engine refused the round before any byte moved: its error
                raise RuntimeError("an engine refused the weights")
            for _, tensor in checked(self.source, meta):
                try:
                    broadcast(self.group, tensor.contiguous())
                except RuntimeError as exc:  # a peer gone mid-push: the engine's own failure names it
                    raise engine_failure(received) or RuntimeError(f"weight broadcast failed: {exc}") from None
            received.result()
        finally:
            pool.shutdown(wait=False)  # a peer stuck in a broadcast never returns; the group is lost anyway
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        self.group = None


def engine_failure(received: Any, wait_s: float = 10.0) -> BaseException | None:
    """The engines' error from their side of a round (Ray reports a dead engine within seconds)."""
    try:
        received.result(timeout=wait_s)
    except Exception as exc:  # noqa: BLE001 (the error to report, whatever its type)
        return exc
    return None


def checked(source: WeightSource, meta: list[ParamMeta]) -> Iterator[tuple[str, torch.Tensor]]:
    """The source's tensors, each checked against what the engines were told to expect."""
    count = 0
    for name, tensor in source:
        expected = meta[count] if count < len(meta) else None
        if expected is None or (name, tensor.dtype, tuple(tensor.shape)) != (expected.name, expected.dtype,
                                                                              tuple(expected.shape)):
            raise ValueError(f"weight source yielded {name} {tensor.dtype} {tuple(tensor.shape)} at position "
                             f"{count}, but its metadata says {expected}")
        count += 1
        yield name, tensor
    if count != len(meta):
        raise ValueError(f"weight source yielded {count} tensors; its metadata lists {len(meta)}")


def register() -> None:
    """Register the pair under "gloo" with vLLM's engine-side and trainer-side factories."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    for factory, engine in ((WeightTransferEngineFactory, GlooWeightTransferEngine),
                            (WeightTransferTrainerFactory, GlooTrainerWeightTransferEngine)):
        try:
            factory.register_engine(BACKEND, engine)
        except ValueError:  # registered already (this module was imported again under another name)
            pass


# Importing this module is what registers it: in vLLM's worker (through rollout/weight_sync.py) and in
# a trainer rank (unpickling a GlooTrainerInitInfo imports it).
register()
