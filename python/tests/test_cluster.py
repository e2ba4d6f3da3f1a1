"""PyTorch workers against a real `quorum ps` on loopback (the workers run as threads here;
examples/pytorch and test_mnist.py run them as processes)."""

import json
import re
import threading

import pytest
import torch

import quorum
import quorum.torch as qt

torch.set_num_threads(1)


def regression(n: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 1, generator=g)
    return x, x @ w + 0.01 * torch.randn(n, 1, generator=g)


def linear(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(8, 1)


def in_threads(workers):
    """Runs `workers` (callables) in threads; returns their results (or exceptions)."""
    results = [None] * len(workers)

    def run(i, f):
        try:
            results[i] = f()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, f)) for i, f in enumerate(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def mse(model, data):
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(data[0]), data[1]))


def test_pytorch_workers_train_the_model_the_server_serves_from_a_parameter_file(server, tmp_path):
    data = regression()
    qt.save_params(linear(), tmp_path / "init.safetensors")
    ps = server("--params", str(tmp_path / "init.safetensors"), "--workers", "3", "--backups", "1",
                "--steps", "60", "--lr", "0.05")
    models = [linear(seed=10 + i) for i in range(3)]  # own random values: the server's must win
    loss = torch.nn.functional.mse_loss
    reports = in_threads([
        (lambda i=i: qt.run_worker(models[i], data, ps.addr, i, batch_size=32, loss=loss))
        for i in range(3)
    ])
    assert ps.wait() == 0, ps.output()
    for r in reports:
        assert isinstance(r, dict), r
        assert r["accepted"] > 0 and r["sent"] >= r["accepted"]
    assert sum(r["accepted"] for r in reports) == 60 * 2  # N = 2 gradients per step
    summary = json.loads((ps.run / "summary.json").read_text())
    assert summary["steps"] == 60
    start, end = linear(), linear()
    qt.load_params(start, tmp_path / "init.safetensors")
    qt.load_params(end, quorum.latest_checkpoint(str(ps.run / "checkpoints")))
    assert mse(end, data) < 0.1 * mse(start, data), (mse(start, data), mse(end, data))


def test_an_evaluator_reports_to_a_server_without_a_model_and_the_final_step_is_in_the_summary(server, tmp_path):
    data = regression()
    held_out = regression(n=256, seed=5)
    qt.save_params(linear(), tmp_path / "init.safetensors")
    ps = server("--params", str(tmp_path / "init.safetensors"), "--workers", "2", "--backups", "0",
                "--steps", "50", "--lr", "0.05")
    loss = torch.nn.functional.mse_loss
    # The evaluator starts first and is slow: the server must wait for its last evaluation.
    def slow_mse(out, y):
        import time
        time.sleep(0.2)
        return loss(out, y)

    results = in_threads([
        lambda: qt.run_evaluator(linear(), held_out, ps.addr, every=10, loss=slow_mse, classify=False, batch_size=256),
        lambda: qt.run_worker(linear(), data, ps.addr, 0, loss=loss, batch_size=32),
        lambda: qt.run_worker(linear(), data, ps.addr, 1, loss=loss, batch_size=32),
    ])
    assert ps.wait() == 0, ps.output()
    assert all(isinstance(r, dict) for r in results), results
    assert results[0]["last_step"] == 50
    summary = json.loads((ps.run / "summary.json").read_text())
    final = linear()
    qt.load_params(final, quorum.latest_checkpoint(str(ps.run / "checkpoints")))
    assert summary["final_test_loss"] == pytest.approx(mse(final, held_out), rel=1e-4)
    assert summary["final_test_accuracy"] is None
    rows = [r.split(",") for r in (ps.run / "metrics.csv").read_text().splitlines()[1:]]
    assert [int(r[0]) for r in rows if r[4]][-1] == 50


def test_a_worker_with_another_model_is_refused_saying_what_differs(server, tmp_path):
    qt.save_params(linear(), tmp_path / "init.safetensors")
    ps = server("--params", str(tmp_path / "init.safetensors"), "--workers", "2", "--steps", "10")
    other = torch.nn.Linear(1, 8)  # the same 16 values, the matrix the other way round
    with pytest.raises(quorum.RefusedError, match=r"tensor 0 differs by shape: `weight` \[1, 8\] here, `weight` \[8, 1\] there"):
        qt.run_worker(other, regression(), ps.addr, 0, connect_timeout=5)


def test_a_quorum_mlp_worker_is_refused_by_a_server_of_the_pytorch_mlp_naming_the_orientation(server, quorum_bin, tmp_path):
    # A mixed cluster needs one layout: quorum's burn/native MLP stores a weight as [in, out]
    # under `layer0.weight`, PyTorch's Linear as [out, in] under its own name, so the server
    # refuses the other kind of worker and says why, rather than train on scrambled numbers.
    import subprocess
    from conftest import ROOT

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 512), torch.nn.ReLU(),
                              torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
    qt.save_params(mlp, tmp_path / "init.safetensors")
    ps = server("--params", str(tmp_path / "init.safetensors"), "--workers", "2", "--steps", "10")
    w = subprocess.run([quorum_bin, "worker", "--model", "mlp", "--workers", "2", "--data", str(ROOT / "data"),
                        "--ps", ps.addr, "--index", "0", "--connect-timeout", "5"],
                       capture_output=True, text=True, timeout=60)
    assert w.returncode != 0
    assert "another model than the server's" in w.stderr, w.stderr
    assert "`1.weight` [512, 784] here, `layer0.weight` [784, 512] there" in w.stderr, w.stderr
    assert "transposed" in w.stderr, w.stderr


