"""Serving: a real `python -m mnist.serve` on a free port, asked over HTTP as a client would."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from mnist.images import to_mnist
from mnist.model import MNISTClassifier
from tests.conftest import ROOT
from tests.conftest import cli_in_process as cli
from tests.test_images import bar_digit

pytest.importorskip("litserve")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "mnist.serve", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip


def ask(url: str, body=None, raw: bytes | None = None) -> tuple[int, dict | str]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def wait_until_serving(process: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server stopped: {process.communicate()[1]}")
        try:
            if ask(f"{url}/health")[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.5)
    pytest.fail("the server did not come up in 120 s")


@pytest.fixture(scope="module")
def server(tmp_path_factory, mnist_dir):
    """A checkpoint trained for one epoch, served on a free port for the module's tests."""
    cwd = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        cli(["fit", "--config", str(ROOT / "config.yaml"), "--data.data_dir", str(mnist_dir), "--data.val_size", "100",
             "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    ckpt = next((cwd / "logs/lightning_logs/version_0/checkpoints").glob("epoch*.ckpt"))
    port = free_port()
    process = serve(["--ckpt_path", "best", "--port", str(port)], cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(process, url)
    model = MNISTClassifier.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    yield {"url": url, "model": model, "process": process, "cwd": cwd}
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def expected(model: MNISTClassifier, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixels.unsqueeze(0)).softmax(-1)[0]


@pytest.mark.parametrize("polarity", ["dark on light", "light on dark"])
def test_png_digits_answer_as_the_checkpoint_does(server, polarity):
    image = bar_digit() if polarity == "dark on light" else bar_digit(ink=255, paper=0)
    status, body = ask(f"{server['url']}/predict", {"image": png(image)})
    assert status == 200, body
    probabilities = expected(server["model"], to_mnist(image))
    assert body["probabilities"] == pytest.approx(probabilities.tolist(), abs=1e-5)
    assert body["prediction"] == int(probabilities.argmax()) and body["confidence"] == pytest.approx(
        float(probabilities.max()), abs=1e-5
    )
    assert body["class_name"] == server["model"].class_names[body["prediction"]]


def test_pixels_and_a_browser_data_url_are_accepted(server):
    pixels = to_mnist(bar_digit())
    status, body = ask(f"{server['url']}/predict", {"pixels": pixels[0].tolist()})
    assert status == 200, body
    assert body["probabilities"] == pytest.approx(expected(server["model"], pixels).tolist(), abs=1e-5)
    status, body = ask(f"{server['url']}/predict", {"image": "data:image/png;base64," + png(bar_digit())})
    assert status == 200, body


@pytest.mark.parametrize(
    ("payload", "raw"),
    [
        (None, b"{not json"),
        ([1, 2, 3], None),
        ({}, None),
        ({"image": "!!! not base64 !!!"}, None),
        ({"image": base64.b64encode(b"plain text, not an image").decode()}, None),
        ({"image": 42}, None),
        ({"pixels": [[0.0] * 28] * 27}, None),
        ({"pixels": [[1.5] * 28] * 28}, None),
        ({"pixels": [["a"] * 28] * 28}, None),
        ({"pixels": [[0.0] * 28] * 28, "image": "x"}, None),
        (None, json.dumps({"image": "A" * (6 * 1024 * 1024)}).encode()),
    ],
    ids=[
        "malformed JSON",
        "not an object",
        "empty",
        "not base64",
        "not an image",
        "not a string",
        "27 rows",
        "out of range",
        "not numbers",
        "both keys",
        "6 MB body",
    ],  # fmt: skip
)
def test_bad_input_is_a_4xx_with_a_one_line_json_error_and_the_next_request_is_served(server, payload, raw):
    status, body = ask(f"{server['url']}/predict", payload, raw=raw)
    assert 400 <= status < 500, (status, body)
    assert isinstance(body, dict) and "detail" in body and "\n" not in json.dumps(body), body
    status, _ = ask(f"{server['url']}/predict", {"pixels": [[0.0] * 28] * 28})
    assert status == 200


def test_concurrent_requests_are_batched_and_all_answered(server):
    pixels = {"pixels": to_mnist(bar_digit())[0].tolist()}
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: ask(f"{server['url']}/predict", pixels), range(48)))
    assert [status for status, _ in answers] == [200] * 48
    assert len({body["prediction"] for _, body in answers}) == 1


def test_a_body_not_sent_as_json_is_told_the_header_to_use(server):
    body = json.dumps({"pixels": [[0.0] * 28] * 28}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):  # the latter is curl -d's default
        request = urllib.request.Request(f"{server['url']}/predict", data=body, headers={"Content-Type": content_type})
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=30)
        assert answer.value.code == 400
        assert "Content-Type: application/json" in json.loads(answer.value.read())["detail"]


