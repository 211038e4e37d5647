"""End to end: the real config.yaml through main.py, on synthetic MNIST, shortened with small limits."""

import csv
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchvision.datasets import MNIST

from mnist.cli import MNISTCLI
from mnist.networks import MLP
from tests.conftest import CONFIG, N_TEST, assert_same_weights, run_main
from tests.conftest import cli_in_process as cli

RUN = Path("logs") / "lightning_logs" / "version_0"


def scalars(run_dir: Path) -> dict[str, list]:
    """A run's curves by the name the model logs them under: ``val/loss`` is the tag ``loss`` of the run ``val``."""
    curves = {}
    for stage in [p for p in run_dir.iterdir() if p.is_dir() and p.name != "checkpoints"]:
        events = EventAccumulator(str(stage), size_guidance={"scalars": 0})
        events.Reload()
        curves.update({f"{stage.name}/{tag}": events.Scalars(tag) for tag in events.Tags()["scalars"]})
    return curves


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_dir):
    """One 2-epoch fit in a fresh working directory, shared by the tests that only read its results."""
    cwd = tmp_path_factory.mktemp("work")
    args = [
        "fit", "--config", str(CONFIG), "--data.data_dir", str(mnist_dir), "--data.val_size", "100",
        "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "5", "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        cli(args)
    return cwd


def test_fit_writes_one_run_directory(trained):
    run = trained / "logs" / "lightning_logs" / "version_0"
    assert sorted(p.name for p in (trained / "logs" / "lightning_logs").iterdir()) == ["version_0"]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in names and any(n.startswith("epoch01-val_loss") for n in names)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["network"]["init_args"]["hidden_sizes"] == [256, 128]
    assert config["data"]["init_args"]["batch_size"] == 32 and config["trainer"]["max_epochs"] == 2


def test_tensorboard_has_the_curves_at_the_training_step(trained):
    curves = scalars(trained / "logs" / "lightning_logs" / "version_0")
    for tag in ("train/loss_step", "train/loss", "train/acc", "val/loss", "val/acc", "best_val/loss"):
        assert tag in curves, sorted(curves)
    assert "train/lr" in curves and all(s.value == pytest.approx(0.01) for s in curves["train/lr"])
    assert len(curves["val/loss"]) == 2
    # Step values every log_every_n_steps (5) steps, at the step they were taken, over both epochs (16 steps each).
    assert [s.step for s in curves["train/loss_step"]] == list(range(4, 32, 5))
    assert [s.step for s in curves["train/lr"]] == list(range(4, 32, 5))
    # Epoch values sit at the training step they were taken at.
    steps_per_epoch = -(-500 // 32)
    assert [s.step for s in curves["val/loss"]] == [steps_per_epoch, 2 * steps_per_epoch]
    assert [s.step for s in curves["train/acc"]] == [steps_per_epoch, 2 * steps_per_epoch]
    assert [s.step for s in curves["train/loss"]] == [steps_per_epoch, 2 * steps_per_epoch]


def test_test_in_a_new_process_from_best_without_config(trained, mnist_dir):
    result = run_main(["test", "--ckpt_path", "best", "--data.data_dir", str(mnist_dir)], cwd=trained)
    assert result.returncode == 0, result.stderr
    assert (
        "Using the best checkpoint of logs/lightning_logs/version_0: logs/lightning_logs/version_0/checkpoints/epoch"
        in result.stderr
    )
    assert "Using the config of the run that wrote" in result.stderr
    assert "test/acc" in result.stdout and "test/loss" in result.stdout
    # In the run itself, at the tested checkpoint's step, where HParams finds it.
    curves = scalars(trained / "logs" / "lightning_logs" / "version_0")
    best_step = torch.load(next((trained / RUN / "checkpoints").glob("epoch*.ckpt")), weights_only=True)["global_step"]
    assert [s.step for s in curves["test/acc"]] == [best_step]
    # The run's own config: evaluation in batches of 1000 (config.yaml), not the command line's default 32.
    saved = yaml.safe_load(max((trained / RUN).glob("config-*.yaml")).read_text())
    assert saved["data"]["init_args"]["eval_batch_size"] == 1000


@pytest.mark.parametrize("which", ["best", "last"])
def test_validate_resolves_best_and_last(trained, mnist_dir, capsys, which):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(trained)
        cli(["validate", "--config", str(CONFIG), "--ckpt_path", which, "--data.data_dir", str(mnist_dir),
             "--data.val_size", "100", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    err = capsys.readouterr().err
    expected = "last.ckpt" if which == "last" else "epoch01-val_loss"
    assert f"Using the {which} checkpoint of {RUN}: {RUN}/checkpoints/{expected}" in err


def test_predict_writes_a_csv_into_the_run(trained, mnist_dir, capsys):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(trained)
        cli(["predict", "--config", str(CONFIG), "--ckpt_path", "best", "--data.data_dir", str(mnist_dir),
             "--trainer.enable_progress_bar", "false"])  # fmt: skip
    out = capsys.readouterr().out
    path = next((trained / "logs" / "lightning_logs" / "version_0").glob("predictions-*.csv"))
    assert f"written to logs/lightning_logs/version_0/{path.name}" in out
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["index", "target", "prediction", "class_name", "confidence"]
    assert {r["class_name"] for r in rows} <= set(MNIST.classes)
    assert [int(r["index"]) for r in rows] == list(range(N_TEST))
    assert [int(r["target"]) for r in rows] == MNIST(str(mnist_dir), train=False).targets.tolist()
    assert all(0.1 <= float(r["confidence"]) <= 1 for r in rows)
    accuracy = sum(r["target"] == r["prediction"] for r in rows) / len(rows)
    assert accuracy > 0.5, "two epochs on the synthetic digits should learn most of them"


def test_step_curves_with_accumulated_gradients_log_each_optimizer_step_once(tmp_path, fast_args, monkeypatch):
    # 16 batches an epoch, 2 a step: 8 steps an epoch. Logged every 3rd step (2, 5, ...), at the batch that makes it.
    monkeypatch.chdir(tmp_path)
    cli(["fit", *fast_args, "--trainer.accumulate_grad_batches", "2", "--trainer.log_every_n_steps", "3"])
    curves = scalars(tmp_path / RUN)
    assert [s.step for s in curves["train/loss_step"]] == [2, 5, 8, 11, 14]
    assert [s.step for s in curves["train/loss"]] == [8, 16]


def test_second_fit_opens_a_new_run_and_resume_continues_it(tmp_path, fast_args, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "logs" / "lightning_logs"
    cli(["fit", *fast_args, "--trainer.max_epochs", "1"])
    cli(["fit", *fast_args, "--trainer.max_epochs", "1"])
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]
    first_config = (runs / "version_0" / "config.yaml").read_text()
    steps_before = max(s.step for s in scalars(runs / "version_1")["train/loss_step"])

    cli(["fit", *fast_args, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"], "resume opened a new run"
    assert (runs / "version_0" / "config.yaml").read_text() == first_config
    assert (runs / "version_1" / "config-1.yaml").is_file()
    curves = scalars(runs / "version_1")
    assert max(s.step for s in curves["train/loss_step"]) > steps_before
    assert [s.step for s in curves["val/loss"]] == sorted({s.step for s in curves["val/loss"]})
    assert len(curves["val/loss"]) == 2
    last = torch.load(runs / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1


def test_last_checkpoint_is_the_last_epoch_also_after_epochs_that_did_not_improve(tmp_path, fast_args, monkeypatch):
    # Monitoring the logged `step` for its minimum makes every epoch after the first one worse. Lightning 2.6 writes
    # last.ckpt only when the monitored checkpoint improves, which left it at the first epoch.
    worse = ["--checkpoint.monitor", "step", "--checkpoint.mode", "min"]
    monkeypatch.chdir(tmp_path)
    cli(["fit", *fast_args, "--trainer.max_epochs", "3", *worse])
    checkpoints = tmp_path / RUN / "checkpoints"
    assert [p.name[:7] for p in checkpoints.glob("epoch*.ckpt")] == ["epoch00"]
    first = torch.load(next(checkpoints.glob("epoch*.ckpt")), weights_only=True)["global_step"]
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, 3 * first)
    # It resumes exactly: 3 epochs and 1 more end with the weights of 4 in one go.
    cli(["fit", *fast_args, "--trainer.max_epochs", "4", *worse, "--ckpt_path", "last"])
    resumed = torch.load(checkpoints / "last.ckpt", weights_only=True)
    monkeypatch.chdir(tmp_path / "logs")
    cli(["fit", *fast_args, "--trainer.max_epochs", "4", *worse])
    whole = torch.load(tmp_path / "logs" / RUN / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == whole["global_step"] == 4 * first
    assert_same_weights(resumed["state_dict"], whole["state_dict"])


def test_cnn_preset_is_tested_and_exported_as_a_cnn_without_config(tmp_path, fast_args, mnist_dir, monkeypatch, capsys):
    # configs/cnn.yaml as shipped (label smoothing, shifted images, one-cycle), on a narrower network.
    monkeypatch.chdir(tmp_path)
    cnn = ["--config", str(CONFIG.parent / "configs" / "cnn.yaml"), "--model.network.init_args.channels", "[4, 8]",
           "--model.network.init_args.hidden_size", "16", "--trainer.max_epochs", "1"]  # fmt: skip
    cli(["fit", *fast_args, *cnn])
    capsys.readouterr()
    cli(["test", "--ckpt_path", "last", "--data.data_dir", str(mnist_dir), "--trainer.enable_progress_bar", "false"])
    assert "test/acc" in capsys.readouterr().out
    from mnist.export import main as export_main

    # The export is checked against the checkpoint's logits: the channels-last layout changes none of them.
    export_main(["--ckpt_path", str(tmp_path / RUN / "checkpoints" / "last.ckpt"), "--format", "torch.export",
                 "--output", str(tmp_path / "cnn.pt2"), "--data_dir", str(mnist_dir)])  # fmt: skip
    assert (tmp_path / "cnn.pt2").stat().st_size > 0


def test_lightnings_weight_averaging_callback_copies_the_model_and_saves_the_average(tmp_path, fast_args, monkeypatch):
    # EMAWeightAveraging deep-copies the whole LightningModule, the optimizer factory LightningCLI built included.
    monkeypatch.chdir(tmp_path)
    cli(["fit", *fast_args, "--trainer.max_epochs", "1",
         "--trainer.callbacks+=pytorch_lightning.callbacks.EMAWeightAveraging"])  # fmt: skip
    last = torch.load(tmp_path / RUN / "checkpoints" / "last.ckpt", weights_only=True)
    # The checkpoint's weights are the average; the training weights are kept beside them, and differ.
    trained = {k: v for k, v in last["current_model_state"].items() if k.startswith("network.")}
    assert trained and any(not torch.equal(last["state_dict"][k], v) for k, v in trained.items())


def test_optimizer_is_chosen_on_the_command_line_and_saved(tmp_path, fast_args, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli(["fit", *fast_args, "--trainer.max_epochs", "1", "--model.optimizer", "Adam",
         "--model.optimizer.init_args.lr", "0.002"])  # fmt: skip
    last = torch.load(tmp_path / "logs/lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    saved = last["hyper_parameters"]["optimizer"]
    assert saved["class_path"] == "torch.optim.Adam" and saved["init_args"]["lr"] == 0.002
    assert last["optimizer_states"][0]["param_groups"][0]["lr"] == 0.002


def test_a_fit_feeds_the_network_what_forward_gives_it_for_the_same_pixels(tmp_path, fast_args, monkeypatch):
    # The data module normalises its images once in memory; the model must not normalise its batches again, and its
    # forward (exports, the server) must do what the data module did.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["main.py"])
    run = MNISTCLI(args=["fit", *fast_args, "--trainer.max_epochs", "1"])
    model, data = run.model, run.datamodule
    assert model.batches_normalized_with == (data.mean, data.std) == (model.hparams.mean, model.hparams.std)
    data.setup("test")
    (batch, _), (pixels, _) = next(iter(data.test_dataloader())), data.load(train=False)
    torch.testing.assert_close(model._batch_logits(batch), model(pixels[: len(batch)]))


def test_help_shows_the_docstrings(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(["fit", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--num_threads", "CPU threads PyTorch may use", "--model.optimizer", "--data CONFIG"):
        assert text in out
    with pytest.raises(SystemExit):
        cli(["fit", "--data.help", "mnist.data.FashionMNISTDataModule"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("Training images held out for validation", "Samples per training batch",
                 "Download the dataset into ``data_dir``"):  # fmt: skip
        assert text in out


def test_print_config_parses_back_to_itself(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli(["fit", "--config", str(CONFIG), "--print_config"])
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        cli(["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert capsys.readouterr().out == printed
    config = yaml.safe_load(printed)
    assert config["data"]["init_args"]["val_size"] == 5000 and config["data"]["init_args"]["batch_size"] == 32
    assert config["model"]["optimizer"]["init_args"]["lr"] == 0.01 and config["trainer"]["max_epochs"] == 5


def test_features_config_yaml_turns_on_can_be_turned_off(tmp_path, fast_args, monkeypatch):
    """config.yaml lists a progress bar and checkpoints; switching each off must not fail."""
    monkeypatch.chdir(tmp_path)
    cli(["fit", *fast_args, "--trainer.max_epochs", "1", "--trainer.enable_checkpointing", "false",
         "--trainer.logger", "false"])  # fmt: skip
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("events.out.tfevents.*"))


def test_fast_preset_stacks_and_its_one_cycle_spans_the_run(tmp_path, fast_args, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fast = str(CONFIG.parent / "configs" / "fast.yaml")
    cli(["fit", *fast_args, "--config", fast, "--trainer.max_epochs", "2", "--data.batch_size", "64"])
    last = torch.load(tmp_path / "logs/lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    scheduler = last["lr_schedulers"][0]
    steps_per_epoch = -(-500 // 64)
    assert scheduler["total_steps"] == 2 * steps_per_epoch and scheduler["last_epoch"] == 2 * steps_per_epoch
    assert last["hyper_parameters"]["optimizer"]["init_args"]["nesterov"] is True
    config = yaml.safe_load((tmp_path / "logs/lightning_logs/version_0/config.yaml").read_text())
    assert (
        config["data"]["init_args"]["batch_size"] == 64
        and config["model"]["lr_scheduler"]["init_args"]["max_lr"] == 0.2
    )


@pytest.mark.slow
def test_compiled_network_keeps_checkpoint_keys_resumes_and_exports(tmp_path, fast_args, mnist_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli(["fit", *fast_args, "--trainer.max_epochs", "1", "--model.compile", "true"])
    last = tmp_path / RUN / "checkpoints" / "last.ckpt"
    keys = set(torch.load(last, weights_only=True)["state_dict"])
    plain = {f"network.{k}" for k in MLP((1, 28, 28), 10).state_dict()}
    assert plain <= keys and not any("_orig_mod" in k or "compiled" in k for k in keys)
    cli(["fit", *fast_args, "--trainer.max_epochs", "2", "--model.compile", "true", "--ckpt_path", "last"])
    assert torch.load(last, weights_only=True)["epoch"] == 1
    from mnist.export import main as export_main

    output = tmp_path / "model.pt2"
    export_main(["--ckpt_path", str(last), "--format", "torch.export", "--output", str(output),
                 "--data_dir", str(mnist_dir)])  # fmt: skip
    assert output.stat().st_size > 0
