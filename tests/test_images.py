"""Predicting the user's own digit images, the pictures in TensorBoard, and the model export."""

import csv
import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image, ImageDraw
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
from tensorboard.summary.writer import record_writer

from mnist import logger as logger_module
from mnist.crc32c import CHUNK, SMALL, masked_crc32c
from mnist.errors import UserError
from mnist.images import image_files, load_digits, to_mnist
from mnist.logger import StageTensorBoardLogger
from mnist.visuals import _font, _text, confusion_matrix_image, digit_grid_image
from tests.conftest import CONFIG
from tests.conftest import cli_in_process as cli


def bar_digit(size=(90, 60), ink=0, paper=255, box=(20, 10, 40, 70)) -> Image.Image:
    """A drawing of a '1': a vertical bar of ink on paper, off-centre in a canvas of any size."""
    pixels = np.full((size[1], size[0]), paper, np.uint8)
    left, top, right, bottom = box
    pixels[top:bottom, left:right] = ink
    return Image.fromarray(pixels)


def test_dark_ink_on_light_paper_becomes_a_centred_bright_mnist_digit():
    digit = to_mnist(bar_digit())[0]
    assert digit.shape == (28, 28) and 0 <= digit.min() and digit.max() <= 1
    assert digit[0].sum() == 0 and digit[:, 0].sum() == 0, "background must be black"
    rows, cols = torch.nonzero(digit > 0.5, as_tuple=True)
    assert rows.max() - rows.min() + 1 == 20, "the longer side fills 20 pixels, as in MNIST"
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    centre = ((ys * digit).sum() / digit.sum(), (xs * digit).sum() / digit.sum())
    assert abs(centre[0] - 14) <= 1 and abs(centre[1] - 14) <= 1, "centre of mass at the centre"


def test_polarity_and_size_do_not_change_the_result():
    light_on_dark = to_mnist(bar_digit(ink=255, paper=0))
    dark_on_light = to_mnist(bar_digit())
    huge = to_mnist(bar_digit(size=(900, 600), box=(200, 100, 400, 700)))
    torch.testing.assert_close(light_on_dark, dark_on_light)
    torch.testing.assert_close(huge, dark_on_light, atol=0.1, rtol=0)


def test_a_folder_with_a_bad_file_still_predicts_the_rest(tmp_path):
    bar_digit().save(tmp_path / "a.png")
    bar_digit().convert("RGB").save(tmp_path / "b.jpg")
    (tmp_path / "c.png").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored: not an image suffix")
    images, kept, skipped = load_digits(image_files(tmp_path))
    assert images.shape == (2, 1, 28, 28)
    assert [p.name for p in kept] == ["a.png", "b.jpg"]
    assert len(skipped) == 1 and "c.png: not a readable image" in skipped[0]


def test_empty_folder_and_missing_path_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="holds no PNG, JPEG or BMP files"):
        image_files(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        image_files(tmp_path / "nope")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_dir) -> Path:
    cwd = tmp_path_factory.mktemp("images")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        cli(["fit", "--config", str(CONFIG), "--data.data_dir", str(mnist_dir), "--data.val_size", "100",
             "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "4",  # undertrained: it makes mistakes
             "--trainer.enable_progress_bar", "false"])  # fmt: skip
        cli(
            ["test", "--ckpt_path", "last", "--data.data_dir", str(mnist_dir), "--trainer.enable_progress_bar", "false"]
        )
    return cwd


def images(run_dir: Path) -> dict[str, list[int]]:
    """A run's pictures by the name the model logs them under (``val/confusion_matrix``), with their steps."""
    found = {}
    for stage in ("val", "test"):
        events = EventAccumulator(str(run_dir / stage), size_guidance={"images": 0})
        events.Reload()
        for tag in events.Tags()["images"]:
            found[f"{stage}/{tag.removeprefix('pictures/')}"] = [e.step for e in events.Images(tag)]
    return found


def test_tensorboard_shows_confusion_matrix_and_mistakes(trained):
    pictures = images(trained / "logs/lightning_logs/version_0")
    assert {"val/confusion_matrix", "val/most_confident_mistakes"} <= pictures.keys()
    assert {"test/confusion_matrix", "test/most_confident_mistakes"} <= pictures.keys()
    assert len(pictures["val/confusion_matrix"]) == 2, "one per validation epoch, none for the sanity check"


def test_a_logged_picture_reads_back_pixel_for_pixel(tmp_path):
    # The logger encodes pictures itself (a faster PNG level than SummaryWriter.add_image): TensorBoard must still
    # read them, at their step, with the pixels drawn.
    picture = confusion_matrix_image(torch.tensor([[5, 1], [0, 7]]), "val at step 3", ["0 - zero", "1 - one"])
    logger = StageTensorBoardLogger(save_dir=tmp_path, name="", version="run")
    logger.log_image("val/confusion_matrix", picture, step=3)
    logger.finalize("success")
    events = EventAccumulator(str(tmp_path / "run" / "val"), size_guidance={"images": 0})
    events.Reload()
    (event,) = events.Images("pictures/confusion_matrix")
    assert event.step == 3 and (event.width, event.height) == picture.size
    decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, np.asarray(picture))
    assert len(event.encoded_image_string) > SMALL, "checksummed by mnist.crc32c's numpy path"


