"""What a training step asks of the device, op by op: how many operations run (each non-view op
is about one kernel launch, which is what bounds a small model's step on a GPU) and which of them
wait for the device (host syncs: a value copied to the host, or an output sized from the data).
A step with a host sync cannot run ahead of Python or be captured in a CUDA graph.

``OpCounter`` is a ``TorchDispatchMode``: it sees the ops below autograd and vmap, the ones the
device actually runs, on any device (the CPU included), so these counts are checked by the
tests and printed by ``bench/gpu.py`` without a GPU.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# profiler markers (the optimisers' record_function): dispatched, but no work on the device
MARKERS = frozenset({"_record_function_enter_new", "_record_function_exit"})
# ops that copy a value to the host or size their output from the data
HOST_SYNC = frozenset(
    {
        "_local_scalar_dense",
        "item",
        "nonzero",
        "bincount",
        "masked_select",
        "unique_dim",
        "_unique2",
        "boolean-mask index",
    }
)


class OpCounter(TorchDispatchMode):
    """Records every op dispatched inside ``with OpCounter() as ops:``."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        ):
            name = "boolean-mask index"
        if _is_view(func):
            self.views += 1
        elif name not in MARKERS:
            self.names.append(name)
        return func(*args, **(kwargs or {}))

    @property
    def kernels(self) -> int:
        """Non-view ops: about one kernel launch each."""
        return len(self.names)

    @property
    def host_syncs(self) -> list[str]:
        return [n for n in self.names if n in HOST_SYNC]


def _is_view(func) -> bool:
    """An op that returns an alias of its input without writing it (view, select, expand...):
    no kernel runs. In-place and out= ops alias too, but write: they do run one."""
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
