"""What ``fit`` says while it trains: its messages, and with ``progress=True`` a bar and each epoch's metrics.

Without ``progress`` the messages (resumed from where, the gradient check's
worst error, nothing to do) go to the ``"purebp.train.fit"`` logger at INFO
level, as before. ``progress=True`` prints them, shows a ``tqdm`` bar over the
epochs (the ``cli`` extra; quiet when stderr is not a terminal) and one line of
metrics per epoch; without tqdm it prints the lines alone.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any


def epoch_line(row: dict[str, Any]) -> str:
    """E.g. "epoch 3: step 18, train_loss 0.4123, eval_loss 0.4410, eval_accuracy 88.50%, 0.8 s"."""
    parts = [f"step {row['step']}"]
    for name, value in row.items():
        if name in ("epoch", "step", "time") or not isinstance(value, float):
            continue
        parts.append(f"{name} {100 * value:.2f}%" if name.endswith("accuracy") else f"{name} {value:.4f}")
    return f"epoch {row['epoch']}: " + ", ".join(parts) + f", {row['time']:.1f} s"


class Reporter:
    """Where ``fit``'s messages and epoch rows go. ``close()`` ends the bar."""

    def __init__(self, say: Callable[[str], None], epochs: Callable[[dict], None] | None = None, close=None):
        self.say, self._epochs, self._close = say, epochs, close

    def epoch(self, row: dict[str, Any]) -> None:
        if self._epochs is not None:
            self._epochs(row)

    def close(self) -> None:
        if self._close is not None:
            self._close()


def reporter(progress: object, total_epochs: int, log: Callable[[str], None] | None = None) -> Reporter:
    """The ``Reporter`` for ``fit(progress=...)``; ``log`` (deprecated) receives the messages when given."""
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    if log is not None and not callable(log):
        raise TypeError(f"log must be a callable taking a message, got {type(log).__name__}")
    if not progress:
        return Reporter(log if log is not None else logging.getLogger("purebp.train.fit").info)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the cli extra is not installed: one printed line per epoch
        return Reporter(log or print, lambda row: print(epoch_line(row)))
    bar = tqdm(total=total_epochs, unit="epoch", disable=not sys.stderr.isatty(), delay=1.0, dynamic_ncols=True)

    def epoch(row: dict[str, Any]) -> None:
        postfix = {"loss": f"{row['train_loss']:.4f}"}
        if "eval_accuracy" in row:
            postfix["test_acc"] = f"{100 * row['eval_accuracy']:.2f}%"
        bar.set_postfix(postfix, refresh=False)
        bar.update(row["epoch"] + 1 - bar.n)
        tqdm.write(epoch_line(row))

    return Reporter(log or tqdm.write, epoch, bar.close)
