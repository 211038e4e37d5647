"""The tutorial's code as published (per-sample ToTensor through a DataLoader, validation on the test set), timed.

python benchmarks/tutorial.py --data_dir data --epochs 1 --timer times.jsonl
"""

import argparse

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from epoch_timer import EpochTimer
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms


class TutorialModel(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 256)
        self.fc2 = nn.Linear(256, 128)
        self.out = nn.Linear(128, 10)
        self.lr = 0.01
        self.loss = nn.CrossEntropyLoss()

    def forward(self, x):
        x = x.view(x.size(0), -1)  # (B, 1, 28, 28) -> (B, 784)
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.loss(self(x), y)


class TutorialData(pl.LightningDataModule):
    def __init__(self, data_dir):
        super().__init__()
        self.data_dir = data_dir

    def prepare_data(self):
        transform = transforms.Compose([transforms.ToTensor()])
        self.train_data = datasets.MNIST(self.data_dir, train=True, download=False, transform=transform)
        self.test_data = datasets.MNIST(self.data_dir, train=False, download=False, transform=transform)

    def train_dataloader(self):
        return DataLoader(self.train_data, batch_size=32, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.test_data, batch_size=32, shuffle=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--timer", required=True, help="JSON-lines file the epoch times are appended to")
    args = parser.parse_args()
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[EpochTimer(args.timer)], enable_checkpointing=False)
    trainer.fit(TutorialModel(), TutorialData(args.data_dir))
