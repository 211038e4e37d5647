"""Bad input gets one clear line on stderr and a non-zero exit, never a traceback, and nothing is lost."""

import argparse
import os

import pytest
import torch

from tests.conftest import CONFIG, cli_in_process, run_main


def fails(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        cli_in_process(args)
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--data.batch_size", "abc"], 2, 'Parser key "data.batch_size":\n  Not of type PositiveInt'),
        (["--data.batch_size", "0"], 2, "0 does not conform to restriction v>0"),
        (["--data.max_shift", "-1"], 2, "-1 does not conform to restriction v>=0"),
        (["--model.label_smoothing", "1.5"], 2, "1.5 does not conform to restriction v>=0 and v<=1"),
        (["--data.val_size", "600"], 1, "error: data.val_size (600) must be smaller than the 600 training images"),
        (["--data.bacth_size", "8"], 2, "error: unrecognized arguments: --data.bacth_size"),
        (["--model.scheduler_interval", "weekly"], 2, "Expected a typing.Literal['epoch', 'step']. Got value: weekly"),
        (["--config", "missing.yaml"], 2, "File does not exist"),
        (["--trainer.max_epochs", "-3"], 1, "error: `max_epochs` must be a non-negative integer or -1"),
        (["--ckpt_path", "missing.ckpt"], 1, "error: checkpoint missing.ckpt does not exist"),
        (["--ckpt_path", "."], 1, "error: checkpoint . is not a file"),
        (["--ckpt_path", str(CONFIG)], 1, f"error: {CONFIG} is not a readable checkpoint"),
        (["--ckpt_path", "last"], 1, "error: no checkpoint found under logs/; train one first"),
        (["--data.download", "false", "--data.data_dir", "nowhere"], 1, "expected train-images-idx3-ubyte"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, monkeypatch, capsys, fast_args, extra, code, message):
    monkeypatch.chdir(tmp_path)
    exit_code, err = fails(["fit", *fast_args, *extra], capsys)
    assert exit_code == code
    assert message in err
    assert len(err.strip().splitlines()) <= 4, err
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").rglob("*.ckpt"))


def test_unreadable_checkpoint_is_named(tmp_path, monkeypatch, capsys, fast_args):
    path = tmp_path / "locked.ckpt"
    path.write_bytes(b"x")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads every file: fail the read the way the OS would for a user

        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(torch, "load", denied)
    monkeypatch.chdir(tmp_path)
    code, err = fails(["test", *fast_args, "--ckpt_path", str(path)], capsys)
    assert code == 1 and f"checkpoint {path} cannot be read" in err


def test_network_shape_mismatch_is_one_line(tmp_path, monkeypatch, capsys, fast_args):
    """A checkpoint without saved hyperparameters cannot bring its network along; a mismatch is one line."""
    monkeypatch.chdir(tmp_path)
    cli_in_process(["fit", *fast_args, "--trainer.max_epochs", "1"])
    capsys.readouterr()
    path = tmp_path / "logs/lightning_logs/version_0/checkpoints/last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["hyper_parameters"]
    torch.save(checkpoint, tmp_path / "bare.ckpt")
    code, err = fails(
        ["test", *fast_args, "--ckpt_path", "bare.ckpt", "--model.network.init_args.hidden_sizes", "[64]"], capsys
    )
    assert code == 1
    assert "error: the checkpoint's network does not match the configured one" in err
    assert "Traceback" not in err


def test_no_traceback_in_a_real_process(tmp_path, mnist_dir):
    """What a user sees: the message and exit code 1, no Python traceback."""
    result = run_main(["test", "--config", str(CONFIG), "--ckpt_path", "nope.ckpt"], cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: checkpoint nope.ckpt does not exist"
    result = run_main(["fit", "--config", str(CONFIG), "--data.val_size", "70000", "--data.download", "false",
                       "--data.data_dir", str(mnist_dir)], cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: data.val_size (70000) must be smaller than the 600 training images" in result.stderr


def test_checkpoint_needing_unsafe_loading_is_refused_unless_trusted(tmp_path, monkeypatch, capsys, fast_args):
    monkeypatch.chdir(tmp_path)
    cli_in_process(["fit", *fast_args, "--trainer.max_epochs", "1"])
    checkpoint = torch.load(tmp_path / "logs/lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    checkpoint["note"] = argparse.Namespace(origin="pickled object")  # unpickling it would run code
    torch.save(checkpoint, tmp_path / "pickled.ckpt")
    capsys.readouterr()
    code, err = fails(["test", *fast_args, "--ckpt_path", "pickled.ckpt"], capsys)
    assert code == 1
    assert err.strip() == (
        "error: checkpoint pickled.ckpt holds Python objects whose loading could run arbitrary code; "
        "if you trust where it comes from, add --weights_only false"
    )
    cli_in_process(["test", *fast_args, "--ckpt_path", "pickled.ckpt", "--weights_only", "false"])
    assert "test/acc" in capsys.readouterr().out
