"""Never lose a run: determinism, exact resume after a kill, signals, the NaN stop, durable checkpoint writes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mnist.checkpoint_io import durable_write
from tests import tensorboard_view as tb
from tests.conftest import CONFIG, ROOT, assert_same_weights, run_main

pytestmark = pytest.mark.slow


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.fixture
def args(mnist_dir) -> list[str]:
    return ["fit", "--config", str(CONFIG), "--data.data_dir", str(mnist_dir), "--data.val_size", "100",
            "--trainer.log_every_n_steps", "3", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mnist_dir) -> Path:
    """A 3-epoch run, never stopped: what every interrupted and resumed run must end with, bit for bit."""
    cwd = tmp_path_factory.mktemp("reference")
    result = run_main(["fit", "--config", str(CONFIG), "--data.data_dir", str(mnist_dir), "--data.val_size", "100",
                       "--trainer.max_epochs", "3", "--trainer.log_every_n_steps", "3",
                       "--trainer.enable_progress_bar", "false"], cwd=cwd)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return cwd / "logs" / "lightning_logs" / "version_0"


def test_two_seeded_runs_are_bit_identical(tmp_path, args, uninterrupted):
    result = run_main([*args, "--trainer.max_epochs", "3"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "logs" / "lightning_logs" / "version_0"
    assert_same_weights(weights(run), weights(uninterrupted))
    ours = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    theirs = torch.load(uninterrupted / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    score = [v["best_model_score"] for k, v in sorted(ours.items()) if k.startswith("ModelCheckpoint")]
    assert score == [v["best_model_score"] for k, v in sorted(theirs.items()) if k.startswith("ModelCheckpoint")]


def test_resume_from_an_epoch_end_checkpoint_is_exact(tmp_path, args, uninterrupted):
    assert run_main([*args, "--trainer.max_epochs", "1"], cwd=tmp_path).returncode == 0
    resumed = run_main([*args, "--trainer.max_epochs", "3", "--ckpt_path", "last"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(weights(tmp_path / "logs/lightning_logs/version_0"), weights(uninterrupted))
    assert_same_step_curve(tmp_path, uninterrupted)


def test_resume_from_a_mid_epoch_step_checkpoint_continues_at_the_next_batch(tmp_path, args, uninterrupted):
    # 16 batches per epoch: stopping at step 20 leaves epoch 1 four batches in.
    first = run_main([*args, "--trainer.max_epochs", "3", "--trainer.max_steps", "20",
                      "--resumable.every_n_train_steps", "10"], cwd=tmp_path)  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert (
        torch.load(tmp_path / "logs/lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)["global_step"]
        == 20
    )
    resumed = run_main([*args, "--trainer.max_epochs", "3", "--ckpt_path", "last"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(weights(tmp_path / "logs/lightning_logs/version_0"), weights(uninterrupted))
    assert_same_step_curve(tmp_path, uninterrupted)


def assert_same_step_curve(cwd: Path, uninterrupted: Path) -> None:
    """The resumed run's step curve went on at the steps, and with the values, of the run never stopped."""
    curve = tb.scalars(tb.load(cwd / "logs"), "lightning_logs/version_0/train")["loss_step"]
    reference = tb.scalars(tb.load(uninterrupted.parent.parent), "lightning_logs/version_0/train")["loss_step"]
    assert [step for step, _ in reference] == list(range(2, 48, 3))  # every 3rd step of 48
    assert curve == reference


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"training ended before the moment to stop it: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "timed out waiting for training to reach the moment to stop it"
        time.sleep(0.02)


def global_step(path: Path) -> int:
    try:
        return torch.load(path, weights_only=True)["global_step"]
    except Exception:  # not written yet
        return -1


