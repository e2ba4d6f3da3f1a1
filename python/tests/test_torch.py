"""quorum.torch without a server: the flat buffers, the parameter file, the batches."""

import pytest
import torch

import quorum
import quorum.torch as qt


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def test_a_module_saved_as_a_parameter_file_loads_back_into_another_identically(tmp_path):
    a, b = mlp(0), mlp(1)
    qt.save_params(a, tmp_path / "init.safetensors")
    layout, values = quorum.read_params(str(tmp_path / "init.safetensors"))
    assert layout == [("0.weight", [5, 6]), ("0.bias", [5]), ("2.weight", [3, 5]), ("2.bias", [3])]
    assert len(values) == 4 * sum(p.numel() for p in a.parameters())
    qt.load_params(b, tmp_path / "init.safetensors")
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_loading_the_file_of_another_model_says_which_tensor_differs(tmp_path):
    qt.save_params(mlp(), tmp_path / "init.safetensors")
    other = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"tensor 0: \('0.weight', \[4, 6\]\) in the module, \('0.weight', \[5, 6\]\)"):
        qt.load_params(other, tmp_path / "init.safetensors")


def test_a_parameter_file_with_a_wrong_number_of_values_is_refused():
    with pytest.raises(ValueError, match="8 bytes of values for a layout of 6 float32 values"):
        quorum.write_params("/tmp/never-written.safetensors", [("w", [2, 3])], bytes(8))


def test_the_modules_tensors_are_views_of_the_flat_buffers():
    net, ref = mlp(0), mlp(0)
    flat = qt.FlatModule(net)
    assert flat.layout == qt.layout(ref)
    # What the worker writes into `params` is what the module computes with.
    new = torch.randn(sum(p.numel() for p in ref.parameters()))
    torch.frombuffer(flat.params, dtype=torch.float32).copy_(new)
    torch.nn.utils.vector_to_parameters(new, ref.parameters())
    x, y = torch.randn(7, 6), torch.randint(3, (7,))
    flat.pulled()
    flat.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    flat.to_push()
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    # ... and its gradient lands in `grads`, in layout order, with no copy tensor by tensor.
    expected = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
    assert torch.allclose(torch.frombuffer(flat.grads, dtype=torch.float32), expected)
    assert expected.abs().sum() > 0


def test_batches_are_a_function_of_seed_worker_and_step_only():
    x, y = torch.arange(100).float().unsqueeze(1), torch.arange(100)
    draw = qt.batches(x, y, 8, seed=3, worker=1)
    assert torch.equal(draw(5)[1], draw(5)[1])
    assert torch.equal(draw(5)[1], qt.batches(x, y, 8, seed=3, worker=1)(5)[1])
    assert not torch.equal(draw(5)[1], draw(6)[1])
    assert not torch.equal(draw(5)[1], qt.batches(x, y, 8, seed=3, worker=2)(5)[1])
    assert not torch.equal(draw(5)[1], qt.batches(x, y, 8, seed=4, worker=1)(5)[1])
    assert torch.equal(draw(5)[0].squeeze(1).long(), draw(5)[1])


def test_a_module_that_is_not_float32_is_refused():
    with pytest.raises(TypeError, match="call module.float"):
        qt.FlatModule(mlp().double())


def test_a_worker_is_described_by_its_layout():
    w = quorum.Worker("127.0.0.1:7070", 2, qt.layout(mlp()))
    assert (w.index, w.num_params) == (2, 5 * 6 + 5 + 3 * 5 + 3)
    with pytest.raises(ValueError, match="positive number of seconds"):
        quorum.Worker("127.0.0.1:7070", 0, qt.layout(mlp()), rpc_timeout=0)
