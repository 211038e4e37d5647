"""Off the tutorial's path: other loggers and datasets, runs continued from a checkpoint alone, shell completion."""

import csv
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image
from torchvision.datasets import FashionMNIST

from tests.conftest import CONFIG, ROOT, RUNS, VAL_SIZE, run_main
from tests.conftest import cli_in_process as cli
from tests.fake_mnist import write_fake_mnist

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
ONE_EPOCH = ["--trainer.max_epochs", "1"]


def test_csv_logger_run_is_found_evaluated_and_gets_pictures(tmp_path, fast_args, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli(["fit", *fast_args, *ONE_EPOCH, "--trainer.logger", "CSVLogger",
         "--trainer.logger.save_dir", "csv_logs"])  # fmt: skip
    run = tmp_path / "csv_logs" / "lightning_logs" / "version_0"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert any(row["val/loss"] for row in rows) and any(row["train/acc"] for row in rows)
    (picture,) = (run / "images" / "val" / "confusion_matrix").glob("step_*.png")  # one validation, one picture
    with Image.open(picture) as image:
        assert image.mode == "RGB" and min(image.size) > 400
    assert yaml.safe_load((run / "hparams.yaml").read_text())["lr"] == 0.01
    capsys.readouterr()
    # No --config: the checkpoint is found under the run's own logger folder, and its config says where.
    cli(["test", "--ckpt_path", "last", "--trainer.default_root_dir", "csv_logs", *QUIET])
    captured = capsys.readouterr()
    assert (
        f"Using the last checkpoint of csv_logs/lightning_logs/version_0: {run.relative_to(tmp_path)}" in captured.err
    )
    assert "test/acc" in captured.out


def test_without_a_logger_checkpoints_are_still_found(tmp_path, fast_args, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli(["fit", *fast_args, *ONE_EPOCH, "--trainer.logger", "false"])
    assert (tmp_path / "logs" / "checkpoints" / "last.ckpt").is_file()
    capsys.readouterr()
    cli(["validate", "--ckpt_path", "best", *QUIET])
    assert "Using the best checkpoint of logs: logs/checkpoints/epoch00-val_loss" in capsys.readouterr().err


def test_two_loggers_at_once(tmp_path, fast_args, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    loggers = {"trainer": {"logger": [
        {"class_path": "pytorch_lightning.loggers.TensorBoardLogger", "init_args": {"save_dir": "logs"}},
        {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": "logs", "name": "csv"}},
    ]}}  # fmt: skip
    (tmp_path / "loggers.yaml").write_text(yaml.safe_dump(loggers))
    cli(["fit", *fast_args, *ONE_EPOCH, "--config", "loggers.yaml"])
    assert list((tmp_path / RUNS / "version_0").glob("events.out.tfevents.*"))
    assert (tmp_path / "logs" / "csv" / "version_0" / "metrics.csv").is_file()
    capsys.readouterr()
    cli(["test", "--ckpt_path", "best", *QUIET])
    assert "test/acc" in capsys.readouterr().out


def test_default_root_dir_places_the_runs(tmp_path, fast_args, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli(["fit", *fast_args, *ONE_EPOCH, "--trainer.default_root_dir", "elsewhere"])
    assert (tmp_path / "elsewhere" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "logs").exists()


def test_a_run_continues_from_its_checkpoint_alone(tmp_path, fast_args, mnist_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli(["fit", *fast_args, *ONE_EPOCH, "--data.batch_size", "64"])
    capsys.readouterr()
    cli(["fit", "--ckpt_path", "last", "--trainer.max_epochs", "2"])
    assert "Using the config of the run that wrote" in capsys.readouterr().err
    run = tmp_path / RUNS / "version_0"
    resumed = yaml.safe_load((run / "config-1.yaml").read_text())
    # The run's data (its folder, batch 64), not the command line's defaults; the flag on top of it.
    assert resumed["data"]["init_args"]["batch_size"] == 64 and resumed["trainer"]["max_epochs"] == 2
    assert resumed["data"]["init_args"]["data_dir"] == str(mnist_dir)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 * -(-(600 - VAL_SIZE) // 64)
    assert not (tmp_path / RUNS / "version_1").exists()


def test_a_run_that_cannot_continue_says_why(tmp_path, fast_args):
    fast = str(ROOT / "configs" / "fast.yaml")
    result = run_main(["fit", *fast_args, "--config", fast, *ONE_EPOCH], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for epochs, message in (("2", "one-cycle schedule spans"), ("1", "nothing was trained")):
        result = run_main(["fit", "--ckpt_path", "last", "--trainer.max_epochs", epochs], cwd=tmp_path)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], result.stderr


@pytest.mark.parametrize(
    ("how", "folder", "names"),
    [
        (["--config", str(ROOT / "configs" / "fashion.yaml")], "FashionMNIST", FashionMNIST.classes),
        (["--data", "mnist.data.KMNISTDataModule"], "KMNIST", ["o", "ki", "su", "tsu", "na"]),
    ],
)
def test_other_datasets_flow_into_model_predictions_and_export(
    tmp_path, fast_args, monkeypatch, capsys, how, folder, names
):
    data_dir = tmp_path / "data"
    write_fake_mnist(data_dir, folder=folder)
    monkeypatch.chdir(tmp_path)
    cli(["fit", *fast_args, *how, "--data.data_dir", str(data_dir), *ONE_EPOCH])
    run = tmp_path / RUNS / "version_0"
    model = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert model["class_names"][:5] == names[:5] and model["mean"] != 0.1307
    cli(["predict", "--ckpt_path", "last", *QUIET])
    rows = list(csv.DictReader(next(run.glob("predictions-*.csv")).open()))
    assert {row["class_name"] for row in rows} <= set(model["class_names"])
    from mnist.export import load

    assert load(run / "checkpoints" / "last.ckpt").hparams.mean == model["mean"]


def test_bring_your_own_data_is_one_class_and_one_preset(tmp_path, mnist_dir, monkeypatch, capsys):
    """A dataset in another format (here a NumPy file): the README's example, run as a user would."""
    import numpy as np

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(300, 1, 16, 16), dtype=np.uint8)
    labels = np.arange(300) % 3
    for k in range(3):
        images[labels == k, :, 4 * k : 4 * k + 4, :] = 255
    np.savez(tmp_path / "shapes.npz", images=images, labels=labels)
    (tmp_path / "my_data.py").write_text(
        (ROOT / "README.md").read_text().split("```python\n# my_data.py\n")[1].split("```")[0]
    )
    (tmp_path / "my_data.yaml").write_text(
        "data:\n  class_path: my_data.ShapesDataModule\n  init_args:\n    data_dir: shapes.npz\n    val_size: 50\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    cli(["fit", "--config", str(CONFIG), "--config", "my_data.yaml", "--trainer.max_epochs", "2", *QUIET])
    model = torch.load(tmp_path / RUNS / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert model["hyper_parameters"]["num_classes"] == 3
    assert model["hyper_parameters"]["image_shape"] == [1, 16, 16]
    capsys.readouterr()
    cli(["test", "--ckpt_path", "last", *QUIET])
    assert "test/acc" in capsys.readouterr().out


@pytest.mark.slow
def test_shell_completion_is_generated_in_seconds_and_completes_data_options(tmp_path):
    pytest.importorskip("shtab", reason="completion scripts need the optional shtab (requirements-dev.txt)")
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--print_completion", "shtab-bash"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (tmp_path / "completion.bash").write_text(result.stdout)
    # What bash does on `python main.py fit --data.b<TAB>`, with the README's lines for `python main.py`.
    readme = (ROOT / "README.md").read_text()
    wrapper = readme.split("```bash\n_main_py_after_python() {")[1].split("```")[0]
    script = (
        f"source completion.bash\n_main_py_after_python() {{{wrapper}\n"
        "COMP_WORDS=(python main.py fit --data.b); COMP_CWORD=3; _main_py_after_python; "
        'printf "%s\\n" "${COMPREPLY[@]}"'
    )
    completed = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert completed.stdout.split() == ["--data.batch_size"], completed.stderr
