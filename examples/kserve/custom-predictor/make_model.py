"""Write the example's TorchScript model: a small seeded CNN over 3x32x32 images, 10 classes.

    python make_model.py DIR   ->   DIR/model.pt
"""

import os
import sys

import torch


def build() -> torch.jit.ScriptModule:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(16, 10),
    ).eval()
    return torch.jit.script(net)


if __name__ == "__main__":
    directory = sys.argv[1] if len(sys.argv) > 1 else "."
    os.makedirs(directory, exist_ok=True)
    build().save(os.path.join(directory, "model.pt"))
    print(os.path.join(directory, "model.pt"))
