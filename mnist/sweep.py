"""Hyperparameter search with Optuna over the same command line: every trial is a real ``fit`` of your configs.

python -m mnist.sweep --config config.yaml --space sweeps/mlp.yaml --trials 20 [--KEY VALUE ...]

The study lives in an Optuna storage (an SQLite file in the sweep directory unless ``--storage`` says otherwise),
so the same command continues it after a crash, and several processes or machines can work on one study. Each
trial is logged as a run of its own under ``<sweep dir>/trials/``: ``tensorboard --logdir <sweep dir>`` compares
them in HPARAMS. Needs the optional ``requirements-sweep.txt``.
"""

import argparse
import contextlib
import csv
import datetime
import io
import logging
import signal
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import yaml

from mnist.callbacks import model_checkpoint
from mnist.cli import MNISTCLI
from mnist.data import MNISTDataModule
from mnist.errors import TrainingInterrupted, UserError, exit_with_message

try:
    import optuna
    import sqlalchemy  # Optuna's storage layer
except ImportError as err:  # optuna is optional
    exit_with_message(UserError(f"{err.name} is not installed: pip install -r requirements-sweep.txt"))

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)

# Lightning's console per trial, off unless the command line turns it back on.
QUIET_TRIAL = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


class TrialFailed(Exception):
    """A trial that raised: recorded as failed, and the sweep goes on."""


def read_space(path: Path) -> dict[str, optuna.distributions.BaseDistribution]:
    """The search space: each dotted config key mapped to an Optuna distribution, written in Optuna's terms.

    ``{type: float, low: 0.001, high: 0.3, log: true}``, ``{type: int, low: 16, high: 512, step: 16}``,
    ``{type: categorical, choices: [32, 64, 128]}``. Categorical choices are numbers, booleans or strings, each
    written as on the command line (``"[512, 256]"`` for a list, ``mnist.networks.ConvNet`` for a class).
    """
    try:
        spec = yaml.safe_load(path.read_text())
    except OSError as err:
        raise UserError(f"cannot read the search space {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(spec, dict) or not spec:
        raise UserError(f"{path} must map config keys to distributions, e.g. 'model.optimizer.init_args.lr: "
                        "{type: float, low: 0.001, high: 0.3, log: true}'")  # fmt: skip
    space = {}
    for key, dist in spec.items():
        where = f"{path}: {key}"
        if not isinstance(dist, dict) or dist.get("type") not in ("float", "int", "categorical"):
            raise UserError(f"{where} needs 'type: float', 'type: int' or 'type: categorical'")
        kind, args = dist["type"], {k: v for k, v in dist.items() if k != "type"}
        allowed = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"},
                   "categorical": {"choices"}}[kind]  # fmt: skip
        if unknown := sorted(set(args) - allowed):
            raise UserError(f"{where}: {', '.join(unknown)} is not a setting of a {kind} distribution "
                            f"(it takes {', '.join(sorted(allowed))})")  # fmt: skip
        try:
            if kind == "float":
                space[key] = optuna.distributions.FloatDistribution(**args)
            elif kind == "int":
                space[key] = optuna.distributions.IntDistribution(**args)
            else:
                choices = args.get("choices")
                if not isinstance(choices, list) or not choices:
                    raise ValueError("'choices' must be a non-empty list")
                if any(not isinstance(c, bool | int | float | str) for c in choices):
                    raise ValueError('choices must be numbers, booleans or strings (quote a list: "[512, 256]")')
                space[key] = optuna.distributions.CategoricalDistribution(choices)
        except (TypeError, ValueError) as err:
            raise UserError(f"{where}: {err}") from err
    return space


def suggest(trial: optuna.Trial, key: str, dist: optuna.distributions.BaseDistribution):
    """The trial's value for one key, through Optuna's public ``suggest_*`` API."""
    if isinstance(dist, optuna.distributions.FloatDistribution):
        return trial.suggest_float(key, dist.low, dist.high, log=dist.log, step=dist.step)
    if isinstance(dist, optuna.distributions.IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high, log=dist.log, step=dist.step)
    return trial.suggest_categorical(key, dist.choices)


