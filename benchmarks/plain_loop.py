"""A hand-written PyTorch loop: the template's MLP, SGD lr 0.01, in-memory MNIST, training plus validation per epoch.

python benchmarks/plain_loop.py --data_dir data --batch_size 32 --epochs 3 --timer times.jsonl
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from epoch_timer import Baton, synchronize, write_record
from torchvision.datasets import MNIST

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mnist.networks import MLP  # noqa: E402


def argument_parser(description: str) -> argparse.ArgumentParser:
    """The command line of this loop and of bare_lightning.py."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--timer", required=True)
    parser.add_argument(
        "--precision",
        default="32-true",
        choices=["32-true", "bf16-mixed"],
        help="bf16-mixed: the forward pass under bf16 autocast, as Lightning's precision plugin does",
    )
    return parser


def train_and_val(data_dir: str) -> tuple[torch.Tensor, ...]:
    """MNIST's training images normalised in memory, split 55,000 / 5,000: train images, labels, val images, labels."""
    dataset = MNIST(data_dir, train=True)
    images = (dataset.data.unsqueeze(1).float() / 255 - 0.1307) / 0.3081  # (N, 28, 28) -> (N, 1, 28, 28)
    labels = dataset.targets
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(42))
    n_val = min(5000, len(labels) // 10)  # 5,000 of MNIST's 60,000; a tenth of a smaller test set
    return images[order[n_val:]], labels[order[n_val:]], images[order[:n_val]], labels[order[:n_val]]


def main() -> None:
    args = argument_parser(__doc__).parse_args()
    torch.manual_seed(0)
    # On the GPU when there is one, data included, as the template runs there.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_x, train_y, val_x, val_y = (t.to(device) for t in train_and_val(args.data_dir))
    model = MLP((1, 28, 28), 10).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    bs = args.batch_size
    baton = Baton()  # turns at epochs with the other contenders, when benchmark.py hands them out
    for epoch in range(args.epochs):
        baton.take()
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        model.train()
        step_starts = []
        for index in torch.randperm(len(train_y), device=device).split(bs):
            step_starts.append(time.perf_counter())
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed"):
                loss = F.cross_entropy(model(train_x[index]), train_y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        correct = torch.zeros((), dtype=torch.long, device=device)
        with torch.no_grad():
            for start_val in range(0, len(val_y), bs):
                logits = model(val_x[start_val : start_val + bs])
                correct += (logits.argmax(1) == val_y[start_val : start_val + bs]).sum()
        synchronize(device)
        end = time.perf_counter()
        settled, cpu_seconds = baton.settle(), time.process_time() - cpu_start
        write_record(args.timer, epoch, settled - start, cpu_seconds, step_starts, end - start)
        print(f"epoch {epoch}: val accuracy {int(correct) / len(val_y):.4f}")
        if epoch + 1 < args.epochs:
            baton.give()  # the last turn is kept until the process ends


if __name__ == "__main__":
    main()
