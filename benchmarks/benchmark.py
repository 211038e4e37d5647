"""Side-by-side speed of the template against the tutorial's pipeline and a plain PyTorch loop, on real MNIST.

    python benchmarks/benchmark.py --data_dir data                # epoch times, about 10 minutes
    python benchmarks/benchmark.py --data_dir data --presets fast cnn --seeds 0 1 2   # plus the presets' accuracy
    python benchmarks/benchmark.py --data_dir data --compile      # plus the template with --model.compile true
    python benchmarks/benchmark.py --data_dir data --compile --precision 32-true bf16-mixed   # on a GPU
    python benchmarks/benchmark.py --data_dir data --contenders bare template --batch_sizes 256 --epochs 8

Each contender runs in a process of its own. Those of one batch size and precision (plain loop, bare Lightning,
template) run at once and take turns at epochs, one epoch each, so that the shared machine's slow spells (seconds to
minutes long) hit their neighbouring epochs alike; the order changes every round. The fewer contenders, the closer
their epochs. An epoch is training, validation, the checkpoint saves at its end and what the process's other threads
still do for it. It prints a markdown table and writes it to --output after every group, so that a run cut short (a
lent GPU's time runs out) still leaves what it measured.
"""

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"
RAW_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def environment() -> dict[str, str]:
    """The environment of a contender: this project and the benchmarks importable, the caller's own path kept."""
    path = [str(ROOT), str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def run(command: list[str], cwd: Path) -> tuple[float, str]:
    """Run a command; return its wall time and output, or stop the benchmark with its output if it fails."""
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        fail(command, result.stdout + result.stderr)
    return seconds, result.stdout + result.stderr


def fail(command: list[str], output: str) -> None:
    sys.exit(f"benchmark step failed: {' '.join(command)}\n{output[-6000:]}")


def run_in_turns(commands: list[list[str]], folders: list[Path]) -> None:
    """Run the commands at once, each running one epoch in turn, in the order given, round and round.

    Each waits at the start of its fit and of every epoch for a byte on a pipe of its own, and writes one when its
    epoch has ended (``epoch_timer.Baton``); its turn ends for good when it exits. Only one runs at any time, and
    each epoch lies next to the others' same epoch, seconds apart, where separate runs lie minutes apart.
    """
    running = []
    try:
        for command, cwd in zip(commands, folders, strict=True):
            turn_r, turn_w = os.pipe()
            done_r, done_w = os.pipe()
            env = {**environment(), "BENCHMARK_BATON": f"{turn_r},{done_w}"}
            output = tempfile.TemporaryFile()  # not a pipe: one nobody reads while the others run would fill up
            process = subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT,
                                       pass_fds=(turn_r, done_w))  # fmt: skip
            os.close(turn_r)
            os.close(done_w)
            running.append((command, process, output, turn_w, done_r))
        while running:
            for entry in list(running):
                command, process, output, turn_w, done_r = entry
                with contextlib.suppress(BrokenPipeError):  # it has ended: its pipe says so below
                    os.write(turn_w, b".")
                if os.read(done_r, 1):
                    continue
                # The end of its pipe: the process has ended.
                running.remove(entry)
                os.close(turn_w)
                os.close(done_r)
                if process.wait() != 0:
                    output.seek(0)
                    fail(command, output.read().decode(errors="replace"))
    finally:
        for _, process, *_ in running:
            process.kill()
            process.wait()


