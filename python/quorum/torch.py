"""PyTorch workers for a quorum parameter server.

    import quorum.torch as qt
    qt.save_params(model, "init.safetensors")        # once: what `quorum ps --params` serves
    qt.run_worker(model, (images, labels), "127.0.0.1:7070", index=i, batch_size=128)

A module's parameters become views into one flat float32 buffer and its gradients views into
another, in `named_parameters()` order: a pull writes every parameter in place with one copy,
and a push sends every gradient at once (on a GPU: one host-to-device copy of the parameters
and one device-to-host copy of the gradients per step). Buffers that are not parameters
(BatchNorm's running statistics) stay each worker's own.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from ._native import Evaluator, Worker, read_params, write_params

Layout = Sequence[Tuple[str, Sequence[int]]]
Batch = Tuple[torch.Tensor, torch.Tensor]


def _trained(module: torch.nn.Module):
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the module has no trainable parameters")
    for n, p in params:
        if p.dtype != torch.float32:
            raise TypeError(f"parameter {n} is {p.dtype}; quorum trains float32 parameters: call module.float()")
    return params


def layout(module: torch.nn.Module) -> list:
    """The module's layout: `[(name, shape), ...]` of its trainable parameters, in order."""
    return [(n, list(p.shape)) for n, p in _trained(module)]


class FlatModule:
    """A module whose parameters and gradients are views into two flat float32 buffers.

    `params` and `grads` are bytearrays (what `Worker.run` reads and writes); on the CPU the
    module's tensors are views into them, on a GPU into device buffers copied once per step.
    """

    def __init__(self, module: torch.nn.Module):
        named = _trained(module)
        self.module = module
        self.layout = [(n, list(p.shape)) for n, p in named]
        total = sum(p.numel() for _, p in named)
        self.device = named[0][1].device
        if any(p.device != self.device for _, p in named):
            raise ValueError("the module's parameters are on several devices; quorum needs them on one")
        self.params = bytearray(4 * total)
        self.grads = bytearray(4 * total)
        self._host_params = torch.frombuffer(self.params, dtype=torch.float32)
        self._host_grads = torch.frombuffer(self.grads, dtype=torch.float32)
        if self.device.type == "cpu":
            self._flat_params, self._flat_grads = self._host_params, self._host_grads
        else:
            self._flat_params = torch.empty(total, dtype=torch.float32, device=self.device)
            self._flat_grads = torch.zeros(total, dtype=torch.float32, device=self.device)
        offset = 0
        with torch.no_grad():
            for _, p in named:
                k = p.numel()
                view = self._flat_params[offset : offset + k].view_as(p)
                view.copy_(p)
                p.data = view
                p.grad = self._flat_grads[offset : offset + k].view_as(p)
                offset += k
        if any(True for _ in module.buffers()):
            warnings.warn(
                "the module has buffers (e.g. BatchNorm running statistics): they are not parameters, "
                "so each worker keeps its own and the server never sees them",
                stacklevel=3,
            )

    def values(self) -> torch.Tensor:
        """The parameters as one flat tensor on the module's device (a view, not a copy)."""
        return self._flat_params

    def pulled(self) -> None:
        """After the worker wrote new parameters into `params`: bring them to the device."""
        if self._flat_params is not self._host_params:
            self._flat_params.copy_(self._host_params)

    def zero_grad(self) -> None:
        self._flat_grads.zero_()

    def to_push(self) -> None:
        """Before the worker reads `grads`: bring the gradients from the device."""
        if self._flat_grads is not self._host_grads:
            self._host_grads.copy_(self._flat_grads)


def save_params(module: torch.nn.Module, path: str) -> None:
    """Writes the module's parameters as the parameter file `quorum ps --params PATH` serves."""
    named = _trained(module)
    buf = bytearray(4 * sum(p.numel() for _, p in named))
    flat = torch.frombuffer(buf, dtype=torch.float32)
    with torch.no_grad():
        torch.cat([p.detach().reshape(-1).cpu() for _, p in named], out=flat)
    write_params(str(path), [(n, list(p.shape)) for n, p in named], bytes(buf))