@pytest.mark.parametrize("moment", ["first step checkpoint", "first epoch checkpoint", "mid epoch 2"])
def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(tmp_path, args, uninterrupted, moment):
    last = tmp_path / "logs/lightning_logs/version_0/checkpoints/last.ckpt"
    ready = {
        "first step checkpoint": lambda: global_step(last) >= 3,
        "first epoch checkpoint": lambda: any(last.parent.glob("epoch00-*.ckpt")),
        "mid epoch 2": lambda: global_step(last) >= 21,
    }[moment]
    proc = start([*args, "--trainer.max_epochs", "3", "--resumable.every_n_train_steps", "3"], tmp_path)
    wait_for(ready, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    resumed = run_main([*args, "--trainer.max_epochs", "3", "--ckpt_path", "last"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(p.name for p in (tmp_path / "logs/lightning_logs").iterdir()) == ["version_0"]
    assert_same_weights(weights(tmp_path / "logs/lightning_logs/version_0"), weights(uninterrupted))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_resumable_checkpoint_and_says_so(tmp_path, args, uninterrupted, signum):
    last = tmp_path / "logs/lightning_logs/version_0/checkpoints/last.ckpt"
    # A checkpoint every step (weights unchanged by it) keeps training busy writing after the stop check of each
    # step, where a SIGTERM used to reach only Lightning's own handler, which ended the fit with exit code 0 and no
    # checkpoint; it also leaves the remaining 32 steps long enough for the signal to land before the run ends.
    proc = start([*args, "--trainer.max_epochs", "3", "--resumable.every_n_train_steps", "1"], tmp_path)
    wait_for(lambda: global_step(last) >= 16, proc)  # after the first epoch, so the stop lands mid-training
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    name = signal.Signals(signum).name
    assert f"Stopped by {name}; checkpoint saved: logs/lightning_logs/version_0/checkpoints/last.ckpt" in err
    assert "Traceback" not in err
    stopped_at = global_step(last)
    assert 16 < stopped_at < 48, "the signal stopped training between two steps, not at an epoch end"
    resumed = run_main([*args, "--trainer.max_epochs", "3", "--ckpt_path", "last"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(weights(tmp_path / "logs/lightning_logs/version_0"), weights(uninterrupted))


def test_nan_loss_stops_training_with_one_line(tmp_path, args):
    result = run_main([*args, "--trainer.max_epochs", "2", "--model.optimizer.init_args.lr", "1e4"], cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    line = next(line for line in result.stderr.splitlines() if line.startswith("error:"))
    assert "error: training stopped at step" in line and "The learning rate (10000) is probably too high" in line
    assert not list(tmp_path.rglob("*.ckpt")), "a checkpoint of NaN weights was written"


def test_kill_during_a_checkpoint_write_leaves_the_old_file_whole(tmp_path):
    """SIGKILL a process in the middle of writing a large checkpoint: the file is the old one, never a torn one."""
    path = tmp_path / "last.ckpt"
    old = {"state_dict": {"w": torch.ones(3)}}
    torch.save(old, path)
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys; from pathlib import Path; from mnist.checkpoint_io import durable_write\n"
        "durable_write(Path(sys.argv[1]), lambda f: f.write(b'x' * 400_000_000))"), str(path)], cwd=ROOT)  # fmt: skip
    wait_for(lambda: any(p.name.startswith(".last.ckpt.tmp") and p.stat().st_size > 0 for p in tmp_path.iterdir()),
             writer, timeout=60)  # fmt: skip
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], old["state_dict"]["w"])


def test_durable_write_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "file"
    durable_write(path, lambda file: file.write(b"old"))

    def crash(*args):
        raise OSError("power cut before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        durable_write(path, lambda file: file.write(b"new"))
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["file"]
    monkeypatch.undo()
    durable_write(path, lambda file: file.write(b"new"))
    assert path.read_bytes() == b"new"


def test_durable_write_of_a_writer_that_fails_leaves_the_old_file(tmp_path):
    path = tmp_path / "last.ckpt"
    durable_write(path, lambda file: torch.save({"w": torch.ones(3)}, file))
    with pytest.raises(AttributeError, match="Can't pickle local object"):  # part-way through the save
        durable_write(path, lambda file: torch.save({"w": torch.zeros(3), "bad": lambda: 0}, file))
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3)) and os.listdir(tmp_path) == [path.name]