def epoch_records(path: Path) -> list[dict[str, float]]:
    """The epoch timer's records of one run, one per epoch (``seconds``, ``step_ms``, ...)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


# The contenders by kind, in their order within a group: the names the table gives them.
CONTENDERS = {
    "tutorial": "tutorial",
    "plain": "plain loop",
    "bare": "bare Lightning",
    # Lightning's loop trimmed as the template's command line trims it: the floor under what its features add.
    "trimmed": "bare Lightning, trimmed",
    "template": "template",
    "compiled": "template, compiled",
}


def template_command(data_dir: Path, timer: Path, extra: list[str]) -> list[str]:
    """A `fit` with config.yaml, ``extra`` on top, timed epoch by epoch into ``timer``."""
    return [sys.executable, str(ROOT / "main.py"), "fit", "--config", str(ROOT / "config.yaml"), *extra,
            "--data.data_dir", str(data_dir), "--data.download", "false",
            "--trainer.callbacks+=epoch_timer.EpochTimer", f"--trainer.callbacks.path={timer}"]  # fmt: skip


def template_fit(data_dir: Path, work: Path, timer: Path, extra: list[str]) -> tuple[float, str]:
    return run(template_command(data_dir, timer, extra), cwd=work)


def test_accuracy(data_dir: Path, work: Path) -> float:
    command = [sys.executable, str(ROOT / "main.py"), "test", "--ckpt_path", "last", "--data.data_dir", str(data_dir)]
    _, output = run(command, cwd=work)
    return float(re.search(r"test/acc\s+([0-9.]+)", output).group(1))


def template_peak_memory(data_dir: Path) -> float:
    """Peak resident memory (MB) of one `fit` with config.yaml, measured in a process of its own."""
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, str(ROOT / "main.py"), "fit", "--config", str(ROOT / "config.yaml"),
                   "--data.data_dir", str(data_dir), "--trainer.max_epochs", "1"]  # fmt: skip
        _, output = run([sys.executable, "-c", probe, *command], cwd=Path(tmp))
    return int(output.split()[-1]) / 1024


def measure_epochs(
    data_dir: Path,
    rounds: int,
    epochs: int,
    kinds: list[str],
    batch_sizes: list[int],
    precisions: list[str],
    after_run: Callable[..., None],
) -> tuple[dict[str, list[list[float]]], dict[str, list[list[float]]]]:
    """Epoch times (s) and quiet training-step times (ms), run by run, of every contender, by ``name|batch|precision``.

    The contenders of one batch size and precision run at once, taking turns at epochs (``run_in_turns``); the
    tutorial, which has nothing to be compared with epoch by epoch, runs alone. ``after_run(times, steps)`` gets
    those measured so far after each group. ``kinds`` are those of ``CONTENDERS`` to run.
    """
    groups = [[("tutorial", "tutorial", 32, "32-true")]] if "tutorial" in kinds else []
    for batch in batch_sizes:
        for precision in precisions:
            group = [(CONTENDERS[kind], kind, batch, precision) for kind in CONTENDERS if kind in kinds]
            if group := [c for c in group if c[1] != "tutorial"]:
                groups.append(group)
    times: dict[str, list[list[float]]] = {}  # one list per run, the runs in round order
    steps: dict[str, list[list[float]]] = {}  # each epoch's quiet step, as times
    for round_ in range(rounds):
        # Each round in the other order, so that no contender always follows the same one.
        for group in groups if round_ % 2 == 0 else groups[::-1]:
            group = group if round_ % 2 == 0 else group[::-1]
            with tempfile.TemporaryDirectory() as tmp:
                commands, timers = [], []
                for _, kind, batch, precision in group:
                    work = Path(tmp) / f"{kind}-{batch}-{precision}"  # a folder each: templates number their runs
                    work.mkdir()
                    timer = work / "epochs.jsonl"
                    script = ["--data_dir", str(data_dir), "--timer", str(timer)]
                    if kind == "tutorial":
                        command = [sys.executable, str(HERE / "tutorial.py"), *script, "--epochs", "1"]
                    elif kind in ("plain", "bare", "trimmed"):
                        sizes = ["--batch_size", str(batch), "--epochs", str(epochs), "--precision", precision]
                        script_file = HERE / ("plain_loop.py" if kind == "plain" else "bare_lightning.py")
                        trimmed = ["--trimmed"] if kind == "trimmed" else []
                        command = [sys.executable, str(script_file), *script, *sizes, *trimmed]
                    else:
                        sizes = ["--data.batch_size", str(batch), "--trainer.max_epochs", str(epochs)]
                        compiled = ["--model.compile", "true"] if kind == "compiled" else []
                        command = template_command(
                            data_dir, timer, [*sizes, *compiled, "--trainer.precision", precision]
                        )
                    commands.append((command, work))
                    timers.append(timer)
                if len(commands) == 1:
                    run(*commands[0])
                else:
                    run_in_turns([c for c, _ in commands], [w for _, w in commands])
                for (name, kind, batch, precision), timer in zip(group, timers, strict=True):
                    # The first epoch of a run pays for warming up (and compiling): it is left out.
                    records = epoch_records(timer)
                    measured = records if kind == "tutorial" else records[1:]
                    key = f"{name}|{batch}|{precision}"
                    times.setdefault(key, []).append([r["seconds"] for r in measured])
                    steps.setdefault(key, []).append([r["step_ms"] for r in measured])
                    seconds = [round(r["seconds"], 3) for r in records]
                    quiet = [round(r["step_ms"], 3) for r in records]
                    print(
                        f"round {round_ + 1}/{rounds}: {name} at batch {batch}, {precision}: epochs {seconds} s, "
                        f"quiet steps {quiet} ms",
                        flush=True,
                    )
            after_run(times, steps)
    return times, steps


def measure_preset(data_dir: Path, preset: str, seed: int | None) -> dict[str, float]:
    """A preset's whole `fit` and its test accuracy; with a seed, the global one and the split's both set to it."""
    seeds = [] if seed is None else ["--seed_everything", str(seed), "--data.init_args.seed", str(seed)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        timer = work / "epochs.jsonl"
        seconds, _ = template_fit(data_dir, work, timer, ["--config", str(ROOT / "configs" / f"{preset}.yaml"), *seeds])
        return {
            "fit": seconds,
            "epochs": len(epoch_records(timer)),
            "acc": test_accuracy(data_dir, work),
        }


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"


def pl_version() -> str:
    return importlib.metadata.version("pytorch-lightning")


def factor_text(factor: float) -> str:
    """A factor as the tables print it; a dash where there is none (NaN)."""
    # Three decimals: the template's target is 1.10 × bare Lightning, and 1.104 must not read as met.
    return "–" if math.isnan(factor) else f"{factor:.3f} ×"


def ratio(value: float, reference: float) -> str:
    return factor_text(value / reference)  # NaN where there is no reference


def paired_ratio(runs: list[list[float]], reference: list[list[float]]) -> float:
    """The median of the ratios of each epoch to the reference's same epoch of the same round.

    The two ran taking turns (``run_in_turns``): the same epoch of each lies seconds apart, and a slow spell of the
    machine that lasts longer slows both alike and drops out of their ratio.
    """
    pairs = [a / b for run_, ref in zip(runs, reference, strict=False) for a, b in zip(run_, ref, strict=False)]
    return statistics.median(pairs) if pairs else math.nan


def quiet_paired_ratio(
    runs: list[list[float]],
    reference: list[list[float]],
    steps: list[list[float]],
    reference_steps: list[list[float]],
    tolerance: float = 0.05,
) -> tuple[float, int]:
    """``paired_ratio`` over the pairs in which neither epoch fell into a slow spell; and how many pairs those are.

    An epoch is quiet when its quiet step is within ``tolerance`` of its contender's lowest. A slow spell stretches
    the network's work for both, and the extra Python of one a smaller share of a longer step: over all pairs, the
    spells pull the ratio towards 1.
    """

    def quiet(per_run: list[list[float]]) -> list[list[bool]]:
        lowest = min((t for run_ in per_run for t in run_), default=math.inf)
        return [[t <= (1 + tolerance) * lowest for t in run_] for run_ in per_run]

    pairs = [
        a / b
        for run_, ref, q, q_ref in zip(runs, reference, quiet(steps), quiet(reference_steps), strict=False)
        for a, b, quiet_a, quiet_b in zip(run_, ref, q, q_ref, strict=False)
        if quiet_a and quiet_b
    ]
    return (statistics.median(pairs) if pairs else math.nan), len(pairs)


def table(
    times: dict[str, list[list[float]]],
    steps: dict[str, list[list[float]]],
    presets: dict[str, dict[str, float]],
    peak_mb: float | None,
) -> str:
    """The markdown table; each ratio is to the plain loop or bare Lightning at the same batch size and precision."""
    lines = [
        f"Measured {datetime.date.today()} on {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"PyTorch {torch.__version__}, Lightning {pl_version()}, Python {platform.python_version()}, {device_name()}; "
        "real MNIST. Epoch: training + validation + checkpoint saves, median over all measured epochs; paired: the "
        "median ratio of an epoch to the same epoch of the other, which ran right before or after it (the contenders "
        "of a batch size take turns at epochs); quiet epochs: over the pairs of epochs whose quiet steps were both "
        "within 5 % of their contender's lowest (in brackets: how many). Quiet step: a training step when the machine "
        "is quiet: in each epoch the 10th percentile of 50-step windows' mean, the lowest over the epochs.",
        "",
        "| contender | batch | precision | epoch (s), median | vs plain loop | vs bare Lightning | vs bare Lightning, "
        "paired | paired, quiet epochs | quiet step (ms) | vs bare Lightning | epochs measured |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def median(key: str) -> float:
        epochs = [t for run_ in times.get(key, []) for t in run_]
        return statistics.median(epochs) if epochs else math.nan

    def lowest(key: str) -> float:
        return min((t for run_ in steps.get(key, []) for t in run_), default=math.nan)

    for key in times:
        name, batch, precision = key.split("|")
        epoch, step = median(key), lowest(key)
        same = f"{batch}|{precision}"
        # The tutorial runs at 32-true only: with --precision bf16-mixed alone it has nothing to be compared with.
        plain = ratio(epoch, median(f"plain loop|{same}"))
        bare_key = f"bare Lightning|{same}"
        bare = ratio(epoch, median(bare_key))
        paired, quiet, n = math.nan, math.nan, 0
        if bare_key in times and name != "tutorial":  # the tutorial runs alone: it has no epochs beside bare's
            paired = paired_ratio(times[key], times[bare_key])
            quiet, n = quiet_paired_ratio(times[key], times[bare_key], steps[key], steps[bare_key])
        paired = factor_text(paired)
        quiet = "–" if math.isnan(quiet) else f"{factor_text(quiet)} ({n})"
        bare_step = ratio(step, lowest(bare_key))
        epochs = sum(len(run_) for run_ in times[key])
        lines.append(
            f"| {name} | {batch} | {precision} | {epoch:.2f} | {plain} | {bare} | {paired} | {quiet} | {step:.3f} "
            f"| {bare_step} | {epochs} |"
        )
    if peak_mb is not None:
        lines += ["", f"Peak memory of a `fit` with config.yaml: {peak_mb:.0f} MB."]
    if presets:
        lines += ["", "| preset | seed | epochs | whole `fit` command (s) | test accuracy |",
                  "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for key, p in presets.items():
            name, seed = key.split("|")
            lines.append(f"| configs/{name}.yaml | {seed} | {p['epochs']} | {p['fit']:.1f} | {100 * p['acc']:.2f} % |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=Path("data"), help="folder holding MNIST/raw/")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds over all contenders")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run of the plain loop and the template")
    parser.add_argument("--presets", nargs="*", default=None, help="also time configs/NAME.yaml (default: all)")
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="run each preset with these seeds")
    parser.add_argument("--compile", action="store_true", help="also time the template with --model.compile true")
    parser.add_argument(
        "--contenders",
        nargs="+",
        default=["tutorial", "plain", "bare", "trimmed", "template"],
        choices=list(CONTENDERS),
        help="which to time (compiled: the template with --model.compile true, as --compile adds)",
    )
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[32, 256], help="batch sizes to time")
    parser.add_argument(
        "--precision",
        nargs="+",
        default=["32-true"],
        choices=["32-true", "bf16-mixed"],
        help="precisions of the plain loop, bare Lightning and the template, each timed (not the tutorial's)",
    )
    parser.add_argument("--output", type=Path, default=HERE / "results.md")
    args = parser.parse_args()
    data_dir = args.data_dir.resolve()
    missing = [name for name in RAW_FILES if not (data_dir / "MNIST" / "raw" / name).is_file()]
    if missing:
        sys.exit(
            f"real MNIST is needed in {data_dir}/MNIST/raw/ (missing: {', '.join(missing)}). "
            "Get it with: python main.py fit --config config.yaml --trainer.max_epochs 0 (downloads it), "
            "or copy the four uncompressed IDX files there."
        )

    def write_table(times: dict[str, list[list[float]]], steps: dict[str, list[list[float]]]) -> None:
        args.output.write_text(table(times, steps, {}, None))

    kinds = [*args.contenders, *(["compiled"] if args.compile else [])]
    times, steps = measure_epochs(
        data_dir, args.rounds, args.epochs, kinds, args.batch_sizes, args.precision, write_table
    )
    peak_mb = template_peak_memory(data_dir)
    presets = {}
    if args.presets is not None:
        for name in args.presets or sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")):
            for seed in args.seeds or [None]:
                key = f"{name}|{'shipped' if seed is None else seed}"
                presets[key] = measure_preset(data_dir, name, seed)
                print(f"preset {key}: {presets[key]}", flush=True)
    result = table(times, steps, presets, peak_mb)
    args.output.write_text(result)
    print(result)


if __name__ == "__main__":
    main()
