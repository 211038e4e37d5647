"""The benchmark's contenders still run: the plain loop and bare Lightning, one short epoch on synthetic data."""

import json
import math
import os
import subprocess
import sys
import threading
import time

import pytest
import pytorch_lightning as pl
from pytorch_lightning.demos.boring_classes import BoringModel

from tests.conftest import ROOT


@pytest.mark.parametrize("script", ["plain_loop.py", "bare_lightning.py", "bare_lightning.py --trimmed"])
def test_benchmark_contender_runs_and_records_its_epochs(tmp_path, mnist_dir, script):
    timer = tmp_path / "times.jsonl"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'benchmarks'}"}
    script, *flags = script.split()
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *flags, "--data_dir", str(mnist_dir), "--batch_size", "64",
         "--epochs", "2", "--timer", str(timer)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in timer.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(r["seconds"] > 0 and r["cpu_seconds"] > 0 for r in records)
    # A training step's quiet time: shorter than the epoch's steps (500 images, batch 64: 8 steps) take together.
    assert all(0 < r["step_ms"] / 1000 < r["seconds"] / 7 for r in records)


def test_step_calls_counts_what_the_template_adds_per_step(tmp_path, mnist_dir):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_calls.py"), "--data_dir", str(mnist_dir), "--warmup", "2",
         "--window", "4", "--data.val_size", "100"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in result.stdout.splitlines() if "|" in line}
    calls = {name: float(cells[1]) for name, cells in rows.items() if name not in ("run", "---")}
    assert set(calls) == {"bare Lightning", "bare Lightning, trimmed", "template (config.yaml)",
                          "template, no progress bar", "template, no checkpointing", "template, no logger",
                          "template, Lightning's default profiler"}  # fmt: skip
    # Trimmed as the template trims it, Lightning's loop makes fewer calls, and the template more than that (its
    # features), and fewer with its progress bar or checkpointing off; with Lightning's default profiler, which bare
    # Lightning keeps, more than with its own.
    assert calls["bare Lightning, trimmed"] < calls["bare Lightning"]
    assert calls["bare Lightning, trimmed"] < calls["template (config.yaml)"]
    assert calls["template, no progress bar"] < calls["template (config.yaml)"]
    assert calls["template, no checkpointing"] < calls["template (config.yaml)"]
    assert calls["template (config.yaml)"] < calls["template, Lightning's default profiler"]


