"""MNIST with PyTorch workers on a quorum parameter server.

    python examples/pytorch/mnist.py init     --model mlp --out runs/pytorch/init.safetensors
    quorum ps --params runs/pytorch/init.safetensors --workers 4 --backups 1 --steps 400
    python examples/pytorch/mnist.py worker   --model mlp --ps 127.0.0.1:7070 --index 0   # ... 3
    python examples/pytorch/mnist.py evaluator --model mlp --ps 127.0.0.1:7070        # test accuracy every 100 steps
    python examples/pytorch/mnist.py evaluate --model mlp --run runs/pytorch          # of the final checkpoint

`examples/pytorch/run.sh` does all of it. MNIST is read from IDX files (data/mnist, which
`scripts/fetch-data.sh` installs); nothing is downloaded.
"""

import argparse
import gzip
import struct
import sys
from pathlib import Path

import torch
from torch import nn

import quorum
import quorum.torch as qt

MEAN, STD = 0.1307, 0.3081  # MNIST's pixel mean and deviation, as quorum's own models use


def model(name: str) -> nn.Module:
    """`mlp`: 784-512-512-10 (TensorFlow peer's and quorum's MLP). `cnn`: the paper's MNIST CNN
    (two blocks of two 3x3 convolutions, 32 and 64 channels, each block max-pooled, then a
    linear classifier), as quorum's built-in `cnn`."""
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    if name == "cnn":
        conv = lambda i, o: [nn.Conv2d(i, o, 3, padding=1), nn.ReLU()]  # noqa: E731
        return nn.Sequential(
            *conv(1, 32), *conv(32, 32), nn.MaxPool2d(2),
            *conv(32, 64), *conv(64, 64), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 10),
        )
    raise SystemExit(f"unknown model {name!r}: use mlp or cnn")


def read_idx(path: Path) -> torch.Tensor:
    if not path.exists() and path.with_name(path.name + ".gz").exists():
        path = path.with_name(path.name + ".gz")
    if not path.exists():
        raise SystemExit(f"{path} not found: run `bash scripts/fetch-data.sh` (or give --data)")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    zero, kind, dims = struct.unpack(">HBB", raw[:4])
    if zero != 0 or kind != 0x08:
        raise SystemExit(f"{path} is not an IDX file of bytes")
    shape = struct.unpack(f">{dims}I", raw[4 : 4 + 4 * dims])
    return torch.frombuffer(bytearray(raw[4 + 4 * dims :]), dtype=torch.uint8).reshape(shape)


def mnist(data: Path, split: str):
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(data / f"{prefix}-images-idx3-ubyte").float().div_(255).sub_(MEAN).div_(STD).unsqueeze(1)
    labels = read_idx(data / f"{prefix}-labels-idx1-ubyte").long()
    return images, labels


def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    net.eval()
    with torch.no_grad():
        right = sum(int((net(x).argmax(1) == y).sum()) for x, y in zip(images.split(1000), labels.split(1000)))
    return right / len(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("init", "worker", "evaluator", "evaluate"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
        p.add_argument("--seed", type=int, default=1)
        p.add_argument("--data", type=Path, default=Path("data/mnist"))
        p.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    sub.choices["init"].add_argument("--out", type=Path, required=True)
    w = sub.choices["worker"]
    w.add_argument("--ps", required=True, help="the server, HOST:PORT")
    w.add_argument("--index", type=int, required=True)
    w.add_argument("--batch", type=int, default=128)
    w.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    v = sub.choices["evaluator"]
    v.add_argument("--ps", required=True, help="the server, HOST:PORT")
    v.add_argument("--every", type=int, default=100, help="evaluate every this many steps (and at the end)")
    e = sub.choices["evaluate"]
    e.add_argument("--run", type=Path, required=True, help="the server's run directory (its checkpoints/)")
    e.add_argument("--min-accuracy", type=float, help="exit 1 below this test accuracy (0..1)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    net = model(a.model)

    if a.command == "init":
        qt.save_params(net, a.out)
        print(f"wrote {a.out}: {sum(p.numel() for p in net.parameters())} parameters of the {a.model}")
    elif a.command == "worker":
        images, labels = mnist(a.data, "train")
        net.to(a.device)
        report = qt.run_worker(net, (images, labels), a.ps, a.index, batch_size=a.batch, seed=a.seed)
        print(f"worker {a.index}: {report}")
    elif a.command == "evaluator":
        report = qt.run_evaluator(net, mnist(a.data, "test"), a.ps, every=a.every)
        print(f"evaluator: {report}")
    else:
        ckpt = quorum.latest_checkpoint(str(a.run / "checkpoints"))
        if ckpt is None:
            raise SystemExit(f"no checkpoint in {a.run / 'checkpoints'}: has the server run?")
        qt.load_params(net, ckpt)
        acc = accuracy(net, *mnist(a.data, "test"))
        print(f"test accuracy {100 * acc:.2f}% ({Path(ckpt).name}, {a.model})")
        if a.min_accuracy is not None and acc < a.min_accuracy:
            sys.exit(1)


if __name__ == "__main__":
    main()
