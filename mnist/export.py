"""Export a trained checkpoint for inference without Lightning, and check the export against the original.

    python -m mnist.export --ckpt_path logs/mnist/version_0/checkpoints/last.ckpt --format onnx --output model.onnx
    python -m mnist.export --ckpt_path CKPT --format torch.export --output model.pt2

The exported model takes raw pixels, a float tensor ``(N, 1, 28, 28)`` in [0, 1], and returns logits ``(N, 10)``:
the training normalisation is inside it. ONNX export needs ``pip install -r requirements-export.txt``.
"""

import argparse
from pathlib import Path

import torch
from torch import nn
from torchvision.datasets import MNIST

from mnist.errors import UserError, exit_with_message
from mnist.model import MNISTClassifier
from mnist.runs import check_checkpoint

TOLERANCE = 1e-4  # largest difference in logits allowed between the export and the checkpoint
FORMATS = ("onnx", "torch.export")


def load(ckpt_path: Path) -> MNISTClassifier:
    """The checkpoint's model, as trained: it takes raw pixels and normalises them itself."""
    check_checkpoint(ckpt_path)
    return MNISTClassifier.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True).eval()


def sample_pixels(data_dir: str, count: int = 256) -> torch.Tensor:
    """Real MNIST test images as raw pixels ``(count, 1, 28, 28)`` in [0, 1]."""
    try:
        images = MNIST(data_dir, train=False).data[:count]
    except RuntimeError as err:
        raise UserError(f"the check needs MNIST test images in {data_dir}/MNIST/raw/ (--data_dir): {err}") from err
    return images.unsqueeze(1).float() / 255


def export_onnx(model: nn.Module, example: torch.Tensor, output: Path) -> None:
    try:
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError as err:
        raise UserError("ONNX export needs onnx and onnxscript: pip install -r requirements-export.txt") from err
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        model, (example,), str(output), input_names=["pixels"], output_names=["logits"],
        dynamic_shapes={"pixels": {0: batch}}, external_data=False, dynamo=True,
    )  # fmt: skip


def run_onnx(path: Path, pixels: torch.Tensor) -> torch.Tensor:
    try:
        import onnxruntime
    except ImportError as err:
        raise UserError("checking an ONNX export needs onnxruntime: pip install -r requirements-export.txt") from err
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"pixels": pixels.numpy()})[0])


def export(ckpt_path: Path, fmt: str, output: Path, data_dir: str) -> float:
    """Export, reload the file, and return the largest logit difference from the checkpoint on real images."""
    model = load(ckpt_path)
    pixels = sample_pixels(data_dir)
    with torch.no_grad():
        expected = model(pixels)
    output.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        export_onnx(model, pixels[:2], output)
        actual = run_onnx(output, pixels)
    else:
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(model, (pixels[:2],), dynamic_shapes={"pixels": {0: batch}})
        torch.export.save(program, output)
        with torch.no_grad():
            actual = torch.export.load(output).module()(pixels)
    difference = (actual - expected).abs().max().item()
    agree = (actual.argmax(1) == expected.argmax(1)).float().mean().item()
    print(f"Exported {ckpt_path} to {output} ({fmt}); on {len(pixels)} MNIST test images the largest logit "
          f"difference from the checkpoint is {difference:.2e} (limit {TOLERANCE:g}), predictions agree on "
          f"{100 * agree:.1f} %")  # fmt: skip
    if difference > TOLERANCE:
        output.unlink()
        raise UserError(f"the export differs from the checkpoint by {difference:.2e} > {TOLERANCE:g}; removed {output}")
    return difference


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mnist.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--ckpt_path", type=Path, required=True, help="checkpoint to export")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="file format (default: onnx)")
    parser.add_argument("--output", type=Path, required=True, help="file to write, e.g. model.onnx")
    parser.add_argument("--data_dir", default="data", help="folder with MNIST/raw/, for the numerical check")
    args = parser.parse_args(argv)
    try:
        export(args.ckpt_path, args.format, args.output, args.data_dir)
    except UserError as err:
        exit_with_message(err)


if __name__ == "__main__":
    main()
