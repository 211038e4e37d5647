import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnist.data import MNISTDataModule
from tests.fake_mnist import write_fake_mnist

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config.yaml"
N_TRAIN, N_TEST, VAL_SIZE = 600, 200, 100
RUNS = Path("logs") / "lightning_logs"  # where config.yaml's runs go, relative to the working directory

# What the command line passes from the data module to the model, for tests that build a model alone.
_DATA = MNISTDataModule()
DATA_INFO = {
    "num_classes": _DATA.num_classes,
    "image_shape": _DATA.image_shape,
    "mean": _DATA.mean,
    "std": _DATA.std,
    "class_names": _DATA.class_names,
}


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    """A data_dir with a small synthetic MNIST (600 training, 200 test images) in the real IDX format."""
    data_dir = tmp_path_factory.mktemp("data")
    write_fake_mnist(data_dir, n_train=N_TRAIN, n_test=N_TEST)
    return data_dir


@pytest.fixture
def fast_args(mnist_dir) -> list[str]:
    """The real config.yaml, on the synthetic data, shortened to seconds."""
    return [
        "--config", str(CONFIG),
        "--data.data_dir", str(mnist_dir),
        "--data.val_size", str(VAL_SIZE),
        "--trainer.max_epochs", "2",
        "--trainer.log_every_n_steps", "5",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]  # fmt: skip


def cli_in_process(args: list[str]) -> None:
    """Run the command line of ``main.py`` in this process (seconds faster than a new one), pytest's own argv out."""
    from mnist.cli import run_cli

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["main.py"])
        run_cli(args)


def run_main(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``python main.py ARGS`` in a new process, as a user would."""
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Two state dicts hold the same tensors under the same keys, bit for bit."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"
