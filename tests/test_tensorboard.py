"""What a user sees: TensorBoard's default views of two runs and a test, and the console of a fit.

The log directory is read with TensorBoard's own readers, as its Time Series and HParams tabs read it.
"""

import contextlib
import io
import re

import pytest
import torch

from tests import tensorboard_view as tb
from tests.conftest import CONFIG, run_main
from tests.conftest import cli_in_process as cli

FAST = CONFIG.parent / "configs" / "fast.yaml"
RUN0, RUN1 = "lightning_logs/version_0", "lightning_logs/version_1"
STEPS_PER_EPOCH = -(-500 // 32)  # 600 synthetic training images, 100 for validation, batches of 32


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, mnist_dir):
    """config.yaml fitted in a real process and tested; then a ConvNet with fast.yaml and an overridden lr."""
    cwd = tmp_path_factory.mktemp("work")
    data = ["--data.data_dir", str(mnist_dir), "--data.val_size", "100", "--trainer.max_epochs", "2"]
    fit = run_main(["fit", "--config", str(CONFIG), *data, "--trainer.log_every_n_steps", "5"], cwd=cwd)
    assert fit.returncode == 0, fit.stderr
    test = run_main(["test", "--ckpt_path", "best", "--data.data_dir", str(mnist_dir)], cwd=cwd)
    assert test.returncode == 0, test.stderr
    second = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(second):
        mp.chdir(cwd)
        cli(["fit", "--config", str(CONFIG), "--config", str(FAST), *data, "--model.network", "mnist.networks.ConvNet",
             "--model.optimizer.init_args.lr", "0.05", "--trainer.log_every_n_steps", "1",
             "--trainer.enable_progress_bar", "false"])  # fmt: skip
    return {"logdir": cwd / "logs", "fit": fit, "test": test, "second": second.getvalue()}


def test_time_series_opens_on_accuracy_and_loss_with_stages_overlaid(two_runs):
    runs = tb.load(two_runs["logdir"])
    assert tb.opened_groups(runs) == ["acc", "loss"]
    # One chart per tag, one line per stage: train, val and test loss together, the test at its checkpoint's step.
    train = tb.scalars(runs, f"{RUN0}/train")
    assert {"loss", "acc", "lr", "loss_step"} <= train.keys()
    # The epoch's mean training loss, at the same steps as the validation loss it is drawn with.
    assert [step for step, _ in train["loss"]] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    val, test = tb.scalars(runs, f"{RUN0}/val"), tb.scalars(runs, f"{RUN0}/test")
    assert {"loss", "acc"} <= val.keys() and {"loss", "acc"} <= test.keys()
    assert [step for step, _ in val["loss"]] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    best = next((two_runs["logdir"] / RUN0 / "checkpoints").glob("epoch*.ckpt"))
    assert [step for step, _ in test["acc"]] == [torch.load(best, weights_only=True)["global_step"]]
    assert tb.scalars(runs, f"{RUN0}/best_val")["loss"][-1][1] == pytest.approx(min(v for _, v in val["loss"]))
    assert all(value == pytest.approx(0.01) for _, value in tb.scalars(runs, f"{RUN0}/train")["lr"])
    # Nothing of ours in the version's own run: no stray cards, no placeholder metric at step 0.
    assert tb.scalars(runs, RUN0) == {}


def test_pictures_sit_at_their_scalars_steps(two_runs):
    runs = tb.load(two_runs["logdir"])
    val, test = tb.images(runs, f"{RUN0}/val"), tb.images(runs, f"{RUN0}/test")
    assert val["pictures/confusion_matrix"] == [step for step, _ in tb.scalars(runs, f"{RUN0}/val")["acc"]]
    assert test["pictures/confusion_matrix"] == [step for step, _ in tb.scalars(runs, f"{RUN0}/test")["acc"]]
    assert "pictures/most_confident_mistakes" in val


def test_hparams_show_what_differs_and_the_results(two_runs):
    experiment = tb.hparams_experiment(two_runs["logdir"])
    shown = tb.shown_hparams(experiment)
    # The settings the two runs differ in are ticked on opening; the others are a click away.
    differ = {h.name for h in experiment.hparam_infos if h.differs}
    assert {"lr", "network", "batch_size", "lr_scheduler", "preset"} <= differ and "seed" not in differ
    assert set(shown) <= differ and {"lr", "network"} <= set(shown), shown
    networks = {h.name: list(h.domain_discrete) for h in experiment.hparam_infos}["network"]
    assert sorted(v.split("(")[0] for v in networks) == ["ConvNet", "MLP"]
    names = {h.name for h in experiment.hparam_infos}
    assert {"optimizer", "optimizer.momentum", "seed", "data.seed", "precision", "preset", "dataset"} <= names
    assert not any("dir" in name or "path" in name or "foreach" in name for name in names), names
    assert {"best_val.loss", "val.acc", "test.loss", "test.acc"} <= set(tb.shown_metrics(experiment))


def test_logged_lr_is_the_one_that_applies(two_runs):
    # The second run's optimizer lr (0.05) is overridden by the one-cycle schedule's max_lr (0.2): said once.
    assert two_runs["second"].count("warning: the one-cycle schedule sets the learning rate") == 1
    experiment = tb.hparams_experiment(two_runs["logdir"])
    lrs = {h.name: h for h in experiment.hparam_infos}["lr"].domain_interval
    assert (lrs.min_value, lrs.max_value) == (pytest.approx(0.01), pytest.approx(0.2))
    runs = tb.load(two_runs["logdir"])
    assert max(v for _, v in tb.scalars(runs, f"{RUN1}/train")["lr"]) <= 0.2 + 1e-6


def test_console_of_a_fit_says_what_matters(two_runs):
    out = two_runs["fit"].stdout + two_runs["fit"].stderr
    for noise in ("💡", "litlogger", "LeafSpec", "estimate number of stepping batches", "`Trainer.fit` stopped"):
        assert noise not in out, noise
    # The model summary lists the network, not the metric objects.
    assert "| network | MLP" in out and "MeanMetric" not in out and "MulticlassAccuracy" not in out
    err = two_runs["fit"].stderr
    assert "Run directory: logs/lightning_logs/version_0" in err
    assert re.search(r"Best checkpoint \(val/loss \d+\.\d{4}\): logs/.*-val_acc\d\.\d{4}\.ckpt", err), err
    curves = "Curves: tensorboard --logdir logs/lightning_logs, then open http://localhost:6006/?smoothing=0"
    assert err.rstrip().endswith(curves)
    test = two_runs["test"]
    assert "test/acc" in test.stdout
    assert test.stderr.rstrip().endswith(f"Logged to: logs/lightning_logs/version_0\n{curves}")
