"""What the console shows: Lightning's lines that say nothing about the run are left out, each matched by its text.

Only these exact messages are dropped; every other warning and info line still shows.
"""

import logging
import warnings

# Lightning's info lines that are not about this run: an advertisement; a note on its own bookkeeping (a one-cycle
# schedule asks for the number of steps); and the normal end of a fit, printed into the progress bar's last line,
# which the bar then draws a second time below it.
_QUIET_INFO = (
    "💡 Tip:",
    "Loading `train_dataloader` to estimate number of stepping batches",
    "`Trainer.fit` stopped: `max_epochs=",
)

# Warnings about libraries' use of each other, which a user of this project can do nothing about.
_QUIET_WARNINGS = (
    # Lightning on newer PyTorch: https://github.com/Lightning-AI/pytorch-lightning/issues/21326
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # The prediction CSV writer takes each sample's index from the loader's sampler, not from Lightning's.
    r"Couldn't infer the batch indices",
)


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_QUIET_INFO)


def quiet_console() -> None:
    """Leave Lightning's advertisements, internal notes and dependency warnings out of the console."""
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _DropMessages) for f in rank_zero.filters):
        rank_zero.addFilter(_DropMessages())
    for message in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