def short_names(keys: list[str]) -> dict[str, str]:
    """``model.optimizer.init_args.lr`` -> ``lr``, unless two keys end alike."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: name if last.count(name) == 1 else key for key, name in zip(keys, last, strict=True)}


def shown(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else as_argument(value)


def describe(params: dict) -> str:
    names = short_names(list(params))
    return ", ".join(f"{names[key]}={shown(value)}" for key, value in params.items())


def as_argument(value) -> str:
    """A value as the command line writes it."""
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)


def overrides(params: dict) -> list[str]:
    return [part for key, value in params.items() for part in (f"--{key}", as_argument(value))]


class _ConfigCheck(MNISTCLI):
    """Parses a trial's command line without building anything: bad keys and values fail before any trial runs."""

    def instantiate_classes(self) -> None:
        pass


def check_space(base: list[str], space: dict) -> None:
    """Parse the base command with each end of every range and every choice; one ``error:`` line if one fails."""
    probes = [{key: dist.low for key, dist in space.items() if hasattr(dist, "low")}]
    probes.append({key: dist.high for key, dist in space.items() if hasattr(dist, "high")})
    probes += [{key: choice} for key, dist in space.items() if hasattr(dist, "choices") for choice in dist.choices]
    for probe in probes:
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                _ConfigCheck(args=[*base, *overrides(probe)], run=False)
        except SystemExit as err:
            if err.code in (0, None):
                continue
            lines = [line for line in stderr.getvalue().splitlines() if line.startswith("error:")]
            message = lines[0].removeprefix("error:").strip() if lines else stderr.getvalue().strip()
            raise UserError(f"the search space does not fit the config ({as_argument(probe)}): {message}") from None


class TrialReporter(pl.Callback):
    """Reports the objective metric to Optuna after every validation, and stops a trial its pruner gives up on."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial, self.metric = trial, metric
        self.values: list[float] = []
        self.logged: list[str] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.logged = sorted(trainer.callback_metrics)
        value = trainer.callback_metrics.get(self.metric)
        if value is None:
            return
        self.values.append(float(value))
        self.trial.report(float(value), step=trainer.current_epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"epoch {trainer.current_epoch}: {self.metric} {float(value):.4f}")


class Sweep:
    """One worker of a study: runs trials until the study holds ``trials`` finished ones."""

    def __init__(self, opts: argparse.Namespace, space: dict) -> None:
        self.opts, self.space = opts, space
        self.dir = Path(opts.sweep_dir)
        self.base = [arg for config in opts.config for arg in ("--config", config)]

    def trial_args(self, number: int, params: dict) -> list[str]:
        # Named by trial number, which the storage hands out: workers never pick the same run directory.
        logger = ["--trainer.logger", "mnist.logger.StageTensorBoardLogger", "--trainer.logger.save_dir",
                  str(self.dir), "--trainer.logger.name", "trials",
                  "--trainer.logger.version", f"trial_{number:04d}"]  # fmt: skip
        return ["fit", *self.base, *QUIET_TRIAL, *self.opts.extra, *overrides(params), *logger]

    def objective(self, trial: optuna.Trial) -> float:
        params = {key: suggest(trial, key, dist) for key, dist in self.space.items()}
        reporter = TrialReporter(trial, self.opts.metric)
        start = time.monotonic()
        print(f"trial {trial.number}: {describe(params)}", file=sys.stderr, flush=True)
        # The trial's console goes to a file in its run directory; the sweep prints one line per trial.
        run_dir = self.dir / "trials" / f"trial_{trial.number:04d}"
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            with open(run_dir / "console.log", "a") as console, contextlib.redirect_stdout(console), \
                    contextlib.redirect_stderr(console):  # fmt: skip
                cli = MNISTCLI(args=self.trial_args(trial.number, params), trainer_defaults={"callbacks": [reporter]})
                trial.set_user_attr("run_dir", str(run_dir))
                config = run_dir / "config.yaml"
                if config.is_file():
                    trial.set_user_attr("config", config.read_text())
                checkpoint = model_checkpoint(cli.trainer)
                if self.opts.test and checkpoint is not None and checkpoint.best_model_path:
                    # The path, not "best": Lightning warns when a run has more than one checkpoint callback.
                    best = checkpoint.best_model_path
                    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best, verbose=False)
                    for name, value in results[0].items():
                        if name.startswith("test/"):
                            trial.set_user_attr(name, float(value))
        except (optuna.TrialPruned, TrainingInterrupted, KeyboardInterrupt):
            raise
        except (Exception, SystemExit) as err:  # noqa: BLE001 - any failure of one trial is that trial's
            message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            if isinstance(err, SystemExit):
                message = f"the command line was refused, see {run_dir / 'console.log'}"
            trial.set_user_attr("failure", f"{type(err).__name__}: {message}")
            raise TrialFailed(message) from err
        finally:
            trial.set_user_attr("seconds", round(time.monotonic() - start, 1))
        if not reporter.values:
            raise UserError(
                f"the objective metric {self.opts.metric!r} was never logged in trial {trial.number}; it logged "
                f"{', '.join(reporter.logged) or 'nothing'}. Choose one of those with --metric"
            )
        return min(reporter.values) if self.opts.direction == "minimize" else max(reporter.values)

    def run(self, study: optuna.Study) -> None:
        def finished() -> int:
            return len(study.get_trials(deepcopy=False, states=FINISHED))

        def say(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            parts = [f"trial {trial.number}: {trial.state.name.lower()}"]
            if trial.value is not None:
                parts.append(f"{self.opts.metric} {trial.value:.4f}")
            if "failure" in trial.user_attrs:
                parts.append(f"({trial.user_attrs['failure']})")
            parts.append(f"({trial.user_attrs.get('seconds', '?')} s; {finished()} of {self.opts.trials} finished)")
            print(" ".join(parts), file=sys.stderr, flush=True)

        while finished() < self.opts.trials:
            fail_unbegun_trials(study, grace_period(self.opts))
            study.optimize(self.objective, n_trials=1, catch=(TrialFailed,), callbacks=[say])


def grace_period(opts: argparse.Namespace) -> int:
    """Seconds without a heartbeat after which a running trial's process is taken for dead."""
    return 3 * opts.heartbeat


