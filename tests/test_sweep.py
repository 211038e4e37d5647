"""Sweeps: real `python -m mnist.sweep` runs on synthetic MNIST, the study read back with Optuna."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests import tensorboard_view as tb
from tests.conftest import CONFIG, ROOT, run_main

optuna = pytest.importorskip("optuna")
SQLAlchemyError = pytest.importorskip("sqlalchemy.exc").SQLAlchemyError  # Optuna's storage layer

SPACE = {
    "model.optimizer.init_args.lr": {"type": "float", "low": 0.00001, "high": 0.3, "log": True},
    "data.init_args.batch_size": {"type": "categorical", "choices": [32, 64]},
}


@pytest.fixture
def base(tmp_path, mnist_dir) -> list[str]:
    """The sweep's command line on the synthetic data, with SPACE, in seconds per trial."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    return ["--config", str(CONFIG), "--space", str(space), "--data.data_dir", str(mnist_dir),
            "--data.val_size", "100", "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "5",
            "--heartbeat", "2"]  # fmt: skip


def sweep(args: list[str], cwd: Path, wait: bool = True):
    command = [sys.executable, "-m", "mnist.sweep", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def study(cwd: Path, name: str = "space") -> optuna.Study:
    storage = f"sqlite:///{cwd / 'logs' / 'sweeps' / name / 'study.db'}"
    return optuna.load_study(study_name=name, storage=storage)


def states(trials) -> list[str]:
    return [t.state.name for t in sorted(trials, key=lambda t: t.number)]


@pytest.mark.slow
def test_three_trials_end_to_end_and_best_yaml_trains(tmp_path, base):
    result = sweep([*base, "--trials", "3", "--test", "--seed", "1"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    trials = study(tmp_path).trials
    assert states(trials) == ["COMPLETE"] * 3
    assert all("test/acc" in t.user_attrs for t in trials)
    sweep_dir = tmp_path / "logs" / "sweeps" / "space"
    rows = (sweep_dir / "trials.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("trial,state,val/loss,test/acc,test/loss,seconds")
    for name in ("history.png", "importances.png", "parallel_coordinates.png"):
        assert (sweep_dir / name).stat().st_size > 1000, name
    # Each trial is a run of its own; HParams compares them by the swept settings.
    for n in range(3):
        assert (sweep_dir / "trials" / f"trial_{n:04d}" / "config.yaml").is_file()
    experiment = tb.hparams_experiment(sweep_dir / "trials")
    assert {"lr", "batch_size"} & {h.name for h in experiment.hparam_infos if h.differs}
    # best.yaml trains as it is, as an ordinary run with the best trial's values.
    best = min((t for t in trials), key=lambda t: t.value)
    assert f"Best: trial {best.number}," in result.stdout
    settings = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert settings["model"]["optimizer"]["init_args"]["lr"] == pytest.approx(best.params[next(iter(SPACE))])
    assert "logger" not in settings["trainer"] and "enable_progress_bar" not in settings["trainer"]
    fit = run_main(["fit", "--config", str(sweep_dir / "best.yaml"), "--trainer.max_epochs", "1"], cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr
    assert (tmp_path / "logs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_resumes_after_kill_9_without_losing_or_repeating_trials(tmp_path, base):
    args = [*base, "--trials", "4"]
    first = sweep(args, cwd=tmp_path, wait=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if not (tmp_path / "logs" / "sweeps" / "space" / "study.db").exists():
            continue
        try:
            if any(t.state.name == "COMPLETE" for t in study(tmp_path).trials):
                break
        except (KeyError, SQLAlchemyError):  # the storage is there, the study not yet, or its tables being made
            continue
    first.send_signal(signal.SIGKILL)
    first.communicate()
    done = {t.number: (t.value, t.datetime_complete) for t in study(tmp_path).trials if t.state.name == "COMPLETE"}
    assert done, "no trial completed before the kill"
    time.sleep(7)  # past the heartbeat's grace period (3 x 2 s): the killed trial is seen as dead
    again = sweep(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    trials = study(tmp_path).trials
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED", "FAIL")]
    assert len(finished) == 4 and "RUNNING" not in states(trials)
    for number, (value, when) in done.items():  # kept as they were, not run again
        assert (trials[number].value, trials[number].datetime_complete) == (value, when)
        assert not (tmp_path / "logs/sweeps/space/trials" / f"trial_{number:04d}" / "config-1.yaml").exists()


def test_a_trial_whose_process_died_before_it_began_is_failed_once_its_grace_is_over(tmp_path):
    # A kill -9 between Optuna creating a trial and its first heartbeat leaves a running trial no heartbeat check
    # will ever fail. Seen in the kill -9 test above, when the kill came just as the next trial was created.
    from mnist.sweep import fail_unbegun_trials, open_study, parse

    opts = parse(["--config", "c.yaml", "--space", "space.yaml", "--sweep_dir", str(tmp_path), "--heartbeat", "1"])
    unbegun = open_study(opts).ask()  # created, then its process "dies": no parameters, no heartbeat
    running = open_study(opts).ask()  # a live trial: its objective suggested its parameters
    running.suggest_float("lr", 0.001, 0.1)
    fail_unbegun_trials(study := open_study(opts), grace_seconds=1)
    assert states(study.trials) == ["RUNNING", "RUNNING"]  # both still within the grace period
    time.sleep(1.5)
    just_created = open_study(opts).ask()
    fail_unbegun_trials(study, grace_seconds=1)
    assert [unbegun.number, running.number, just_created.number] == [0, 1, 2]
    assert states(study.trials) == ["FAIL", "RUNNING", "RUNNING"]


def test_plots_leave_out_importances_until_two_trials_complete(tmp_path, recwarn):
    from mnist.sweep import save_plots

    study = optuna.create_study()
    lr = optuna.distributions.FloatDistribution(0.001, 0.1, log=True)
    batch = optuna.distributions.CategoricalDistribution([32, 64])
    for n, value in enumerate([0.5, 0.3, 0.4]):
        study.add_trial(optuna.trial.create_trial(params={"lr": 0.001 * 10**n, "batch": 32 + 32 * (n % 2)},
                                                  distributions={"lr": lr, "batch": batch}, value=value))  # fmt: skip
        saved = {path.name for path in save_plots(study, tmp_path, "val/loss")}
        if n == 0:
            assert saved == {"history.png", "parallel_coordinates.png"}, saved  # one trial ranks no parameter
            assert not [w for w in recwarn if "importances" in str(w.message)]
    assert saved == {"history.png", "importances.png", "parallel_coordinates.png"}


@pytest.mark.slow
def test_pruned_and_failing_trials_do_not_stop_the_sweep(tmp_path, base):
    space = {**SPACE, "model.optimizer.init_args.momentum": {"type": "categorical", "choices": [0.0, -1.0]}}
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(space))
    # The study made ahead with three trials queued: a good one, one that learns nothing, one SGD refuses.
    (tmp_path / "logs" / "sweeps" / "space").mkdir(parents=True)
    made = optuna.create_study(
        study_name="space", storage=f"sqlite:///{tmp_path / 'logs/sweeps/space/study.db'}", direction="minimize"
    )
    lr, batch, momentum = space
    for params in ({lr: 0.1, batch: 32, momentum: 0.0}, {lr: 0.00001, batch: 32, momentum: 0.0},
                   {lr: 0.1, batch: 32, momentum: -1.0}):  # fmt: skip
        made.enqueue_trial(params)
    result = sweep([*base, "--trials", "3", "--startup_trials", "1", "--pruner_warmup_epochs", "0"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert states(study(tmp_path).trials) == ["COMPLETE", "PRUNED", "FAIL"]
    assert "trial 1: pruned" in result.stderr
    assert "trial 2: fail" in result.stderr and "momentum" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path, base):
    args = [*base, "--trials", "6"]
    workers = [sweep(args, cwd=tmp_path, wait=False) for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err for _, err in outputs]
    trials = study(tmp_path).trials
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED", "FAIL")]
    # A worker stops once the study holds 6 finished trials; the other may be finishing one more.
    assert 6 <= len(finished) <= 7 and "FAIL" not in states(trials)
    ran = [{line.split(":")[0] for line in err.splitlines() if line.startswith("trial ") and "finished)" in line}
           for _, err in outputs]  # fmt: skip
    assert not ran[0] & ran[1], "a trial ran in both workers"
    runs = sorted(p.name for p in (tmp_path / "logs/sweeps/space/trials").iterdir())
    assert runs == [f"trial_{t.number:04d}" for t in sorted(trials, key=lambda t: t.number)]


@pytest.fixture
def in_process(monkeypatch):
    """Run the sweep's main() here: sys.argv and Lightning's log levels are put back afterwards."""
    from mnist.sweep import main

    monkeypatch.setattr(sys, "argv", ["sweep"])
    levels = {name: logging.getLogger(name).level for name in ("pytorch_lightning", "lightning_fabric")}
    yield main
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def one_error(capsys, main, args) -> str:
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code not in (0, None)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"model.optimizer.init_args.lrr": {"type": "float", "low": 0.01, "high": 0.1}}, "lrr"),
        ({"model.optimizer.init_args.lr": {"type": "float", "low": 0.1, "high": 0.01}}, "low"),
        ({"model.optimizer.init_args.lr": {"type": "uniform", "low": 0.01, "high": 0.1}}, "type: float"),
        ({"data.init_args.batch_size": {"type": "categorical", "choices": ["many"]}}, "batch_size"),
    ],
)
def test_bad_space_is_one_error_before_any_trial(tmp_path, base, in_process, capsys, monkeypatch, entry, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(entry))
    assert expected in one_error(capsys, in_process, base)
    assert not (tmp_path / "logs" / "sweeps" / "space" / "trials").exists()


def test_unreachable_storage_is_one_error(tmp_path, base, in_process, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_error(capsys, in_process, [*base, "--storage", "sqlite:////nonexistent/folder/study.db"])
    assert "cannot open the study storage sqlite:////nonexistent/folder/study.db" in line


def test_objective_metric_never_logged_is_named_after_the_first_trial(tmp_path, base, in_process, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_error(capsys, in_process, [*base, "--trials", "3", "--metric", "val/accuracy"])
    assert "'val/accuracy' was never logged in trial 0" in line and "val/acc" in line
    assert states(study(tmp_path).trials) == ["FAIL"]


@pytest.mark.slow
def test_workers_started_together_all_open_the_new_study(tmp_path):
    # They race to create the SQLite tables and the study; every one must end up with the same study.
    code = (
        "import sys; from pathlib import Path; from mnist.sweep import parse, open_study; "
        "opts = parse(['--config', 'c.yaml', '--space', 'space.yaml', '--sweep_dir', sys.argv[1]]); "
        "Path(opts.sweep_dir).mkdir(parents=True, exist_ok=True); print(open_study(opts).study_name)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for _ in range(6)
    ]
    outputs = [w.communicate(timeout=120) for w in workers]
    assert [w.returncode for w in workers] == [0] * 6, [err for _, err in outputs]
    assert {out.strip() for out, _ in outputs} == {"space"}
