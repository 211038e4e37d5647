"""Callbacks the command line adds to every run."""

import csv
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter


class PredictionCSVWriter(BasePredictionWriter):
    """Writes ``predict`` results to ``<run dir>/predictions-<checkpoint>.csv``, one row per image.

    Columns: ``index`` (position in the data set), ``target``, ``prediction``, ``confidence`` (softmax
    probability of the prediction). With several processes, each writes its share and process 0 merges them.
    """

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")
        self.ckpt_name = "model"
        self.path: Path | None = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path:
            self.ckpt_name = Path(trainer.ckpt_path).stem

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        path = run_dir / f"predictions-{self.ckpt_name}.csv"
        loader = trainer.predict_dataloaders
        index = loader.sampler.indices()  # the data set positions this process predicted, in order
        rows = torch.stack(
            [
                index[: sum(len(p["target"]) for p in predictions)],
                torch.cat([p["target"] for p in predictions]).cpu(),
                torch.cat([p["prediction"] for p in predictions]).cpu(),
            ],
            dim=1,
        ).tolist()
        confidence = torch.cat([p["confidence"] for p in predictions]).float().cpu().tolist()
        rows = [[*row, round(c, 6)] for row, c in zip(rows, confidence, strict=True)]
        if trainer.world_size > 1:
            part = path.with_suffix(f".rank{trainer.global_rank}.pt")
            run_dir.mkdir(parents=True, exist_ok=True)
            torch.save(rows, part)
            trainer.strategy.barrier()
            if not trainer.is_global_zero:
                return
            parts = [path.with_suffix(f".rank{r}.pt") for r in range(trainer.world_size)]
            rows = sorted(row for p in parts for row in torch.load(p))
            for p in parts:
                p.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "target", "prediction", "confidence"])
            writer.writerows(rows)
        tmp.replace(path)
        self.path = path
        print(f"Predictions for {len(rows)} images written to {path}")