def test_a_bad_request_among_concurrent_ones_fails_alone(server):
    # Batched requests are predicted together: one that cannot be must not take its batch down with it.
    good = {"pixels": to_mnist(bar_digit())[0].tolist()}
    bad = {"pixels": [[2.0] * 28] * 28}
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda payload: ask(f"{server['url']}/predict", payload), [good, bad] * 32))
    assert [status for status, _ in answers] == [200, 400] * 32
    assert {body["detail"] for _, body in answers[1::2]} == {"'pixels' must lie in [0, 1]"}


def test_the_page_and_health(server):
    status, page = ask(server["url"] + "/")
    assert status == 200 and "<canvas" in page and "predict" in page
    # Offline: nothing is fetched from anywhere but this server.
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    status, info = ask(server["url"] + "/info")
    assert status == 200 and info["model"]["class_names"] == server["model"].class_names
    assert ask(server["url"] + "/health")[0] == 200


def refusal(args: list[str], cwd: Path) -> str:
    """The one ``error:`` line a server started with ``args`` exits with (it must exit non-zero)."""
    process = serve([*args, "--port", str(free_port())], cwd=cwd)
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


@pytest.mark.parametrize("what", ["missing", "not a checkpoint"])
def test_an_unfit_checkpoint_is_one_error_line_at_start(tmp_path, what):
    path = tmp_path / "model.ckpt"
    if what == "not a checkpoint":
        path.write_bytes(b"not a checkpoint at all")
    assert str(path) in refusal(["--ckpt_path", str(path)], tmp_path)


@pytest.mark.parametrize("setting", [["--max_batch_size", "0"], ["--api_servers", "0"], ["--batch_timeout", "-1"]])
def test_a_bad_server_setting_is_one_error_line_at_start(tmp_path, setting):
    assert setting[0] in refusal(["--ckpt_path", "best", *setting], tmp_path)


def test_sigterm_to_the_server_stops_all_its_processes(server):
    # `kill PID` or a service manager signals the main process only; its model and HTTP processes must go with it.
    port = free_port()
    process = serve(["--ckpt_path", "best", "--port", str(port)], cwd=server["cwd"])
    wait_until_serving(process, f"http://127.0.0.1:{port}")
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    deadline = time.monotonic() + 30
    while True:
        try:
            os.killpg(process.pid, 0)  # raises once no process of the server's group is left
        except ProcessLookupError:
            break
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail("processes of the server were still running 30 s after it was sent SIGTERM")
        time.sleep(0.2)


def test_drawing_on_the_page_in_a_headless_browser_shows_an_answer(server, tmp_path):
    """A real Chromium draws a stroke with the mouse (DevTools protocol); the page asks the server and shows bars."""
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine")
    sync_client = pytest.importorskip("websockets.sync.client")
    port = free_port()
    chrome = subprocess.Popen(
        [browser, "--headless=new", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={port}",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=800,900", server["url"] + "/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        page = None
        while page is None and time.monotonic() < deadline:
            try:
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=5))
                page = next((t for t in targets if t.get("type") == "page" and server["url"] in t["url"]), None)
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            time.sleep(0.3)
        assert page is not None, "Chromium did not open the page"
        with sync_client.connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            counter = iter(range(1, 10_000))

            def send(method: str, **params):
                number = next(counter)
                ws.send(json.dumps({"id": number, "method": method, "params": params}))
                while True:
                    message = json.loads(ws.recv(timeout=30))
                    if message.get("id") == number:
                        return message.get("result", {})

            def evaluate(expression: str):
                return send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

            deadline = time.monotonic() + 30  # the tab starts as about:blank, then loads the page
            while not evaluate("document.readyState === 'complete' && !!document.getElementById('pad')"):
                assert time.monotonic() < deadline, "the page did not load"
                time.sleep(0.1)
            left, top, width, height = evaluate(
                "(() => { const r = document.getElementById('pad').getBoundingClientRect();"
                " return [r.left, r.top, r.width, r.height]; })()"
            )
            x = left + width / 2
            send("Input.dispatchMouseEvent", type="mousePressed", x=x, y=top + 0.2 * height, button="left",
                 clickCount=1)  # fmt: skip
            for k in range(1, 13):
                y = top + (0.2 + 0.6 * k / 12) * height
                send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y, button="left", buttons=1)
            send("Input.dispatchMouseEvent", type="mouseReleased", x=x, y=top + 0.8 * height, button="left",
                 clickCount=1)  # fmt: skip
            answer = ""
            deadline = time.monotonic() + 20
            while not answer[:1].isdigit() and time.monotonic() < deadline:
                time.sleep(0.2)
                answer = evaluate("document.getElementById('answer').textContent") or ""
            error = evaluate("document.getElementById('error').textContent")
            assert answer[:1].isdigit(), f"no answer shown: {answer!r}, error: {error!r}"
            assert evaluate("document.querySelectorAll('#bars li').length") == 10
            assert evaluate("document.querySelectorAll('#bars li.top').length") == 1
            shown = evaluate("document.querySelector('#bars li.top span').textContent")
            assert shown == server["model"].class_names[int(answer[0])]
    finally:
        os.killpg(chrome.pid, signal.SIGKILL)
        chrome.wait()
