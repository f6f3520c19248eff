"""CUDA graphs for the training step: the whole step of a trial or a pack (augmentation, forward,
joint loss, backward, optimiser update) captured once per batch shape and replayed, so that the
host launches one graph a step instead of about a thousand kernels (PyTorch's
``torch.cuda.graph``; the step never waits for the device, ``fermodel.ops``).

No GPU has run this project before its first user's, so a trial checks its graphs before it
trusts them: ``GraphedStep.check`` trains a few steps eagerly and the same steps from the graph,
from the same state, and compares the losses and the weights; on an error or a mismatch the
trial trains eagerly and its notes say why. Whatever the check and the capture's warm-up
trained is undone in place (weights, BatchNorm statistics, Island centers, optimiser state,
random generators), so a checked trial trains exactly the steps it would have trained eagerly.

The capture is an argument: ``CudaCapture`` on CUDA, and ``EagerCapture``, which replays by
calling the step, where a test on the CPU exercises the check, the fallback and the restoring.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

WARMUP = 3  # eager steps before a capture: cuDNN picks its kernels, the optimiser its state
CHECK_STEPS = 2  # steps compared between eager and graph at a trial's start
TOLERANCE = 1e-3  # relative: losses and weights after CHECK_STEPS steps


class CudaCapture:
    """Captures a step as a CUDA graph after a warm-up on a side stream."""

    def __init__(self, device: torch.device, generators: list[torch.Generator]):
        self.device, self.generators = device, generators

    def __call__(self, step: Callable[[], tuple]) -> Callable[[], tuple]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:  # the members' augmentation streams advance per replay
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph):
            outputs = step()

        def replay() -> tuple:
            graph.replay()
            return outputs

        return replay


class EagerCapture:
    """The CPU twin of ``CudaCapture``: the same warm-up, and a replay that runs the step."""

    def __call__(self, step: Callable[[], tuple]) -> Callable[[], tuple]:
        for _ in range(WARMUP):
            step()
        return step


class Snapshot:
    """Every tensor a training step changes, copied, and put back in place by ``restore`` (the
    graph keeps pointing at the same tensors); optimiser state that appears later (the first
    step creates it) is zeroed, which is how a fresh optimiser starts."""

    def __init__(self, tensors: Callable[[], list[torch.Tensor]], generators: list):
        self.tensors, self.generators = tensors, generators
        self.saved = {id(t): (t, t.detach().clone()) for t in tensors()}
        self.states = [g.get_state() for g in generators]
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    @torch.no_grad()
    def restore(self) -> None:
        """Puts the state back; raises RuntimeError when a generator refuses its state (a CUDA
        generator once registered with a graph may), after restoring everything else."""
        for t in self.tensors():
            if id(t) in self.saved:
                t.copy_(self.saved[id(t)][1])
            else:
                t.zero_()
        refused = []
        for generator, state in zip(self.generators, self.states, strict=True):
            try:
                generator.set_state(state)  # in place: a graph that registered it keeps it
            except RuntimeError as err:
                refused.append(str(err).splitlines()[0])
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        if refused:
            raise RuntimeError(f"an augmentation generator refused its saved state: {refused[0]}")


class GraphedStep:
    """A training step (``fermodel.engine``'s, alone or packed) replayed from graphs captured
    by ``capture``, one per batch shape (an epoch's last batch may be smaller)."""

    def __init__(self, step, members: list, capture):
        self.step, self.members, self.capture = step, members, capture
        self.generators = [m.augment_gen for m in members]
        self.replays: dict[tuple, tuple] = {}

    def train(self) -> None:
        self.step.train()

    def drop(self, k: int) -> None:
        # the graph steps a diverged member on with the others (its own weights only); its
        # results are no longer read
        self.step.drop(k)

    def __call__(self, idx: torch.Tensor):
        key = tuple(idx.shape)
        if key not in self.replays:
            self.replays[key] = self._capture(idx)
        static, replay = self.replays[key]
        static.copy_(idx)
        return replay()

    def _capture(self, idx: torch.Tensor):
        saved = self.snapshot()
        static = idx.clone()
        replay = self.capture(lambda: self.step(static))
        saved.restore()  # the warm-up's steps did not happen
        return static, replay

    def snapshot(self) -> Snapshot:
        return Snapshot(lambda: state_tensors(self.members, self.step), self.generators)

    def check(self, batches: list[torch.Tensor]) -> str | None:
        """Train ``batches`` eagerly, then from the graph, from the same state; None when
        they agree within ``TOLERANCE``, else why not. The state is put back either way."""
        saved = self.snapshot()
        failed = None
        try:
            eager = [self.step(b)[2].detach().clone() for b in batches]
            eager_weights = _weights(self.members)
            saved.restore()
            graphed = [self(b)[2].detach().clone() for b in batches]
            graph_weights = _weights(self.members)
        except Exception as err:  # a capture that fails: the trial trains eagerly
            failed = f"capturing the step failed ({type(err).__name__}: {str(err)[:200]})"
        try:  # once, whatever happened above
            saved.restore()
        except RuntimeError as err:
            failed = failed or str(err)
        if failed:
            return failed
        for step, (a, b) in enumerate(zip(eager, graphed, strict=True), 1):
            if not torch.allclose(a, b, rtol=TOLERANCE, atol=1e-6):
                return (
                    f"the graph's losses differ from eager ones at step {step} "
                    f"({a.tolist()} against {b.tolist()})"
                )
        drift = ((eager_weights - graph_weights).norm() / eager_weights.norm()).item()
        if not drift <= TOLERANCE:
            return f"the graph's weights differ from eager ones by {drift:.2e} (relative)"
        return None


def state_tensors(members: list, step) -> list[torch.Tensor]:
    """What a training step changes and the next one reads: weights, buffers (BatchNorm
    statistics, centers), the optimisers' state, and a pack's stacks (gradients are made anew
    by every step)."""
    out: list[torch.Tensor] = []
    for m in members:
        out += [*m.parts.model.parameters(), *m.parts.model.buffers(), *m.parts.criterion.buffers()]
        for state in m.parts.optimizer.state.values():
            out += [v for v in state.values() if torch.is_tensor(v)]
    for name in ("params", "buffers"):
        out += list(getattr(step, name, {}).values())
    out += [t for t in (getattr(step, "centers", None),) if t is not None]
    seen, unique = set(), []
    for t in out:  # a member's weights may be views of a pack's stacks: each tensor once
        if id(t) not in seen:
            seen.add(id(t))
            unique.append(t)
    return unique


def _weights(members: list) -> torch.Tensor:
    return torch.cat(
        [p.detach().double().flatten() for m in members for p in m.parts.model.parameters()]
    )
