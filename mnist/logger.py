"""TensorBoard laid out to be read at a glance: one run per stage, so that one chart holds train, val and test loss.

TensorBoard draws a tag on one chart for every run that has it, and gives each tag prefix a group of its own. A
metric the model logs as ``val/loss`` is therefore written as the tag ``loss`` of the run ``<version>/val``:

- the charts ``acc`` and ``loss`` open first, each with its training, validation and test values overlaid;
- ``lr`` and the pictures (``pictures/...``) sort after them;
- the hyperparameter session sits in ``<version>``, so TensorBoard's HParams tab takes each stage's last values
  as that run's metrics, column ``val.acc``, ``test.loss``, ... .

Other loggers (CSV, W&B, MLflow) get the metric names unchanged.
"""

import io
import threading
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from lightning_fabric.utilities.rank_zero import rank_zero_only
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer import record_writer
from torch.utils.tensorboard.writer import FileWriter

from mnist.crc32c import masked_crc32c

# tensorboard checksums every record it writes in pure Python (tensorflow/tensorboard#4354), ~8 ms a validation for
# the pictures, and has no setting for another implementation. Its record writer looks the function up in its own
# module at every record, so it is replaced there, for every TensorBoard writer of the process; the checksums are the
# same. Should tensorboard rename it, this changes nothing.
if hasattr(record_writer, "masked_crc32c"):
    record_writer.masked_crc32c = masked_crc32c


class StageTensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoardLogger, writing a metric ``stage/name`` as the tag ``name`` of the run ``stage``.

    Takes the arguments of ``pytorch_lightning.loggers.TensorBoardLogger``. Metrics without a ``/`` stay in the
    version's own run.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._stage_writers: dict[str, FileWriter] = {}
        self._writers_lock = threading.Lock()  # the pictures' thread opens writers too
        self._pictures: ThreadPoolExecutor | None = None
        self._pictures_pending: list[Future] = []

    def stage_writer(self, stage: str) -> FileWriter:
        """The event writer of the run ``<version>/<stage>``, opened on first use."""
        with self._writers_lock:
            if stage not in self._stage_writers:
                self._stage_writers[stage] = FileWriter(str(Path(self.log_dir) / stage))
            return self._stage_writers[stage]

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float | torch.Tensor], step: int | None = None) -> None:
        rest = {}
        # One event per stage with all of its values: each event costs ~30 µs to queue for the writer's thread on a
        # CPU, more than the rest of a value's logging, and the step curves log two values at a time.
        by_stage: dict[str, Summary] = {}
        for key, value in metrics.items():
            stage, _, name = key.partition("/")
            if not name:
                rest[key] = value
                continue
            # What `torch.utils.tensorboard.summary.scalar` writes, without its trip through numpy (~2 µs a value);
            # float() takes a number or a one-element tensor alike.
            by_stage.setdefault(stage, Summary()).value.add(tag=name, simple_value=float(value))
        for stage, summary in by_stage.items():
            self.stage_writer(stage).add_summary(summary, step)
        if rest:
            super().log_metrics(rest, step)

    @rank_zero_only
    def log_image(self, key: str, image: Image.Image, step: int, background: bool = False) -> None:
        """Log an RGB picture ``stage/name`` as ``pictures/name`` of the stage's run.

        With ``background`` the picture is encoded and written on a thread of its own, in the order logged, while
        the run goes on (the MLP's two pictures take ~7 ms a validation, in Pillow's PNG encoder, which lets go of the
        GIL). ``wait_for_pictures`` waits for them, and ``finalize`` too; an error there is raised by the next
        ``log_image``, by ``wait_for_pictures`` or by ``finalize``.
        """
        self._raise_picture_errors(wait=False)
        if not background and not self._pictures_pending:
            self._write_image(key, image, step)
            return
        if self._pictures is None:
            self._pictures = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tensorboard-pictures")
        self._pictures_pending.append(self._pictures.submit(self._write_image, key, image, step))

    def _write_image(self, key: str, image: Image.Image, step: int) -> None:
        stage, _, name = key.partition("/")
        if not name:
            self.experiment.add_image(key, np.asarray(image), step, dataformats="HWC")
        else:
            self.stage_writer(stage).add_summary(png_summary(f"pictures/{name}", image), step)

    def wait_for_pictures(self) -> None:
        """Wait until the pictures logged in the background are written; raise the first error among them."""
        self._raise_picture_errors(wait=True)

    def _raise_picture_errors(self, wait: bool) -> None:
        """Raise the first error of the pictures written so far; with ``wait``, wait for all of them first."""
        if wait:
            futures.wait(self._pictures_pending)
        # One look at each: a picture finishing between two looks would be in neither list, its error lost.
        finished = {f: f.done() for f in self._pictures_pending}
        self._pictures_pending = [f for f, done in finished.items() if not done]
        for future in (f for f, done in finished.items() if done):
            future.result()

    @rank_zero_only
    def save(self) -> None:
        super().save()
        with self._writers_lock:
            writers = list(self._stage_writers.values())
        for writer in writers:
            writer.flush()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        try:
            self._raise_picture_errors(wait=True)
        except Exception:
            if status == "success":  # after a failure, the error that ended the run is the one to see
                raise
        finally:
            if self._pictures is not None:
                self._pictures.shutdown()
                self._pictures = None
            super().finalize(status)
            with self._writers_lock:
                for writer in self._stage_writers.values():
                    writer.close()
                self._stage_writers.clear()


def png_summary(tag: str, image: Image.Image) -> Summary:
    """A TensorBoard image summary of an RGB picture, encoded as PNG at zlib level 1.

    ``SummaryWriter.add_image`` takes 9-11 ms for one of this project's ~500x500 pictures: it takes an array, copies
    the pixels through float32, resamples them at scale 1 and compresses at level 6. The Pillow picture encoded as it
    is, at level 1, takes 2-4 ms, with files ~10 % larger; the pixels are the same (PNG is lossless).
    """
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    width, height = image.size
    channels = len(image.getbands())
    picture = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=buffer.getvalue())
    return Summary(value=[Summary.Value(tag=tag, image=picture)])
