"""quorum for Python: any training loop as a worker of a quorum parameter server.

Synchronous SGD with backup workers (Chen et al., "Revisiting Distributed Synchronous SGD"):
`quorum ps` closes each step with the first N gradients and drops the late ones. This package
lets workers written in Python — PyTorch above all — join such a server. The protocol, the
worker rule, heartbeats and reconnects are quorum's own Rust code (`quorum._native`), the
same as `quorum worker` runs.

- `Worker(server, index, layout, ...)`: a worker. Step by step, `for step, params in worker:`
  compute, then `worker.push(grads, loss)`; or `Worker.run(gradient, params, grads)`, which
  calls `gradient(step, params, grads)` for each step. Both end when the server says stop.
- `Evaluator(server, layout, every)`: not a worker; `Evaluator.run(evaluate, params)` pulls
  the parameters every `every` steps and reports `evaluate(step, params) -> (loss, accuracy)`
  to the server, which records it as its own evaluations (metrics.csv, TensorBoard, the
  progress line, summary.json's final test figures).
- `write_params` / `read_params`: the parameter file `quorum ps --params` serves, and a
  checkpoint's parameters.
- `quorum.torch`: the same for a `torch.nn.Module`, with its tensors as views into the flat
  buffers (`run_worker`, `run_evaluator`, `save_params`, `load_params`).
"""

from ._native import (
    Evaluator,
    QuorumError,
    RefusedError,
    UnreachableError,
    Worker,
    latest_checkpoint,
    read_params,
    write_params,
)

__all__ = [
    "Evaluator",
    "QuorumError",
    "RefusedError",
    "UnreachableError",
    "Worker",
    "latest_checkpoint",
    "read_params",
    "write_params",
]
