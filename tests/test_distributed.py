"""Several processes (DDP on CPU) and several nodes (torchrun on localhost) give what one process gives."""

import csv
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import CONFIG, N_TEST, ROOT, run_main

pytestmark = pytest.mark.slow


def common(mnist_dir) -> list[str]:
    return ["--config", str(CONFIG), "--data.data_dir", str(mnist_dir), "--data.val_size", "100",
            "--trainer.enable_progress_bar", "false",
            "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp"]  # fmt: skip


def metrics(output: str) -> dict[str, float]:
    return {name: float(value) for name, value in re.findall(r"(val/\w+)\s+([0-9.]+)", output)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, mnist_dir) -> Path:
    cwd = tmp_path_factory.mktemp("ddp")
    result = run_main(["fit", *common(mnist_dir), "--trainer.devices", "2", "--trainer.max_epochs", "2"], cwd=cwd)
    assert result.returncode == 0, result.stderr
    (cwd / "fit.stderr").write_text(result.stderr)
    return cwd


def test_epoch_metrics_are_synced_without_lightning_warnings(ddp_run):
    stderr = (ddp_run / "fit.stderr").read_text()
    assert "sync_dist=True" not in stderr, stderr


def test_two_processes_write_one_run(ddp_run):
    runs = ddp_run / "logs" / "lightning_logs"
    assert [p.name for p in runs.iterdir()] == ["version_0"]
    names = sorted(p.name for p in (runs / "version_0" / "checkpoints").iterdir())
    assert len(names) == 2 and "last.ckpt" in names
    assert torch.load(runs / "version_0/checkpoints/last.ckpt", weights_only=True)["global_step"] == 2 * 8


def test_validation_across_processes_equals_one_process(ddp_run, mnist_dir):
    ckpt = ["--ckpt_path", "logs/lightning_logs/version_0/checkpoints/last.ckpt"]
    results = [
        run_main(["validate", *common(mnist_dir), "--trainer.devices", str(n), *ckpt], cwd=ddp_run) for n in (1, 2)
    ]
    for result in results:
        assert result.returncode == 0, result.stderr
    one, two = (metrics(r.stdout) for r in results)
    assert set(one) == {"val/loss", "val/acc"}
    assert one["val/acc"] == two["val/acc"]
    assert one["val/loss"] == pytest.approx(two["val/loss"], rel=1e-6)


def test_predictions_across_processes_are_written_once_in_order(ddp_run, mnist_dir):
    ckpt = ["--ckpt_path", "logs/lightning_logs/version_0/checkpoints/last.ckpt"]
    result = run_main(["predict", *common(mnist_dir), "--trainer.devices", "2", *ckpt], cwd=ddp_run)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("written to") == 1
    folder = ddp_run / "logs/lightning_logs/version_0"
    assert [p.name for p in folder.iterdir() if "predictions" in p.name] == ["predictions-last.csv"]
    rows = list(csv.DictReader((folder / "predictions-last.csv").open()))
    assert [int(r["index"]) for r in rows] == list(range(N_TEST))


def test_two_nodes_on_localhost_match_one_node_with_two_processes(ddp_run, mnist_dir, tmp_path):
    """torchrun on two 'nodes' of one process each: the same run as one node with two processes."""
    port = str(free_port())
    torchrun = Path(sys.executable).with_name("torchrun")
    nodes = [
        subprocess.Popen(
            [
                str(torchrun),
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(rank),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                str(ROOT / "main.py"),
                "fit",
                *common(mnist_dir),
                "--trainer.devices",
                "1",
                "--trainer.num_nodes",
                "2",
                "--trainer.max_epochs",
                "2",
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    ours = torch.load(tmp_path / "logs/lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    theirs = torch.load(ddp_run / "logs/lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    assert ours["global_step"] == theirs["global_step"]
    # The same arithmetic, but gloo may sum the two gradients in another order across machines than within one.
    torch.testing.assert_close(ours["state_dict"], theirs["state_dict"], rtol=1e-5, atol=1e-7)
    best = [v["best_model_score"] for k, v in ours["callbacks"].items() if k.startswith("ModelCheckpoint")]
    expected = [v["best_model_score"] for k, v in theirs["callbacks"].items() if k.startswith("ModelCheckpoint")]
    torch.testing.assert_close(best, expected, rtol=1e-5, atol=0)