def test_an_epoch_is_timed_with_the_work_after_its_last_hook(tmp_path, monkeypatch):
    # Lightning's checkpoint callback saves at an epoch's end after every other callback: the epoch includes it.
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from epoch_timer import EpochTimer

    class SlowEpochEnd(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            time.sleep(0.2)

    path = tmp_path / "times.jsonl"
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, logger=False,
                         callbacks=[EpochTimer(str(path)), SlowEpochEnd()], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(BoringModel())
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(0.2 <= r["seconds"] < 5 for r in records)


def test_quiet_step_time_is_not_moved_by_a_slow_spell(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from epoch_timer import quiet_step_ms

    # 400 steps of 1 ms, 100 of them slowed to 3 ms by another tenant; and the same with no slow spell.
    durations = [0.003 if 150 <= i < 250 else 0.001 for i in range(400)]
    starts = [sum(durations[:i]) for i in range(len(durations) + 1)]
    assert quiet_step_ms(starts) == pytest.approx(1.0)
    assert quiet_step_ms([i * 0.002 for i in range(401)]) == pytest.approx(2.0)
    # Fewer steps than a window: their mean.
    assert quiet_step_ms([0.0, 0.001, 0.003]) == pytest.approx(1.5)


def test_benchmark_table_compares_at_the_same_batch_and_precision_only(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from benchmark import table

    def rows(times: dict[str, list[list[float]]], steps: dict[str, list[list[float]]]) -> dict[tuple, list[str]]:
        """(contender, batch, precision) -> epoch, vs plain loop, vs bare, paired, quiet paired, quiet step, vs bare,
        epochs."""
        lines = [line.split("|")[1:-1] for line in table(times, steps, {}, None).splitlines() if line.startswith("| ")]
        return {tuple(c.strip() for c in cells[:3]): [c.strip() for c in cells[3:]] for cells in lines[2:]}

    times = {"bare Lightning|32|32-true": [[2.0, 2.2]], "template|32|32-true": [[2.4, 2.6]],
             "bare Lightning|32|bf16-mixed": [[3.0]], "template|32|bf16-mixed": [[3.3]]}  # fmt: skip
    steps = {"bare Lightning|32|32-true": [[1.0, 1.1]], "template|32|32-true": [[1.2, 1.3]],
             "bare Lightning|32|bf16-mixed": [[2.0]], "template|32|bf16-mixed": [[2.4]]}  # fmt: skip
    measured = rows(times, steps)
    # Quiet epochs: only the first pair has both quiet steps within 5 % of their lowest.
    # Pooled medians 2.5 / 2.1; paired, the median of 2.4 / 2.0 and 2.6 / 2.2. Three decimals: 1.104 is not 1.10.
    assert measured[("template", "32", "32-true")] == ["2.50", "–", "1.190 ×", "1.191 ×", "1.200 × (1)", "1.200",
                                                        "1.200 ×", "2"]  # fmt: skip
    assert measured[("template", "32", "bf16-mixed")] == ["3.30", "–", "1.100 ×", "1.100 ×", "1.100 × (1)",
                                                           "2.400", "1.200 ×", "1"]  # fmt: skip
    # The tutorial runs at 32-true only: with bf16-mixed alone timed, no ratio rather than one across precisions.
    measured = rows({"tutorial|32|32-true": [[8.0]], "bare Lightning|32|bf16-mixed": [[3.0]]},
                    {"tutorial|32|32-true": [[3.0]], "bare Lightning|32|bf16-mixed": [[2.0]]})  # fmt: skip
    assert measured[("tutorial", "32", "32-true")] == ["8.00", "–", "–", "–", "–", "3.000", "–", "1"]


def test_paired_ratio_is_not_moved_by_a_slow_spell_in_one_round(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from benchmark import paired_ratio

    # Two rounds of two epochs; slow spells double the template's second epoch in round 1, both in round 2.
    bare, template = [[2.0, 2.0], [2.0, 4.0]], [[2.2, 4.4], [2.2, 4.4]]
    assert paired_ratio(template, bare) == pytest.approx(1.1)  # the pooled medians would say 3.3 / 2.0


def test_quiet_pairs_leave_out_the_epochs_a_slow_spell_stretched(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from benchmark import quiet_paired_ratio

    # A spell stretches both runs' second epochs, the network's work most: their ratio shrinks towards 1.
    bare, template = [[2.0, 3.4, 2.0]], [[2.2, 3.6, 2.2]]
    bare_steps, template_steps = [[1.0, 1.7, 1.01]], [[1.1, 1.8, 1.1]]
    assert quiet_paired_ratio(template, bare, template_steps, bare_steps) == (pytest.approx(1.1), 2)
    # Runs of one epoch measure none (the first is warm-up): no ratio, rather than an error.
    ratio, pairs = quiet_paired_ratio([[]], [[]], [[]], [[]])
    assert math.isnan(ratio) and pairs == 0


def test_contenders_take_turns_at_epochs(tmp_path, mnist_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from benchmark import run_in_turns

    commands, folders = [], []
    for script in ("plain_loop.py", "bare_lightning.py"):
        folder = tmp_path / script
        folder.mkdir()
        commands.append([sys.executable, str(ROOT / "benchmarks" / script), "--data_dir", str(mnist_dir),
                         "--batch_size", "64", "--epochs", "3", "--timer", str(folder / "times.jsonl")])  # fmt: skip
        folders.append(folder)
    run_in_turns(commands, folders)
    epochs = sorted(
        (r["ended"] - r["seconds"], r["ended"], folder.name, r["epoch"])
        for folder in folders
        for r in map(json.loads, (folder / "times.jsonl").read_text().splitlines())
    )
    # One epoch at a time, in the order given: each starts after the one before has ended.
    assert [(name, epoch) for *_, name, epoch in epochs] == [
        (script, epoch) for epoch in range(3) for script in ("plain_loop.py", "bare_lightning.py")
    ]
    assert all(start >= ended_before for (start, *_), (_, ended_before, *_) in zip(epochs[1:], epochs, strict=False))


def test_a_contender_that_fails_stops_the_benchmark_with_its_output(tmp_path, mnist_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from benchmark import run_in_turns

    waiting = [sys.executable, str(ROOT / "benchmarks" / "plain_loop.py"), "--data_dir", str(mnist_dir),
               "--epochs", "3", "--timer", str(tmp_path / "times.jsonl")]  # fmt: skip
    failing = [sys.executable, "-c", "raise SystemExit('no such data')"]
    with pytest.raises(SystemExit, match="no such data"):
        run_in_turns([waiting, failing], [tmp_path, tmp_path])


def test_the_benchmark_times_the_contenders_asked_for(tmp_path, mnist_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from benchmark import measure_epochs

    times, steps = measure_epochs(mnist_dir, 1, 3, ["plain", "bare", "trimmed"], [64], ["32-true"], lambda *_: None)
    # Each run's first epoch (warm-up) is left out.
    assert {key: [len(run) for run in runs] for key, runs in times.items()} == {
        "plain loop|64|32-true": [2],
        "bare Lightning|64|32-true": [2],
        "bare Lightning, trimmed|64|32-true": [2],
    }
    assert all(t > 0 for runs in times.values() for run in runs for t in run)


def test_an_epoch_taking_turns_includes_its_threads_work_after_it(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from epoch_timer import Baton

    turn_r, turn_w = os.pipe()
    monkeypatch.setenv("BENCHMARK_BATON", f"{turn_r},{turn_w}")
    baton = Baton()

    def busy(seconds: float, stop: threading.Event) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end and not stop.is_set():
            pass

    stop = threading.Event()
    start = time.perf_counter()
    threading.Thread(target=busy, args=(0.3, stop)).start()
    assert baton.settle() - start >= 0.25  # the thread's 0.3 s of work, not the moment asked
    # A thread that does not stop is waited for up to the limit.
    start = time.perf_counter()
    threading.Thread(target=busy, args=(60, stop)).start()
    try:
        assert 0.4 <= baton.settle(limit=0.5) - start < 5
    finally:
        stop.set()
    os.close(turn_r)
    os.close(turn_w)