def fail_unbegun_trials(study: optuna.Study, grace_seconds: int) -> None:
    """Record as failed the trials whose process died after creating them and before they began.

    Optuna creates a trial, then starts its heartbeat: a process killed in between leaves a trial running forever,
    since a trial that never sent a heartbeat is never taken for stale (by design, optuna/optuna#4026). Such a trial
    has no parameters (the objective suggests them first, milliseconds after the trial is created): one without
    any, created longer ago than the heartbeat's grace period, belongs to no live process, and nothing was trained.
    """
    now = datetime.datetime.now()  # Optuna's start times are the creating machine's local time
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        started = trial.datetime_start
        if not trial.params and started is not None and (now - started).total_seconds() > grace_seconds:
            # skip_if_finished: another worker may have recorded it a moment ago.
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            print(f"trial {trial.number}: failed (its process ended before the trial began)", file=sys.stderr)


def open_study(opts: argparse.Namespace) -> optuna.Study:
    storage_url = opts.storage or f"sqlite:///{Path(opts.sweep_dir) / 'study.db'}"
    # Workers started together race to create the storage's tables and the study (SQLite says "already exists"
    # or breaks a UNIQUE constraint): the loser finds the winner's on the next try. An unreachable storage fails
    # the same way three times.
    tries = 3
    while True:
        try:
            return _open_study(opts, storage_url)
        except sqlalchemy.exc.SQLAlchemyError as err:
            tries -= 1
            if not tries:
                cause = str(err).strip().splitlines()[0]
                raise UserError(f"cannot open the study storage {storage_url}: {cause}") from err
            time.sleep(1)