def test_pictures_written_on_their_thread_arrive_in_order_and_errors_are_raised(tmp_path):
    logger = StageTensorBoardLogger(save_dir=tmp_path, name="", version="run")
    for step in (1, 2, 3):
        picture = confusion_matrix_image(torch.eye(2) * step, f"{step}")
        logger.log_image("val/confusion_matrix", picture, step=step, background=True)
    # PNG has no 32-bit float pixels. Not in the background, but after pictures that are: it waits its turn.
    logger.log_image("val/confusion_matrix", Image.new("F", (4, 4)), step=4)
    with pytest.raises(OSError, match="cannot write mode F as PNG"):
        logger.finalize("success")
    events = EventAccumulator(str(tmp_path / "run" / "val"), size_guidance={"images": 0})
    events.Reload()
    assert [event.step for event in events.Images("pictures/confusion_matrix")] == [1, 2, 3]


def test_pictures_not_in_the_background_are_written_at_once(tmp_path):
    logger = StageTensorBoardLogger(save_dir=tmp_path, name="", version="run")
    logger.log_image("val/confusion_matrix", confusion_matrix_image(torch.eye(2), "1"), step=1)
    logger.save()
    events = EventAccumulator(str(tmp_path / "run" / "val"), size_guidance={"images": 0})
    events.Reload()
    assert [event.step for event in events.Images("pictures/confusion_matrix")] == [1], "on disk before finalize"
    with pytest.raises(OSError, match="cannot write mode F as PNG"):
        logger.log_image("val/confusion_matrix", Image.new("F", (4, 4)), step=2)
    assert not any(t.name.startswith("tensorboard-pictures") for t in threading.enumerate())
    logger.finalize("failed")


def test_waiting_for_pictures_writes_them_and_raises_their_error(tmp_path):
    logger = StageTensorBoardLogger(save_dir=tmp_path, name="", version="run")
    for step in (1, 2):
        logger.log_image("val/confusion_matrix", confusion_matrix_image(torch.eye(2), "1"), step=step, background=True)
    logger.wait_for_pictures()
    logger.save()
    events = EventAccumulator(str(tmp_path / "run" / "val"), size_guidance={"images": 0})
    events.Reload()
    assert [event.step for event in events.Images("pictures/confusion_matrix")] == [1, 2], "on disk before finalize"
    logger.log_image("val/confusion_matrix", Image.new("F", (4, 4)), step=3, background=True)
    with pytest.raises(OSError, match="cannot write mode F as PNG"):
        logger.wait_for_pictures()
    logger.finalize("success")  # the error was raised once, by the wait
    assert not any(t.name.startswith("tensorboard-pictures") for t in threading.enumerate())


class PicturesPendingAtTraining(pl.Callback):
    """Counts, at the first training batch of every epoch but the first, the pictures still being written."""

    pending: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.current_epoch > 0 and batch_idx == 0:
            type(self).pending.append(sum(not f.done() for f in trainer.logger._pictures_pending))


def test_training_on_a_cpu_waits_for_the_pictures_of_the_validation_before(fast_args, tmp_path, monkeypatch):
    # Encoding made slow enough that training would start beside it: it must wait, not share the CPU.
    encode = logger_module.png_summary
    monkeypatch.setattr(logger_module, "png_summary", lambda *args: time.sleep(0.3) or encode(*args))
    monkeypatch.setattr(PicturesPendingAtTraining, "pending", [])
    monkeypatch.chdir(tmp_path)
    cli(
        [
            "fit",
            *fast_args,
            "--trainer.max_epochs",
            "3",
            "--trainer.callbacks+=tests.test_images.PicturesPendingAtTraining",
        ]
    )
    assert PicturesPendingAtTraining.pending == [0, 0]


def test_event_records_carry_the_checksums_tensorboard_computes():
    # The logger puts mnist.crc32c in place of tensorboard's pure-Python checksum. TensorBoard's reader checks every
    # record with its own and stops reading a file at the first mismatch.
    assert record_writer.masked_crc32c is masked_crc32c
    rng = np.random.default_rng(0)
    for n in (0, 3, 4, 5, SMALL - 1, SMALL, SMALL + 1, SMALL + CHUNK - 1, 70_001):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert masked_crc32c(data) == pywrap_tensorflow.masked_crc32c(data), n


