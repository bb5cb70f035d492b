"""The one progress bar: `explaining done/total [####  ] rate samples/s, ETA h:mm:ss` on
stderr, redrawn in place. explain(..., progress=True) and explain_dataset both draw it."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator


class Progress:
    """A one-line bar on stderr with samples/s and the time left; silent unless enabled
    (explain_dataset enables it on rank 0 only). Redrawn at most every `every` seconds,
    and always when the last sample is done."""

    def __init__(self, total: int, enabled: bool, prefix: str = "",
                 every: float = 0.5) -> None:
        self.total, self.enabled, self.prefix, self.every = total, enabled, prefix, every
        self.done = 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.every or self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            filled = "#" * int(30 * self.done / self.total)
            print(f"\r{self.prefix}explaining {self.done}/{self.total} [{filled:<30}] "
                  f"{rate:.1f} samples/s, ETA {_clock(eta)}", end="", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self.enabled and self.done:
            print(file=sys.stderr, flush=True)


def batches(total: int, batch_size: int, show: bool) -> Iterator[int]:
    """The start of each batch, range(0, total, batch_size), counted on a Progress bar as
    each batch is done (when the caller asks for the next one)."""
    bar = Progress(total, show)
    try:
        for lo in range(0, total, batch_size):
            yield lo
            bar.update(min(lo + batch_size, total) - lo)
    finally:
        bar.close()


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