def load_params(module: torch.nn.Module, path: str) -> None:
    """Loads a parameter file, or a checkpoint's parameters (its `ckpt-<step>.json`), into the
    module; refuses a file whose layout differs from the module's, saying what differs."""
    theirs, values = read_params(str(path))
    ours = layout(module)
    theirs = [(n, list(s)) for n, s in theirs]
    if theirs != ours:
        diff = next(
            (f"tensor {i}: {a} in the module, {b} in the file" for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
            f"the module has {len(ours)} tensors, the file {len(theirs)}",
        )
        raise ValueError(f"{path} holds another model than this module: {diff}")
    flat = torch.frombuffer(bytearray(values), dtype=torch.float32)
    offset = 0
    with torch.no_grad():
        for _, p in _trained(module):
            k = p.numel()
            p.copy_(flat[offset : offset + k].view_as(p))
            offset += k


def batches(
    inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, *, seed: int = 1, worker: int = 0
) -> Callable[[int], Batch]:
    """`step -> (inputs, targets)`: a mini-batch drawn as a pure function of (seed, worker,
    step), never of timing, as quorum's own workers draw theirs, so a rerun sees the same data."""
    if len(inputs) != len(targets):
        raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
    n = len(inputs)

    def draw(step: int) -> Batch:
        g = torch.Generator()
        g.manual_seed((seed * 0x9E3779B1 + worker * 0x85EBCA77 + step * 0xC2B2AE3D) % (1 << 63))
        idx = torch.randint(n, (batch_size,), generator=g)
        return inputs[idx], targets[idx]

    return draw


def run_worker(
    module: torch.nn.Module,
    data: Union[Tuple[torch.Tensor, torch.Tensor], Callable[[int], Batch]],
    server: str,
    index: int,
    *,
    batch_size: int = 128,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.nn.functional.cross_entropy,
    seed: int = 1,
    on_step: Optional[Callable[[int, float], None]] = None,
    **options,
) -> dict:
    """Makes `module` worker `index` of the quorum parameter server at `server` (HOST:PORT)
    until the server says stop; returns what the worker did (gradients sent, accepted, ...).

    `data` is `(inputs, targets)` tensors, from which each step draws `batch_size` examples by
    (seed, worker, step), or a function `step -> (inputs, targets)`. (A DataLoader is not
    addressable by step, and a worker restarted mid-run must see the batches it would have.)
    `options` are `Worker`'s: token, tls_ca, tls_cert, tls_key, connect_timeout,
    heartbeat_every, rpc_timeout.
    """
    flat = FlatModule(module)
    draw = data if callable(data) else batches(data[0], data[1], batch_size, seed=seed, worker=index)
    worker = Worker(server, index, flat.layout, seed=seed, **options)
    module.train()

    def gradient(step: int, _params: bytearray, _grads: bytearray) -> float:
        flat.pulled()
        flat.zero_grad()
        x, y = draw(step)
        with torch.enable_grad():
            value = loss(module(x.to(flat.device)), y.to(flat.device))
            value.backward()
        flat.to_push()
        value = float(value.detach())
        if on_step is not None:
            on_step(step, value)
        return value

    return worker.run(gradient, flat.params, flat.grads)


def run_evaluator(
    module: torch.nn.Module,
    data: Tuple[torch.Tensor, torch.Tensor],
    server: str,
    *,
    every: int = 100,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.nn.functional.cross_entropy,
    classify: bool = True,
    batch_size: int = 1000,
    **options,
) -> dict:
    """Evaluates the server's parameters on `data` (held-out `(inputs, targets)`) every
    `every` steps and at the end, and reports the mean loss (and, with `classify`, the
    accuracy of the arg-max) to the server, until it stops. `options` are `Evaluator`'s."""
    flat = FlatModule(module)
    inputs, targets = data
    evaluator = Evaluator(server, flat.layout, every, **options)

    def evaluate(step: int, _params: bytearray):
        flat.pulled()
        module.eval()
        total, right = 0.0, 0
        with torch.no_grad():
            for x, y in zip(inputs.split(batch_size), targets.split(batch_size)):
                x, y = x.to(flat.device), y.to(flat.device)
                out = module(x)
                total += float(loss(out, y)) * len(y)
                if classify:
                    right += int((out.argmax(1) == y).sum())
        n = len(targets)
        return total / n, (right / n if classify else None)

    return evaluator.run(evaluate, flat.params)