def test_labels_from_the_cache_are_the_pixels_pillow_draws():
    # Pictures blend cached renderings of their labels; they must look exactly as Pillow's own text.
    labels = [
        ("val at step 8600: accuracy 96.90%", 16, "la"),
        ("4873", 13, "mm"),
        ("0", 13, "mm"),
        ("7 - seven", 14, "lm"),
        ("9", 14, "mb"),
        ("as 3 - three 97%", 14, "la"),
        ("Ankle boot…", 14, "lm"),
    ]
    pictures = [Image.new("RGB", (300, 40 * len(labels)), (230, 250, 230)) for _ in range(2)]
    for twice in range(2):  # the second time from the cache
        for picture, cached in zip(pictures, (False, True), strict=True):
            draw = ImageDraw.Draw(picture)
            for i, (text, size, anchor) in enumerate(labels):
                xy, fill = (150 if anchor[0] == "m" else 10, 40 * i + 20), [(200, 0, 0), "white", "black"][i % 3]
                if cached:
                    _text(draw, xy, text, fill, size, anchor)
                else:
                    draw.text(xy, text, fill=fill, font=_font(size), anchor=anchor)
        assert np.array_equal(np.asarray(pictures[0]), np.asarray(pictures[1])), f"drawing {twice + 1}"
    assert (np.asarray(pictures[1]) != (230, 250, 230)).any(axis=2).sum() > 1000, "the labels were drawn"


@pytest.mark.parametrize("channels", [1, 3])
def test_the_mistakes_grid_shows_each_digit_scaled_as_pillow_would_with_its_caption(channels):
    # The grid scales all digits at once in numpy; Pillow's own nearest-neighbour resize of each is the reference.
    images = torch.rand(6, channels, 28, 28, generator=torch.Generator().manual_seed(0))
    targets, predictions = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([9, 8, 7, 6, 5, 4])
    grid = np.asarray(digit_grid_image(images, targets, predictions, torch.full((6,), 0.5), columns=4))
    tile, caption, side = 112, 38, 104
    assert grid.shape == (2 * (tile + caption), 4 * tile, 3)
    for i, image in enumerate(images):
        pixels = (image.numpy() * 255).astype(np.uint8)
        picture = Image.fromarray(pixels[0] if channels == 1 else pixels.transpose(1, 2, 0)).convert("RGB")
        expected = np.asarray(picture.resize((side, side), Image.NEAREST))
        x, y = (i % 4) * tile, (i // 4) * (tile + caption)
        assert np.array_equal(grid[y + 4 : y + 4 + side, x + 4 : x + 4 + side], expected), f"digit {i}"
        # The captions are Pillow's, drawn as two lines of text (the second from cached pieces).
        expected = Image.new("RGB", (tile, caption), "white")
        draw = ImageDraw.Draw(expected)
        draw.text((4, 0), str(targets[i].item()), fill="black", font=_font(14))
        draw.text((4, 17), f"as {predictions[i].item()} 50%", fill=(200, 0, 0), font=_font(14))
        captions = grid[y + tile : y + tile + caption, x : x + tile]
        assert np.array_equal(captions, np.asarray(expected)), f"digit {i}'s caption"
        assert ((captions[..., 0] > 150) & (captions[..., 1] < 80)).any(), f"digit {i}'s mistake is in red"
    assert (grid[tile + caption :, 2 * tile :] == 255).all(), "the slots without a digit stay blank"


def test_predict_own_images_writes_the_csv(trained, mnist_dir, tmp_path, capsys):
    folder = tmp_path / "digits"
    folder.mkdir()
    bar_digit().save(folder / "one.png")
    bar_digit(size=(40, 40), box=(5, 5, 35, 35)).save(folder / "blob.bmp")
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(trained)
        cli(["predict", "--config", str(CONFIG), "--ckpt_path", "last", "--data.predict_path", str(folder),
             "--data.data_dir", str(tmp_path / "no-mnist-needed"),
             "--trainer.enable_progress_bar", "false"])  # fmt: skip
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "broken.png" in captured.err
    path = trained / "logs/lightning_logs/version_0/predictions-images-last.csv"
    assert f"Predictions for 2 images written to logs/lightning_logs/version_0/{path.name}" in captured.out
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["path", "prediction", "class_name", "confidence", *(f"p{k}" for k in range(10))]
    assert [Path(r["path"]).name for r in rows] == ["blob.bmp", "one.png"]
    for row in rows:
        probs = [float(row[f"p{k}"]) for k in range(10)]
        assert sum(probs) == pytest.approx(1, abs=1e-4)
        assert float(row["confidence"]) == pytest.approx(max(probs), abs=1e-6)
        assert int(row["prediction"]) == int(np.argmax(probs))


@pytest.mark.parametrize("fmt", ["onnx", "torch.export"])
def test_export_round_trip_matches_the_checkpoint(trained, mnist_dir, tmp_path, capsys, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="ONNX export is checked with onnxruntime (requirements-export.txt)")
        pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (requirements-export.txt)")
    from mnist.export import main as export_main

    output = tmp_path / ("model.onnx" if fmt == "onnx" else "model.pt2")
    ckpt = trained / "logs/lightning_logs/version_0/checkpoints/last.ckpt"
    export_main(["--ckpt_path", str(ckpt), "--format", fmt, "--output", str(output), "--data_dir", str(mnist_dir)])
    out = capsys.readouterr().out
    assert output.is_file() and "largest logit difference from the checkpoint is" in out
    difference = float(out.split("checkpoint is ")[1].split()[0])
    assert difference <= 1e-4
