"""Host-side input pipeline: store rows -> per-process batches -> global arrays on device.

The store stays memory-mapped in host memory. The order of an epoch is a permutation drawn from
`numpy.random.default_rng((seed, epoch))`, and step s reads batch `s % steps_per_epoch` of epoch
`s // steps_per_epoch` (the incomplete last batch of an epoch is dropped), so the data of a step
depends only on (seed, step): a resumed run reads exactly what an uninterrupted one would.

Every process draws the same global order and loads only the rows of its own devices, turned into
one global array by `jax.make_array_from_process_local_data`. A background thread keeps
`prefetch` batches queued on device ahead of the step, and builds one more while the queue is
full: up to `prefetch + 1` batches on device besides the step's own.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from focalnet_jax.data.store import component_channels, t2w_lower_ratios
from focalnet_jax.errors import UserError
from focalnet_jax.training import sharding


def process_rows(mesh: Mesh, global_batch: int) -> tuple[int, int]:
    """[start, stop) of the global batch that this process's devices hold."""
    sharding.per_device_batch(global_batch, mesh)
    index_map = sharding.batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    spans = sorted((idx[0].start or 0, idx[0].stop or global_batch) for idx in index_map.values())
    for (_, stop), (start, _) in zip(spans, spans[1:], strict=False):
        if start != stop:
            raise ValueError(f"process {jax.process_index()}: its devices' rows are not contiguous")
    return spans[0][0], spans[-1][1]


class SliceReader:
    """Reads store rows as the arrays the step takes (`images` with the configured channels)."""

    def __init__(self, store, components: Sequence[str]):
        self.store = store
        self.channels = component_channels(store, components)
        self.lower_ratio = t2w_lower_ratios(store)

    def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """rows `[B]` (-1 = padding: zeros) -> images `[B,H,W,C]` float32 (T2w unclipped),
        classes int32, grade_known uint8 `[B,H,W]`, t2w_lower_ratio float32 `[B]`."""
        rows = np.asarray(rows, np.int64)
        real = rows >= 0
        order = np.unique(rows[real])  # ascending reads are fastest on a memmap
        where = np.searchsorted(order, rows[real])
        height, width = self.store.images.shape[1:3]
        images = np.zeros((len(rows), height, width, len(self.channels)), np.float32)
        classes = np.zeros((len(rows), height, width), np.int32)
        grade_known = np.ones((len(rows), height, width), np.uint8)
        if len(order):
            images[real] = np.asarray(self.store.images[order])[..., self.channels][where]
            classes[real] = np.asarray(self.store.classes[order])[where]
            grade_known[real] = np.asarray(self.store.grade_known[order])[where]
        ratio = np.zeros(len(rows), np.float32)
        ratio[real] = self.lower_ratio[rows[real]]
        return {
            "images": images,
            "classes": classes,
            "grade_known": grade_known,
            "t2w_lower_ratio": ratio,
        }


def check_t2w_ratios(store, rows: np.ndarray, intensity_range) -> None:
    """Refuses training rows of a case whose T2w air / bladder ratio r (`t2w_lower_ratios`) is
    `1 + intensity_range[0]` or more: moving its upper (bladder) threshold down by that much puts
    it at or below air, a T2w divisor s <= 0 (`augment.t2w_divisor`) that makes the slice black
    (s < 0) or NaN (s = 0). One line naming the first such case and its references."""
    ratios = t2w_lower_ratios(store)
    low = float(intensity_range[0])
    bad = np.zeros(len(ratios), bool)
    rows = np.asarray(rows, np.int64)
    bad[rows[ratios[rows] >= 1.0 + low]] = True
    cases = [r for r in store.cases if bad[r["start"] : r["stop"]].any()]
    if cases:
        first = cases[0]
        ref = first["t2w_reference"]
        raise UserError(
            f"store {store.path}: {len(cases)} training case(s) (first: {first['case_id']}, T2w "
            f"air {ref['air']:g}, bladder {ref['bladder']:g}) have air within {-low:.0%} of the "
            f"bladder, so augment.intensity_range {tuple(intensity_range)} moves the upper "
            "threshold to or below air (T2w black or NaN); check their T2w reference or narrow "
            "the range"
        )


def to_global(local: dict[str, np.ndarray], mesh: Mesh, global_batch: int) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over `data`."""
    target = sharding.batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(target, v, (global_batch, *v.shape[1:]))
        for k, v in local.items()
    }


class TrainBatches:
    """Training batches by step: deterministic in (seed, step), each process reading its share.
    `name`: what `rows` are, in the error when they fill no global batch."""

    def __init__(
        self,
        reader: SliceReader,
        rows: np.ndarray,
        global_batch: int,
        mesh: Mesh,
        *,
        seed: int,
        prefetch: int = 2,
        name: str = "the training split",
    ):
        self.reader, self.rows, self.mesh = reader, np.asarray(rows, np.int64), mesh
        self.global_batch, self.seed, self.prefetch = global_batch, seed, max(int(prefetch), 1)
        self.start, self.stop = process_rows(mesh, global_batch)
        self.steps_per_epoch = len(self.rows) // global_batch
        if self.steps_per_epoch == 0:
            raise UserError(
                f"{name} has {len(self.rows)} slices, fewer than one global batch of "
                f"train.batch_size={global_batch}"
            )

    @functools.lru_cache(maxsize=2)  # noqa: B019 - one permutation per epoch, not per step
    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(self.rows)

    def global_rows(self, step: int) -> np.ndarray:
        """Store rows of the whole global batch of `step`."""
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.global_batch
        return self.epoch_order(epoch)[start : start + self.global_batch]

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        return self.reader.read(self.global_rows(step)[self.start : self.stop])

    def device_batch(self, step: int) -> dict[str, jax.Array]:
        return to_global(self.local_batch(step), self.mesh, self.global_batch)

    def iterate(self, start_step: int, stop_step: int) -> Iterator[tuple[int, dict]]:
        """(step, device batch) for start_step <= step < stop_step, prefetched by a thread (up to
        `prefetch + 1` batches ahead on device: module docstring)."""
        slots: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stopping = threading.Event()

        def produce():
            try:
                for step in range(start_step, stop_step):
                    item = (step, self.device_batch(step))
                    while not stopping.is_set():
                        try:
                            slots.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stopping.is_set():
                        return
            except BaseException as error:  # re-raised in the consumer
                slots.put(error)

        thread = threading.Thread(target=produce, name="prefetch", daemon=True)
        thread.start()
        try:
            for _ in range(start_step, stop_step):
                item = slots.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stopping.set()
            thread.join(timeout=5)


def eval_batches(
    reader: SliceReader, rows: np.ndarray, global_batch: int, mesh: Mesh
) -> Iterator[dict[str, jax.Array]]:
    """Every row once, in order, padded to whole global batches: `SliceReader.read`'s arrays and
    `weight [B]` float32 (1 on a row, 0 on padding)."""
    start, stop = process_rows(mesh, global_batch)
    rows = np.asarray(rows, np.int64)
    padded = np.full(-(-len(rows) // global_batch) * global_batch, -1, np.int64)
    padded[: len(rows)] = rows
    for first in range(0, len(padded), global_batch):
        batch_rows = padded[first : first + global_batch]
        local_rows = batch_rows[start:stop]
        batch = {**reader.read(local_rows), "weight": (local_rows >= 0).astype(np.float32)}
        yield to_global(batch, mesh, global_batch)