def test_an_exception_in_the_gradient_code_is_raised_and_the_server_told_the_worker_left(server, tmp_path):
    data = regression()
    qt.save_params(linear(), tmp_path / "init.safetensors")
    ps = server("--params", str(tmp_path / "init.safetensors"), "--workers", "2", "--backups", "1",
                "--steps", "40", "--worker-timeout", "30")
    draw = qt.batches(*data, 16, worker=0)

    def failing(step):
        if step >= 3:
            raise ArithmeticError(f"bad batch at step {step}")
        return draw(step)

    loss = torch.nn.functional.mse_loss
    bad, good = in_threads([
        lambda: qt.run_worker(linear(), failing, ps.addr, 0, loss=loss),
        lambda: qt.run_worker(linear(), data, ps.addr, 1, loss=loss, batch_size=16),
    ])
    assert isinstance(bad, ArithmeticError) and "bad batch at step" in str(bad), bad
    assert ps.wait() == 0, ps.output()
    assert isinstance(good, dict) and good["accepted"] > 0, good
    events = [json.loads(line) for line in (ps.run / "events.jsonl").read_text().splitlines()]
    left = [e for e in events if e["event"] == "worker_left"]
    # Told at once ("left"), not found dead after the 30 s worker time-out.
    assert [(e["worker"], e["reason"]) for e in left] == [(0, "left")], left
    assert json.loads((ps.run / "summary.json").read_text())["steps"] == 40


def test_an_unreachable_server_raises_after_the_connect_timeout():
    with pytest.raises(quorum.UnreachableError, match="cannot reach the parameter server"):
        qt.run_worker(linear(), regression(), "127.0.0.1:1", 0, connect_timeout=0.5)


def step_wise(worker, model, data, batch_size=32, stop_at=None):
    """Trains `model` as `worker` with the step-wise API; returns the steps it was handed."""
    flat = qt.FlatModule(model)
    draw = qt.batches(*data, batch_size, worker=worker.index)
    seen = []
    for step, params in worker:
        seen.append(step)
        if stop_at is not None and step >= stop_at:
            worker.fail(f"stopped on purpose at step {step}")
            continue
        flat.params[:] = params
        flat.pulled()
        flat.zero_grad()
        x, y = draw(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        flat.to_push()
        worker.push(flat.grads, float(loss.detach()))
    return seen


def test_the_step_wise_worker_is_handed_every_step_and_trains(server, tmp_path):
    data = regression()
    qt.save_params(linear(), tmp_path / "init.safetensors")
    ps = server("--params", str(tmp_path / "init.safetensors"), "--workers", "2", "--backups", "0",
                "--steps", "30", "--lr", "0.05")
    workers = [quorum.Worker(ps.addr, i, qt.layout(linear())) for i in range(2)]
    seen = in_threads([lambda i=i: step_wise(workers[i], linear(), data) for i in range(2)])
    assert ps.wait() == 0, ps.output()
    # N = 2 of 2: every worker computes every step, in order.
    assert seen == [list(range(30)), list(range(30))], seen
    assert [w.report["accepted"] for w in workers] == [30, 30]
    start, end = linear(), linear()
    qt.load_params(start, tmp_path / "init.safetensors")
    qt.load_params(end, quorum.latest_checkpoint(str(ps.run / "checkpoints")))
    assert mse(end, data) < 0.5 * mse(start, data)


def test_asking_for_a_step_before_pushing_the_last_one_says_what_to_do(server, tmp_path):
    qt.save_params(linear(), tmp_path / "init.safetensors")
    ps = server("--params", str(tmp_path / "init.safetensors"), "--workers", "1", "--steps", "5")
    w = quorum.Worker(ps.addr, 0, qt.layout(linear()))
    with pytest.raises(RuntimeError, match="no step to push a gradient for"):
        w.push(bytes(36))
    step, params = next(w)
    assert (step, len(params)) == (0, 36)
    with pytest.raises(RuntimeError, match="push the gradient of step 0"):
        next(w)
    with pytest.raises(ValueError, match="the gradient has 8 bytes; the layout's 9 float32 values take 36"):
        w.push(bytes(8))
    w.push(bytearray(36), 0.5)
    assert next(w)[0] == 1


def test_a_step_wise_worker_that_fails_is_reported_as_left_and_the_iteration_raises(server, tmp_path):
    data = regression()
    qt.save_params(linear(), tmp_path / "init.safetensors")
    ps = server("--params", str(tmp_path / "init.safetensors"), "--workers", "2", "--backups", "1",
                "--steps", "20", "--worker-timeout", "30")
    bad = quorum.Worker(ps.addr, 0, qt.layout(linear()))
    loss = torch.nn.functional.mse_loss
    failed, good = in_threads([
        lambda: step_wise(bad, linear(), data, stop_at=2),
        lambda: qt.run_worker(linear(), data, ps.addr, 1, loss=loss, batch_size=16),
    ])
    # The first step at or after 2 it is handed (later than 2 when the other worker closed steps
    # meanwhile: N = 1, b = 1).
    assert isinstance(failed, quorum.QuorumError), failed
    assert re.search(r"stopped on purpose at step \d+", str(failed)), failed
    assert ps.wait() == 0, ps.output()
    events = [json.loads(line) for line in (ps.run / "events.jsonl").read_text().splitlines()]
    assert [(e["worker"], e["reason"]) for e in events if e["event"] == "worker_left"] == [(0, "left")]
