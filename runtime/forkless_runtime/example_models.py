"""Example models with fixed seeds, built on demand for `make run`, the tests and the benchmark.

This module imports torch: it runs as its own tool (`python -m forkless_runtime.example_models DIR`),
never inside the front-end.

- mlp: 16 -> 64 -> 3, a few microseconds a forward: measures the server, not the model.
- cnn: six 3x3 convolutions up to 256 channels on 3x64x64: about 10 ms a forward on one core.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(16, 64)
        self.out = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        channels = [3, 32, 64, 64, 128, 128, 256]
        layers: list[nn.Module] = []
        strides = [1, 1, 1, 2, 1, 2]  # full resolution first: about 10 ms a batch-1 forward on one core
        for (cin, cout), stride in zip(itertools.pairwise(channels), strides, strict=True):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, stride=stride), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "mlp":
        return MLP().eval(), torch.randn(4, 16)
    if name == "cnn":
        return SmallCNN().eval(), torch.randn(2, 3, 64, 64)
    raise ValueError(f"unknown example model {name!r}")


def save_torchscript(name: str, path: Path) -> Path:
    model, example = build(name)
    with torch.no_grad():
        traced = torch.jit.trace(model, example)
    traced.save(str(path))
    return path


def save_torch_export(name: str, path: Path, dynamic_batch: bool = True) -> Path:
    model, example = build(name)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic_batch else None
    program = torch.export.export(model, (example,), dynamic_shapes=dynamic)
    torch.export.save(program, str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="write the example models (TorchScript and torch.export)")
    parser.add_argument("directory", type=Path)
    args = parser.parse_args()
    args.directory.mkdir(parents=True, exist_ok=True)
    for name in ("mlp", "cnn"):
        target = args.directory / f"{name}.pt"
        if not target.exists():
            save_torchscript(name, target)
            print(f"wrote {target}")
    target = args.directory / "mlp.pt2"
    if not target.exists():
        save_torch_export("mlp", target)
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
