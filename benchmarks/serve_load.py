"""Load on `python -m mnist.serve` from localhost: requests/s and latency at 1, 8 and 64 concurrent clients.

    python benchmarks/serve_load.py --ckpt_path best          # batching on and off, side by side
    python benchmarks/serve_load.py --ckpt_path mlp.ckpt cnn.ckpt   # several checkpoints, one table

Each setting starts its own server (dynamic batching on: --max_batch_size 32; off: 1), warms it up, then each
client sends its share of --requests requests back to back, a 28 x 28 digit as JSON pixels, over a kept-alive
connection. The settings alternate over --rounds; a failed request stops the benchmark. Prints a markdown table
and writes it to --output, with the CPU time the server's processes (HTTP server, LitServe's queue manager, model
worker) spent per request: what batching can save is the model worker's share of it.
"""

import argparse
import datetime
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mnist import runs  # noqa: E402

SETTINGS = {"batching on": ["--max_batch_size", "32"], "batching off": ["--max_batch_size", "1"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(ckpt_path: str, extra: list[str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "mnist.serve", "--ckpt_path", ckpt_path, "--port", str(port), *extra]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the server stopped: {process.stderr.read()}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process, port
        except OSError:
            time.sleep(0.5)
    sys.exit("the server did not come up in 120 s")


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def client(port: int, count: int, body: bytes, latencies: list[float], failures: list[str]) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"}
    for _ in range(count):
        start = time.perf_counter()
        try:
            connection.request("POST", "/predict", body, headers)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                failures.append(f"HTTP {response.status}")
        except OSError as err:
            failures.append(repr(err))
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        latencies.append(time.perf_counter() - start)


def server_cpu_seconds(process: subprocess.Popen) -> float:
    """CPU time used so far by the server's processes (its process group; Linux), NaN where /proc is missing."""
    total = 0.0
    proc = Path("/proc")
    if not proc.is_dir():
        return float("nan")
    for entry in proc.iterdir():
        try:
            if not entry.name.isdigit() or os.getpgid(int(entry.name)) != process.pid:
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ProcessLookupError):
            continue  # ended meanwhile
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def load(port: int, clients: int, requests: int, body: bytes, server: subprocess.Popen) -> dict[str, float]:
    latencies: list[float] = []
    failures: list[str] = []
    share = [requests // clients + (k < requests % clients) for k in range(clients)]
    threads = [threading.Thread(target=client, args=(port, n, body, latencies, failures)) for n in share]
    start, cpu_start = time.perf_counter(), server_cpu_seconds(server)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds, cpu = time.perf_counter() - start, server_cpu_seconds(server) - cpu_start
    if failures:
        sys.exit(f"{len(failures)} of {requests} requests failed at {clients} clients, e.g. {failures[0]}")
    latencies.sort()
    return {
        "rps": requests / seconds,
        "p50": 1000 * statistics.median(latencies),
        "p99": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "cpu": 1000 * cpu / requests,
    }


def network_of(ckpt: str) -> str:
    """The served network's class, as the checkpoint names it (best/last: of the newest run under logs/)."""
    path = runs.find_checkpoint(ckpt, [Path("logs")])
    network = torch.load(path, map_location="cpu", weights_only=True)["hyper_parameters"].get("network") or {}
    return str(network.get("class_path", "mnist.networks.MLP")).rsplit(".", 1)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", nargs="+", required=True, help="what mnist.serve serves: best, last, paths")
    parser.add_argument("--requests", type=int, default=2000, help="requests per measurement")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds over the settings")
    parser.add_argument(
        "--api_servers",
        type=int,
        default=2,
        help="the server's HTTP processes (mnist.serve --api_servers, default 2)",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "serve_results.md")
    args = parser.parse_args()
    body = json.dumps({"pixels": [[0.0] * 12 + [1.0] * 4 + [0.0] * 12 for _ in range(28)]}).encode()
    results: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    networks = {ckpt: network_of(ckpt) for ckpt in args.ckpt_path}
    for round_ in range(args.rounds):
        for ckpt, network in networks.items():
            for name, extra in SETTINGS.items() if round_ % 2 == 0 else reversed(SETTINGS.items()):
                process, port = start(ckpt, [*extra, "--api_servers", str(args.api_servers)])
                try:
                    load(port, 8, 200, body, process)  # warm-up
                    for clients in args.clients:
                        result = load(port, clients, args.requests, body, process)
                        results.setdefault((network, name, clients), []).append(result)
                        print(f"round {round_ + 1}: {network}, {name}, {clients} clients: {result}", flush=True)
                finally:
                    stop(process)
    lines = [
        f"Measured {datetime.date.today()} on {platform.machine()}, {os.cpu_count()} CPU cores, PyTorch "
        f"{torch.__version__}; client and server on the same machine; server with {args.api_servers} HTTP "
        f"process(es); {args.requests} requests per measurement, median over {args.rounds} rounds.",
        "",
        "| network | setting | clients | requests/s | p50 latency (ms) | p99 latency (ms) "
        "| server CPU per request (ms) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (network, name, clients), measured in sorted(results.items()):
        rps, p50, p99, cpu = (statistics.median(r[key] for r in measured) for key in ("rps", "p50", "p99", "cpu"))
        lines.append(f"| {network} | {name} | {clients} | {rps:.0f} | {p50:.1f} | {p99:.1f} | {cpu:.2f} |")
    table = "\n".join(lines) + "\n"
    args.output.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
