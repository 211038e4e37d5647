"""Read a log directory as TensorBoard shows it, with TensorBoard's own readers."""

import types
from pathlib import Path

from tensorboard import context
from tensorboard.backend.event_processing import data_provider, event_multiplexer, plugin_event_multiplexer
from tensorboard.plugins.hparams import api_pb2, backend_context


def load(logdir: Path) -> event_multiplexer.EventMultiplexer:
    """Every run under ``logdir``, named as TensorBoard names them ("lightning_logs/version_0/val")."""
    runs = event_multiplexer.EventMultiplexer(size_guidance={"scalars": 0, "images": 0})
    runs.AddRunsFromDirectory(str(logdir))
    runs.Reload()
    return runs


def scalars(runs: event_multiplexer.EventMultiplexer, run: str) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of one run ("lightning_logs/version_0/val")."""
    if run not in runs.Runs():
        return {}
    return {tag: [(e.step, e.value) for e in runs.Scalars(run, tag)] for tag in runs.Runs()[run]["scalars"]}


def images(runs: event_multiplexer.EventMultiplexer, run: str) -> dict[str, list[int]]:
    """``{tag: [step, ...]}`` of one run's pictures."""
    return {tag: [e.step for e in runs.Images(run, tag)] for tag in runs.Runs()[run]["images"]}


def opened_groups(runs: event_multiplexer.EventMultiplexer) -> list[str]:
    """The tag groups Time Series shows expanded when it first opens: the first two groups by name.

    (TensorBoard's frontend groups cards by the tag's prefix before the first ``/`` and expands the first two.)
    """
    tags = set()
    for info in runs.Runs().values():
        tags.update(info["scalars"])
        tags.update(info["images"])
    return sorted({tag.split("/", 1)[0] for tag in tags})[:2]


def hparams_experiment(logdir: Path) -> api_pb2.Experiment:
    """The experiment TensorBoard's HParams tab builds from the log directory: columns and whether each differs."""
    runs = plugin_event_multiplexer.EventMultiplexer()
    runs.AddRunsFromDirectory(str(logdir))
    runs.Reload()
    provider = data_provider.MultiplexerDataProvider(runs, str(logdir))
    hparams = backend_context.Context(types.SimpleNamespace(data_provider=provider, multiplexer=runs))
    ctx = context.RequestContext()
    return hparams.experiment_from_metadata(
        ctx, "", True, hparams.hparams_metadata(ctx, ""), hparams.hparams_from_data_provider(ctx, "", 100)
    )


def shown_hparams(experiment: api_pb2.Experiment) -> list[str]:
    """The hyperparameter columns the HParams table ticks on opening: those that differ first, then by name, 5."""
    infos = sorted(experiment.hparam_infos, key=lambda h: (not h.differs, h.name))
    return [h.name for h in infos[:5]]


def shown_metrics(experiment: api_pb2.Experiment) -> list[str]:
    """The metric columns the HParams table ticks on opening (the first 5), as it titles them: ``val.acc``."""
    return [f"{m.name.group}.{m.name.tag}" if m.name.group else m.name.tag for m in experiment.metric_infos][:5]