def _open_study(opts: argparse.Namespace, storage_url: str) -> optuna.Study:
    engine = {"connect_args": {"timeout": 60}} if storage_url.startswith("sqlite") else {}
    try:
        # Heartbeats let a later run see a trial whose process died (kill -9, a lost machine) and fail it; its
        # parameters are then tried again once.
        storage = optuna.storages.RDBStorage(
            storage_url,
            engine_kwargs=engine,
            heartbeat_interval=opts.heartbeat,
            grace_period=grace_period(opts),
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
        )
        sampler = optuna.samplers.TPESampler(seed=opts.seed, n_startup_trials=opts.startup_trials)
        pruner = (
            optuna.pruners.MedianPruner(n_startup_trials=opts.startup_trials, n_warmup_steps=opts.pruner_warmup_epochs)
            if opts.pruner == "median"
            else optuna.pruners.NopPruner()
        )
        return optuna.create_study(
            storage=storage,
            study_name=opts.study,
            direction=opts.direction,
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
    except sqlalchemy.exc.SQLAlchemyError:
        raise  # perhaps a race with another worker: open_study tries again
    except ValueError as err:  # a study of that name with another direction
        raise UserError(f"study {opts.study!r}: {err}") from err
    except Exception as err:  # noqa: BLE001 - SQLAlchemy and driver errors have many types for one cause
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot open the study storage {storage_url}: {cause}") from err


def report(study: optuna.Study, opts: argparse.Namespace) -> None:
    """The table of trials, best.yaml and the plots, in the sweep directory."""
    sweep_dir = Path(opts.sweep_dir)
    trials = [t for t in study.get_trials(deepcopy=False) if t.state in FINISHED]
    keys = sorted({key for t in trials for key in t.params})
    tests = sorted({key for t in trials for key in t.user_attrs if key.startswith("test/")})
    names = short_names(keys)
    header = ["trial", "state", opts.metric, *tests, "seconds", *(names[k] for k in keys)]
    rows = [
        [t.number, t.state.name.lower(), "" if t.value is None else f"{t.value:.4f}",
         *(f"{t.user_attrs[k]:.4f}" if k in t.user_attrs else "" for k in tests), t.user_attrs.get("seconds", ""),
         *(shown(t.params[k]) if k in t.params else "" for k in keys)]
        for t in trials
    ]  # fmt: skip
    with open(sweep_dir / "trials.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        print("No trial completed: no best config.", file=sys.stderr)
        return
    best = study.best_trial
    print(f"Best: trial {best.number}, {opts.metric} {best.value:.4f}, {describe(best.params)}")
    if "config" in best.user_attrs:
        settings = yaml.safe_load(best.user_attrs["config"])
        trainer = settings.get("trainer", {})
        trainer.pop("logger", None)  # the sweep's own: a fit of best.yaml opens a run of its own
        for quiet in QUIET_TRIAL[::2]:
            if quiet not in opts.extra:  # the sweep's quiet console, not a setting of the run
                trainer.pop(quiet.removeprefix("--trainer."), None)
        settings.pop("ckpt_path", None)
        (sweep_dir / "best.yaml").write_text(
            f"# Trial {best.number} of study {study.study_name!r}: {opts.metric} {best.value:.4f}\n"
            f"#   python main.py fit --config {sweep_dir / 'best.yaml'}\n" + yaml.safe_dump(settings, sort_keys=False)
        )
        print(f"Best config: {sweep_dir / 'best.yaml'} (python main.py fit --config {sweep_dir / 'best.yaml'})")
    plots = save_plots(study, sweep_dir, opts.metric)
    if plots:
        print(f"Plots: {', '.join(str(p) for p in plots)}")
    print(f"Trials in TensorBoard: tensorboard --logdir {sweep_dir / 'trials'}")


def save_plots(study: optuna.Study, sweep_dir: Path, metric: str) -> list[Path]:
    """Optimisation history, parameter importances and parallel coordinates as PNG files, as far as they apply."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    saved = []
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    for name, plot in (
        ("history", plots.plot_optimization_history),
        ("importances", plots.plot_param_importances),
        ("parallel_coordinates", plots.plot_parallel_coordinate),
    ):
        if name == "importances" and len(complete) < 2:
            continue  # Optuna would draw every parameter equally important, and warn that it did
        try:
            with warnings.catch_warnings():
                # A parameter with one value in every trial gets a widened axis; matplotlib says so on stderr.
                warnings.filterwarnings("ignore", "Attempting to set identical low and high ylims", UserWarning)
                axes = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError):
            continue  # too few completed trials, or a single parameter, for this plot
        if name == "history":
            axes.set_ylabel(metric)
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(8, 5)
        path = sweep_dir / f"{name}.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        saved.append(path)
    return saved


def parse(argv: list[str]) -> argparse.Namespace:
    """The sweep's own options; the rest, ``--KEY VALUE`` for every trial's fit, as ``extra``."""
    parser = argparse.ArgumentParser(
        prog="python -m mnist.sweep",
        description="Search hyperparameters with Optuna; every trial is `python main.py fit` of the configs plus "
        "the trial's values. Any other --KEY VALUE (e.g. --trainer.max_epochs 3) applies to every trial.",
    )
    parser.add_argument("--config", action="append", required=True, help="config file(s) of the fit, as for main.py")
    parser.add_argument("--space", type=Path, required=True, help="YAML search space: config key -> distribution")
    parser.add_argument("--trials", type=int, default=20, help="finished trials the study should hold (all workers)")
    parser.add_argument("--study", help="study name (default: the space file's name)")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite:///<sweep_dir>/study.db)")
    parser.add_argument("--sweep_dir", help="where trials, table, best.yaml and plots go (default: logs/sweeps/STUDY)")
    parser.add_argument("--metric", default="val/loss", help="objective: its best value over a trial's validations")
    parser.add_argument("--direction", choices=["minimize", "maximize"], default="minimize")
    parser.add_argument("--test", action="store_true", help="also test each trial's best checkpoint")
    parser.add_argument("--pruner", choices=["median", "none"], default="median", help="stop hopeless trials early")
    parser.add_argument("--pruner_warmup_epochs", type=int, default=1, help="epochs before a trial may be pruned")
    parser.add_argument("--startup_trials", type=int, default=5, help="random trials before TPE and pruning start")
    parser.add_argument("--seed", type=int, default=None, help="the sampler's seed")
    parser.add_argument("--heartbeat", type=int, default=20, help="seconds between a running trial's heartbeats")
    opts, extra = parser.parse_known_args(argv)
    opts.extra = extra
    if opts.trials < 1:
        parser.error("--trials must be at least 1")
    opts.study = opts.study or opts.space.stem
    opts.sweep_dir = opts.sweep_dir or str(Path("logs") / "sweeps" / opts.study)
    return opts


def main(argv: list[str] | None = None) -> None:
    opts = parse(sys.argv[1:] if argv is None else argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # this module says what happens, one line per trial
    # Heartbeats and the plots are marked experimental in Optuna; used as documented, the notices say nothing.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        space = read_space(opts.space)
        sweep = Sweep(opts, space)
        # Lightning's per-trial notes (seed, devices) go nowhere; the trial's own console goes to its console.log.
        for name in ("pytorch_lightning", "lightning_fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
        check_space([*sweep.base, *opts.extra], space)
        Path(opts.sweep_dir).mkdir(parents=True, exist_ok=True)
        study = open_study(opts)
        print(f"Study {opts.study!r} in {opts.storage or Path(opts.sweep_dir) / 'study.db'}; trials in "
              f"{Path(opts.sweep_dir) / 'trials'}", file=sys.stderr)  # fmt: skip
        MNISTDataModule.keep_loaded = True  # every trial of this process reads the data files once
        # The sweep's own options are not the trials': LightningCLI reads its arguments from `args` alone.
        sys.argv = sys.argv[:1]
        sweep.run(study)
        report(study, opts)
    except TrainingInterrupted as stop:
        name = signal.Signals(stop.signum).name
        print(f"Stopped by {name}; the running trial is recorded as failed. The same command continues the study",
              file=sys.stderr)  # fmt: skip
        sys.exit(128 + stop.signum)
    except KeyboardInterrupt:
        print("Stopped by Ctrl-C; the same command continues the study", file=sys.stderr)
        sys.exit(130)
    except UserError as err:
        exit_with_message(err)


if __name__ == "__main__":
    main()
