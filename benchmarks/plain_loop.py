"""A hand-written PyTorch loop: the template's MLP, SGD lr 0.01, in-memory MNIST, training plus validation per epoch.

python benchmarks/plain_loop.py --data_dir data --batch_size 32 --epochs 3 --timer times.jsonl
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.datasets import MNIST

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mnist.networks import MLP  # noqa: E402


def load(data_dir: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = MNIST(data_dir, train=train)
    images = (dataset.data.unsqueeze(1).float() / 255 - 0.1307) / 0.3081  # (N, 1, 28, 28)
    return images, dataset.targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--timer", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    images, labels = load(args.data_dir, train=True)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(42))
    train_x, train_y = images[order[5000:]], labels[order[5000:]]
    val_x, val_y = images[order[:5000]], labels[order[:5000]]
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    bs = args.batch_size
    for epoch in range(args.epochs):
        start = time.perf_counter()
        model.train()
        for index in torch.randperm(len(train_y)).split(bs):
            loss = F.cross_entropy(model(train_x[index]), train_y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for start_val in range(0, len(val_y), bs):
                logits = model(val_x[start_val : start_val + bs])
                correct += (logits.argmax(1) == val_y[start_val : start_val + bs]).sum().item()
        seconds = time.perf_counter() - start
        with open(args.timer, "a") as f:
            f.write(json.dumps({"epoch": epoch, "seconds": seconds, "val_acc": correct / len(val_y)}) + "\n")


if __name__ == "__main__":
    main()
