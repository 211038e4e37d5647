"""Serve a checkpoint with LitServe: a JSON prediction API and a page to draw digits on.

python -m mnist.serve --ckpt_path best [--host 127.0.0.1] [--port 8000]

POST /predict  {"image": "<base64 PNG/JPEG/BMP>"} or {"pixels": [[28 floats in [0, 1]] x 28]}
               -> {"prediction", "confidence", "probabilities", "class_name"}
GET  /         the drawing page          GET /health   "ok" once the model is loaded

Needs the optional ``requirements-serve.txt``.
"""

import argparse
import base64
import binascii
import io
import os
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnist import runs
from mnist.errors import UserError, exit_with_message
from mnist.images import to_mnist
from mnist.model import MNISTClassifier

try:
    import litserve as ls
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from pydantic import BaseModel, Field, model_validator
except ImportError as err:  # serving is optional
    exit_with_message(UserError(f"{err.name} is not installed: pip install -r requirements-serve.txt"))

MAX_BODY = 5 * 1024 * 1024  # bytes of a request body; a 280 x 280 drawing as PNG is ~10 kB
MAX_IMAGE_SIDE = 4096  # pixels; PIL decodes lazily, so a small file cannot claim a huge image unchecked
PAGE = Path(__file__).with_name("draw.html")
NOT_AN_OBJECT = "the body must be a JSON object with 'image' or 'pixels'"


def decode_image(data) -> np.ndarray:
    """A base64 image of any size and polarity, prepared as ``--data.predict_path`` prepares files."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, str):
        raise ValueError("'image' must be a base64 string")
    if data.startswith("data:"):  # a data URL, as a browser's canvas gives it
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("'image' is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
        size, kind = image.size, image.format
        if max(size) <= MAX_IMAGE_SIDE and kind in ("PNG", "JPEG", "BMP"):
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ValueError("'image' is not a PNG, JPEG or BMP image") from None
    if max(size) > MAX_IMAGE_SIDE:
        raise ValueError(f"the image is {size[0]} x {size[1]}; at most {MAX_IMAGE_SIDE} a side")
    if kind not in ("PNG", "JPEG", "BMP"):
        raise ValueError(f"'image' is {kind}; send PNG, JPEG or BMP")
    return to_mnist(image).numpy()


def decode_pixels(data) -> np.ndarray:
    """28 rows of 28 numbers in [0, 1], ink bright, as MNIST images are."""
    try:
        pixels = np.asarray(data)  # checked as a whole: a loop over 784 values costs more than the model
    except ValueError:  # ragged rows
        raise ValueError("'pixels' must be 28 rows of 28 numbers") from None
    if pixels.shape != (28, 28):
        raise ValueError(f"'pixels' must be 28 rows of 28 numbers, not of shape {list(pixels.shape)}")
    if pixels.dtype.kind not in "iuf":  # booleans, strings, nulls and mixtures are not pixels
        raise ValueError("'pixels' must hold numbers only")
    if not (np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1):
        raise ValueError("'pixels' must lie in [0, 1]")
    return pixels.astype(np.float32)[None]  # (28, 28) -> (1, 28, 28)


class DigitRequest(BaseModel):
    """A request's body, checked and decoded by the HTTP server, one request at a time, before it joins a batch.

    The model process predicts a batch as one: an error raised there would answer every request of the batch.
    """

    # (1, 28, 28) float32 numpy array in [0, 1], ink bright. Not in the repr: LitServe formats every request into a
    # debug message, logged or not, and printing 784 floats took milliseconds per request.
    pixels: Any = Field(repr=False)

    @model_validator(mode="before")
    @classmethod
    def decode(cls, body: Any) -> dict[str, np.ndarray]:
        if not isinstance(body, dict):
            raise ValueError(NOT_AN_OBJECT)
        if ("image" in body) == ("pixels" in body):
            raise ValueError("send exactly one of 'image' (base64 PNG/JPEG/BMP) and 'pixels' (28 x 28 in [0, 1])")
        return {"pixels": decode_image(body["image"]) if "image" in body else decode_pixels(body["pixels"])}


async def one_line_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """A rejected body as HTTP 400 ``{"detail": "<what is wrong>"}``, not FastAPI's 422 list that echoes the input."""
    first = error.errors()[0] if error.errors() else {}
    cause = (first.get("ctx") or {}).get("error")
    media_type = request.headers.get("content-type", "application/json").partition(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):  # not read as JSON (curl -d: a form)
        detail = f"the body is sent as {media_type or '?'}; send JSON, with the header Content-Type: application/json"
    elif first.get("type") == "json_invalid":
        detail = "the body is not valid JSON"
    elif isinstance(cause, ValueError):
        detail = str(cause)
    else:  # no body at all
        detail = NOT_AN_OBJECT
    return JSONResponse({"detail": detail}, status_code=400)


