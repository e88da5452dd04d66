"""Data-parallel training across Macs with MLX's own engine (mx.distributed, started by mlx.launch).

Every rank runs the same command. train.batch_size is the global batch: each global batch is cut
into one shard per rank (sequence i goes to rank i % world size), every rank computes the summed
token loss and gradients of its shard, and the sums are combined with mlx.nn.average_gradients
(times the world size) and all_sum of the token counts, so a step equals the single-process step
on the same global batch. Rank 0 alone writes (run directory, checkpoints, metrics, dashboard);
a resumed run's checkpoint is read by rank 0 and sent to the others, so only rank 0's Mac needs
the run directory. The model and the dataset must be at the same path on every Mac.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from mlx_gemma_tune.errors import UserError

LAUNCH_HINT = ("start it on every Mac with mlx.launch, e.g. mlx.launch --hostfile hosts.json -- "
               "mlx-gemma-tune train ... --distributed (README: Distributed training)")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    group: object = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


def init() -> World:
    """The world this process was launched into by mlx.launch; a clear error when there is none."""
    import mlx.core as mx

    if not mx.distributed.is_available():
        raise UserError("--distributed: this MLX build has no distributed backend", hint=LAUNCH_HINT)
    try:
        group = mx.distributed.init(strict=True)
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"--distributed: no distributed environment to join ({exc})", hint=LAUNCH_HINT) from None
    if group.size() < 2:
        raise UserError("--distributed: the world has a single process", hint=LAUNCH_HINT)
    return World(group.rank(), group.size(), group)


def describe() -> dict:
    """For `doctor`: the world this process belongs to (size 1 when not started by mlx.launch)."""
    import mlx.core as mx

    launched = "MLX_RANK" in os.environ
    info = {"available": bool(mx.distributed.is_available()), "launched": launched, "rank": 0, "size": 1}
    if info["available"] and launched:
        try:
            group = mx.distributed.init(strict=True)
            info.update(rank=group.rank(), size=group.size())
        except (RuntimeError, ValueError) as exc:
            info["error"] = str(exc)
    return info


def all_sum(x, world: World):
    import mlx.core as mx

    return mx.distributed.all_sum(x, group=world.group, stream=mx.cpu) if world.distributed else x


def barrier(world: World) -> None:
    """Returns once every rank has reached it."""
    import mlx.core as mx

    if world.distributed:
        mx.eval(all_sum(mx.array(1.0), world))


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank when `flag` is true on any (e.g. Ctrl-C reached one of them)."""
    import mlx.core as mx

    if not world.distributed:
        return flag
    return int(all_sum(mx.array(int(flag)), world).item()) > 0


def shard(items: list, world: World) -> list:
    """This rank's part of a global batch: items rank, rank + size, ..."""
    return items[world.rank::world.size]


def broadcast_bytes(data: bytes | None, world: World) -> bytes:
    """Rank 0's bytes on every rank (the others pass None)."""
    import mlx.core as mx
    import numpy as np

    if not world.distributed:
        return data or b""
    n = int(all_sum(mx.array(len(data) if world.main else 0), world).item())
    buf = mx.array(np.frombuffer(data, dtype=np.uint8)) if world.main else mx.zeros((n,), dtype=mx.uint8)
    return bytes(np.array(all_sum(buf, world)).tobytes()) if n else b""


def broadcast_json(value, world: World):
    """Rank 0's JSON-able value on every rank."""
    text = json.dumps(value).encode() if world.main else None
    return json.loads(broadcast_bytes(text, world).decode())


def broadcast_arrays(arrays: dict | None, world: World) -> dict:
    """Rank 0's flat {name: mx.array} on every rank, bit for bit (the others add zeros)."""
    import mlx.core as mx

    if not world.distributed:
        return arrays
    spec = broadcast_json({k: [list(v.shape), str(v.dtype).split(".")[-1]] for k, v in arrays.items()}
                          if world.main else None, world)
    out = {}
    for name, (shape, dtype) in spec.items():
        x = arrays[name] if world.main else mx.zeros(shape, dtype=getattr(mx, dtype))
        out[name] = all_sum(x, world)
    mx.eval(out)
    return out
