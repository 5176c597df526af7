"""Prefetching: the next batches are read and sent to the device while a step runs.

`Prefetcher(source, transfer)` iterates `transfer(next(source))`, computed `depth` items
ahead on a background thread (the training loop's `transfer` puts the host batch on the
mesh with the batch sharding, so the copy overlaps the running step).

Exact resume: `get_state()` is the source's state after the last item the caller
CONSUMED, not after the last one the thread read ahead, so a checkpoint records the
position the next step really starts from. An exception in the thread (a corrupt image's
UserError, say) is raised again, the same object, by the `next()` that reaches it.
`close()` stops the thread (also while it waits on a full queue) and closes the source.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

_ITEM, _END, _ERROR = 'item', 'end', 'error'
_POLL_SECONDS = 0.05  # how soon a waiting thread notices close()


class Prefetcher(Iterator):
  """`transfer(batch)` for each batch of `source`, `depth` ahead, with consumed state.

  `source` needs `__next__` and `get_state()` (and `close()`, if it has one, is called
  by ours). Position the source (set_state) before wrapping it: from then on only the
  thread touches it. `limit` stops after that many items, so the thread never reads
  batches the caller will not use.
  """

  def __init__(self, source, transfer: Callable[[Any], Any], depth: int = 2,
               limit: int | None = None):
    if depth < 1:
      raise ValueError(f'prefetch depth must be >= 1, got {depth}')
    self._source = source
    self._transfer = transfer
    self._limit = limit
    self._state = source.get_state()
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._finished = False
    self._closed = False
    self._thread = threading.Thread(target=self._produce, name='batch-prefetch', daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    """Blocks until there is room or close() is called; False when closed."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=_POLL_SECONDS)
        return True
      except queue.Full:
        continue
    return False

  def _produce(self) -> None:
    produced = 0
    try:
      while self._limit is None or produced < self._limit:
        if self._stop.is_set():
          return
        batch = next(self._source)
        state = self._source.get_state()
        if not self._put((_ITEM, (self._transfer(batch), state))):
          return
        produced += 1
      self._put((_END, None))
    except StopIteration:
      self._put((_END, None))
    except BaseException as error:  # pylint: disable=broad-except  (re-raised by __next__)
      self._put((_ERROR, error))

  def __next__(self):
    if self._finished or self._closed:
      raise StopIteration
    while True:
      try:
        kind, value = self._queue.get(timeout=_POLL_SECONDS)
        break
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          # Only close() from another thread ends the producer without a last message.
          self._finished = True
          raise StopIteration from None
    if kind == _ITEM:
      batch, self._state = value
      return batch
    self._finished = True
    if kind == _ERROR:
      raise value
    raise StopIteration

  def get_state(self) -> Any:
    """The source's state after the last consumed item (its state at start if none)."""
    return self._state

  def close(self, timeout: float = 60.0) -> None:
    """Stops the thread, drops the batches read ahead and closes the source.

    A thread still inside `next(source)` after `timeout` seconds is left to finish on
    its own (it is a daemon: it cannot keep the process alive), and the source is then
    not closed under it.
    """
    if self._closed:
      return
    self._closed = True
    self._stop.set()
    self._thread.join(timeout)
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    close = getattr(self._source, 'close', None)
    if close is not None and not self._thread.is_alive():
      close()

  def __enter__(self) -> 'Prefetcher':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
