"""The batch prefetcher: order, consumed-position state, errors, limits and closing."""

import threading
import time

import jax
import numpy as np
import pytest

from fada_jax.data import pipeline
from fada_jax.errors import UserError
from fada_jax.train import parallel
from fada_jax.train.prefetch import Prefetcher


class _Counting:
  """An input stream: batch k holds k; its state is the next k; may fail at one k."""

  def __init__(self, start=0, fail_at=None):
    self.next_step = start
    self.fail_at = fail_at
    self.closed = False
    self.reader_threads = set()

  def __next__(self):
    self.reader_threads.add(threading.get_ident())
    if self.next_step == self.fail_at:
      raise UserError(f'corrupt.png (step {self.next_step}) is not an image')
    batch = {'image': np.full((4, 2, 2, 3), self.next_step, np.uint8)}
    self.next_step += 1
    return batch

  def get_state(self):
    return {'step': self.next_step}

  def close(self):
    self.closed = True


def _wait_until(condition, seconds=10.0):
  deadline = time.monotonic() + seconds
  while not condition():
    assert time.monotonic() < deadline, 'timed out'
    time.sleep(0.01)


def test_order_and_the_state_of_the_consumed_batch_while_reading_ahead():
  mesh = parallel.make_mesh()
  source = _Counting(start=5)
  batches = Prefetcher(source, lambda b: parallel.shard_batch(b, mesh), depth=2)
  assert batches.get_state() == {'step': 5}
  for expected in range(5, 9):
    batch = next(batches)
    assert isinstance(batch['image'], jax.Array)
    assert batch['image'].sharding == parallel.batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(batch['image']), expected)
    # The thread reads ahead (two queued, one waiting), the state stays at the consumer.
    _wait_until(lambda e=expected: source.next_step >= e + 3)
    assert batches.get_state() == {'step': expected + 1}
  assert threading.get_ident() not in source.reader_threads
  batches.close()
  assert source.closed


def test_limit_reads_no_batch_past_it():
  source = _Counting()
  batches = Prefetcher(source, lambda b: b, depth=2, limit=3)
  assert [int(b['image'][0, 0, 0, 0]) for b in batches] == [0, 1, 2]
  assert source.next_step == 3 and batches.get_state() == {'step': 3}
  with pytest.raises(StopIteration):
    next(batches)
  batches.close()


def test_an_error_in_the_thread_is_raised_at_its_batch_as_the_same_error():
  source = _Counting(fail_at=2)
  batches = Prefetcher(source, lambda b: b, depth=2)
  next(batches), next(batches)
  with pytest.raises(UserError, match=r'^corrupt.png \(step 2\) is not an image$'):
    next(batches)
  assert batches.get_state() == {'step': 2}  # what the failed step would have resumed at
  with pytest.raises(StopIteration):
    next(batches)
  batches.close()
  assert source.closed


def test_a_grain_pipeline_error_reaches_the_consumer_as_the_one_line_error():
  def make_batch(step):
    if step == 3:
      raise UserError('gta5/images/00003.png is truncated')
    return {'image': np.full((4, 2, 2, 3), step, np.uint8)}

  iterator = pipeline.BatchIterator(make_batch, start_step=1, workers=0)
  batches = Prefetcher(iterator, lambda b: b, depth=2)
  assert int(next(batches)['image'].max()) == 1
  assert int(next(batches)['image'].max()) == 2
  with pytest.raises(UserError, match='^gta5/images/00003.png is truncated$'):
    next(batches)
  batches.close()


def test_close_while_the_queue_is_full_returns_at_once_and_stops_the_thread():
  source = _Counting()
  batches = Prefetcher(source, lambda b: b, depth=2)
  _wait_until(lambda: source.next_step >= 3)  # two queued, the third waiting for room
  time.sleep(0.1)
  start = time.monotonic()
  batches.close()
  assert time.monotonic() - start < 5.0
  assert not batches._thread.is_alive()  # pylint: disable=protected-access
  assert source.closed
  read = source.next_step
  time.sleep(0.2)
  assert source.next_step == read  # nothing is read after close
  with pytest.raises(StopIteration):
    next(batches)
