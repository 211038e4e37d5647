"""Python function calls per training step: bare Lightning, the template, and the template with parts switched off.

Epoch times on a shared machine drift by 2x within minutes; call counts do not. At batch 32 the MLP's step is
Python-bound on a CPU, and every extra call (~0.25 µs here) is the template's per-step overhead. The template also
trims Lightning's own loop (a profiler that does nothing, the module's empty step hooks skipped), so it is compared
with bare Lightning twice: as users write it, and trimmed alike, where the difference says exactly what the template's
features add and which part adds it. Counted with cProfile over a window of training steps after a warm-up,
validation left out.

    python benchmarks/step_calls.py --data_dir data [--KEY VALUE ...]   # other flags go to the template's runs
"""

import argparse
import contextlib
import cProfile
import io
import logging
import pstats
import sys
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
import bare_lightning  # noqa: E402
from plain_loop import train_and_val  # noqa: E402

from mnist.cli import MNISTCLI  # noqa: E402

# The template as config.yaml runs it, then with one part off or changed at a time (command-line flags, nothing
# patched).
VARIANTS = {
    "template (config.yaml)": [],
    "template, no progress bar": ["--trainer.enable_progress_bar", "false"],
    "template, no checkpointing": ["--trainer.enable_checkpointing", "false"],
    "template, no logger": ["--trainer.logger", "false"],
    # Lightning's default profiler in place of the template's faster one (mnist/profiler.py), which bare Lightning
    # keeps: what that trim saves.
    "template, Lightning's default profiler": ["--trainer.profiler", "pytorch_lightning.profilers.PassThroughProfiler"],
}


class CallCounter(pl.Callback):
    """Profiles training steps ``warmup`` to ``warmup + window`` and writes the calls per step to ``path``.

    Args:
        path: The file to write the number to.
        warmup: Training steps left out first.
        window: Training steps counted.
    """

    def __init__(self, path: str, warmup: int, window: int) -> None:
        self.path, self.warmup, self.window = path, warmup, window
        self.profile: cProfile.Profile | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        # The profile spans from one step's start to another's: every hook of `window` whole steps.
        if batch_idx == self.warmup:
            self.profile = cProfile.Profile()
            self.profile.enable()
        elif batch_idx == self.warmup + self.window and self.profile is not None:
            self.profile.disable()
            calls = pstats.Stats(self.profile).total_calls / self.window
            Path(self.path).write_text(f"{calls:.1f}")
            self.profile = None


def bare(data: tuple[torch.Tensor, ...], batch_size: int, counter: CallCounter, trimmed: bool = False) -> None:
    steps = counter.warmup + counter.window + 1
    bare_lightning.fit(
        data, batch_size, [counter], trimmed, max_epochs=1, limit_train_batches=steps, limit_val_batches=0
    )


def template(data_dir: Path, batch_size: int, counter: CallCounter, flags: list[str], work: str) -> None:
    trainer_args = {"limit_train_batches": counter.warmup + counter.window + 1, "default_root_dir": work}
    args = ["fit", "--config", str(HERE.parent / "config.yaml"), "--data.data_dir", str(data_dir),
            "--data.download", "false", "--data.batch_size", str(batch_size), "--trainer.max_epochs", "1",
            *(f"--trainer.{key}={value}" for key, value in trainer_args.items()), *flags]  # fmt: skip
    MNISTCLI(args=args, trainer_defaults={"callbacks": [counter]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=Path("data"), help="folder holding MNIST/raw/")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=100, help="training steps before counting")
    parser.add_argument("--window", type=int, default=500, help="training steps counted")
    args, template_flags = parser.parse_known_args()
    data = train_and_val(str(args.data_dir))
    # Lightning's own messages (devices, seed, model summary) go through logging, not the streams redirected below.
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    calls: dict[str, float] = {}
    for name in ["bare Lightning", "bare Lightning, trimmed", *VARIANTS]:
        with tempfile.TemporaryDirectory() as work:
            counter = CallCounter(str(Path(work) / "calls.txt"), args.warmup, args.window)
            # The runs' own console output is not what is measured.
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                if name.startswith("bare Lightning"):
                    bare(data, args.batch_size, counter, trimmed=name.endswith("trimmed"))
                else:
                    template(args.data_dir, args.batch_size, counter, [*template_flags, *VARIANTS[name]], work)
            calls[name] = float((Path(work) / "calls.txt").read_text())
        print(f"{name}: {calls[name]:.1f} calls per step", file=sys.stderr, flush=True)
    floor, trimmed = calls["bare Lightning"], calls["bare Lightning, trimmed"]
    full = calls["template (config.yaml)"]
    lines = [
        f"Python function calls per training step, batch {args.batch_size}, steps {args.warmup}-"
        f"{args.warmup + args.window} of the first epoch:",
        "",
        "| run | calls per step | over bare Lightning | over bare Lightning, trimmed "
        "| over the template as config.yaml runs it |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, value in calls.items():
        change = f"{value - full:+.0f}" if name.startswith("template, ") else ""
        lines.append(f"| {name} | {value:.0f} | {value - floor:+.0f} | {value - trimmed:+.0f} | {change} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
