"""Lightning with nothing added: the plain loop's model, data and optimizer in a minimal LightningModule and Trainer.

No logger, progress bar, checkpoints, metrics or model summary; validation computes the accuracy as the plain loop
does. It measures what Lightning's training loop itself costs per step on this machine, the floor under the
template's own overhead. With ``--trimmed``, Lightning's loop is trimmed as the template trims it (a profiler that
does nothing, the module's empty step hooks skipped): the floor under what the template's features add.

python benchmarks/bare_lightning.py --data_dir data --batch_size 32 --epochs 3 --timer times.jsonl [--trimmed]
"""

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from epoch_timer import EpochTimer
from plain_loop import argument_parser, train_and_val

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mnist.callbacks import skip_unused_batch_hooks, skip_unused_step_hooks  # noqa: E402
from mnist.loader import BatchLoader, EpochSampler  # noqa: E402
from mnist.networks import MLP  # noqa: E402
from mnist.profiler import NullProfiler  # noqa: E402


class Bare(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.network = MLP((1, 28, 28), 10)
        self.correct = 0

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.network(x), y)

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self.correct += (self.network(x).argmax(1) == y).sum()  # on the device: no wait per batch

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(
    data: tuple[torch.Tensor, ...], batch_size: int, callbacks: list[pl.Callback], trimmed: bool = False, **trainer_args
) -> None:
    """Train ``Bare`` on ``train_and_val``'s tensors with a Trainer that has nothing of its own switched on.

    ``trimmed``: with Lightning's loop trimmed as the template's command line trims it (``mnist.cli``).
    """
    train_x, train_y, val_x, val_y = data
    # The measuring callbacks (timer, call counter) cost the same here as in the template, which skips the batch
    # hooks a callback leaves empty.
    skip_unused_batch_hooks(callbacks)
    train = BatchLoader(train_x, train_y, batch_size, EpochSampler(len(train_y), shuffle=True))
    val = BatchLoader(val_x, val_y, batch_size)
    module = Bare()
    if trimmed:
        trainer_args.setdefault("profiler", NullProfiler())
        skip_unused_step_hooks(module, clips_gradients=False)
    trainer = pl.Trainer(
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **trainer_args,
    )
    trainer.fit(module, train, val)


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--trimmed", action="store_true", help="Lightning's loop trimmed as the template trims it")
    args = parser.parse_args()
    torch.manual_seed(0)
    # The data where the model trains (the GPU when there is one), as the template keeps it.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = tuple(t.to(device) for t in train_and_val(args.data_dir))
    timer = [EpochTimer(args.timer)]
    fit(data, args.batch_size, timer, args.trimmed, max_epochs=args.epochs, precision=args.precision)


if __name__ == "__main__":
    main()