class DigitAPI(ls.LitAPI):
    """The checkpoint's classifier behind LitServe: requests decoded one by one, predicted in batches.

    The HTTP server checks and decodes each body (``DigitRequest``); the model process only stacks, predicts and
    answers.
    """

    def __init__(self, ckpt_path: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ckpt_path = ckpt_path

    def setup(self, device: str) -> None:
        if device == "cpu":
            # One thread per model process: a digit, or a batch of them, is too little work to share, and idle
            # threads spinning between requests take the CPU the HTTP server needs. More throughput: --workers.
            torch.set_num_threads(1)
        self.model = MNISTClassifier.load_from_checkpoint(self.ckpt_path, map_location=device, weights_only=True)
        self.model.eval()
        self.device_name = device

    def decode_request(self, request: DigitRequest) -> np.ndarray:
        return request.pixels  # decoded by the HTTP server (DigitRequest)

    def batch(self, inputs: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(inputs))  # B x (1, 28, 28) -> (B, 1, 28, 28)

    def predict(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(pixels, np.ndarray):  # one request, unbatched: (1, 28, 28) -> (1, 1, 28, 28)
            pixels = torch.from_numpy(pixels).unsqueeze(0)
        with torch.inference_mode():
            return self.model(pixels.to(self.device_name)).softmax(dim=-1).cpu()

    def unbatch(self, output: torch.Tensor) -> list[list[float]]:
        return output.tolist()  # one conversion for the batch, not ten per request

    def encode_response(self, probabilities: list[float] | torch.Tensor) -> dict:
        if isinstance(probabilities, torch.Tensor):  # unbatched: predict's one row
            probabilities = probabilities[0].tolist()
        prediction = max(range(len(probabilities)), key=probabilities.__getitem__)
        return {
            "prediction": prediction,
            "confidence": probabilities[prediction],
            "probabilities": [round(p, 6) for p in probabilities],
            "class_name": self.model.class_names[prediction],
        }


def resolve(ckpt_path: str, root: Path) -> tuple[Path, list[str]]:
    """The checkpoint to serve, checked, and its class names."""
    path = runs.find_checkpoint(ckpt_path, [root])
    checkpoint = runs.check_checkpoint(path)
    hyper = checkpoint.get("hyper_parameters", {})
    if tuple(hyper.get("image_shape") or ()) != (1, 28, 28):
        raise UserError(f"{path} is not a checkpoint of this project's 28 x 28 digit classifier")
    names = hyper.get("class_names") or [str(k) for k in range(hyper.get("num_classes", 10))]
    return path, [str(name) for name in names]


def build_server(
    ckpt_path: Path, class_names: list[str], max_batch_size: int, batch_timeout: float, workers: int, accelerator: str
):
    api = DigitAPI(ckpt_path, max_batch_size=max_batch_size, batch_timeout=batch_timeout)
    server = ls.LitServer(
        api,
        accelerator=accelerator,
        workers_per_device=workers,
        max_payload_size=MAX_BODY,
        timeout=30,
        # GET /info: the page labels its bars with these.
        model_metadata={"checkpoint": str(ckpt_path), "class_names": class_names},
    )
    page = PAGE.read_text()
    # The drawing page, in place of LitServe's "litserve running": one self-contained file, nothing fetched from
    # elsewhere. (Starlette's route list is public; LitServe has no option for its root page.)
    server.app.router.routes = [r for r in server.app.router.routes if getattr(r, "path", None) != "/"]
    server.app.add_api_route("/", lambda: HTMLResponse(page), methods=["GET"], include_in_schema=False)
    server.app.add_exception_handler(RequestValidationError, one_line_error)
    return server


def stop_on_sigterm() -> None:
    """SIGTERM (``kill``, a service manager) stops the server as Ctrl-C does, with its model and HTTP processes.

    By default it ended this process alone, and the others kept running, holding the port.
    """
    main_pid = os.getpid()

    def handler(signum: int, frame) -> None:
        if os.getpid() != main_pid:  # an HTTP server process forked from this one: end as it would have
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt  # LitServer.run shuts its processes down on it

    signal.signal(signal.SIGTERM, handler)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mnist.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="best, last (of the newest run under --root) or a path")
    parser.add_argument("--root", type=Path, default=Path("logs"), help="where best/last look for runs")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max_batch_size", type=int, default=32, help="dynamic batching: requests per forward")
    parser.add_argument("--batch_timeout", type=float, default=0.002, help="seconds to wait to fill a batch")
    parser.add_argument("--workers", type=int, default=1, help="model processes per device")
    parser.add_argument(
        "--api_servers",
        type=int,
        default=2,
        help="HTTP server processes: with one, parsing requests (~1 ms each on a CPU) is the limit, and batching the "
        "model's work gains nothing",
    )
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        if args.max_batch_size < 1 or args.batch_timeout < 0 or args.workers < 1 or args.api_servers < 1:
            raise UserError(
                "--max_batch_size, --workers and --api_servers must be at least 1, --batch_timeout at least 0"
            )
        path, names = resolve(args.ckpt_path, args.root)
        server = build_server(path, names, args.max_batch_size, args.batch_timeout, args.workers, args.accelerator)
    except UserError as err:
        exit_with_message(err)
    host = "localhost" if args.host in ("127.0.0.1", "0.0.0.0") else args.host
    print(f"Serving {path}: open http://{host}:{args.port}/ (API: POST /predict)", file=sys.stderr, flush=True)
    stop_on_sigterm()
    server.run(
        host=args.host,
        port=args.port,
        num_api_servers=args.api_servers,
        generate_client_file=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
