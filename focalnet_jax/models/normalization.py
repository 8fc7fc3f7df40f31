"""BatchNorm in the two modes the models support.

- ``'batch'``: with ``train=True`` the statistics of the current batch normalise the activations and
  update the running averages (``batch_stats`` collection, pass ``mutable=['batch_stats']``). When
  ``axis_name`` is given the mean and variance are reduced over that named axis, so under
  ``jax.shard_map``/``jax.vmap`` with that axis the statistics are those of the global batch
  (sync-BN). With ``train=False`` the running averages are used.
- ``'frozen'``: the running averages are always used and never updated, also with ``train=True``
  (the usual choice when fine-tuning from ImageNet statistics with small batches). The affine
  ``scale``/``bias`` stay ordinary parameters.

Hyper-parameters follow torchvision (``eps=1e-5``, running-average momentum 0.1, i.e. Flax
``momentum=0.9``), so converted torchvision weights give the same outputs. One difference in
training: the running variance averages the batch's biased variance (Flax's rule), torch's the
unbiased one, n / (n - 1) of it, with n the values a channel has in the global batch (B x H x W;
the batch size B in DeepLab-v3's image-pooling branch, e.g. 16 / 15 at batch 16).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

NORMS = ("batch", "frozen")


def check_norm(norm: str) -> None:
    """Raises ``ValueError`` unless ``norm`` is one of :data:`NORMS`."""
    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")


def batch_norm(
    norm: str, *, train: bool, axis_name: str | None, dtype: Any, name: str
) -> nn.BatchNorm:
    """A ``flax.linen.BatchNorm`` over the channel (last) axis configured for ``norm``.

    Must be called inside a ``@nn.compact`` method; the module is registered under ``name``.
    """
    check_norm(norm)
    use_running_average = norm == "frozen" or not train
    return nn.BatchNorm(
        use_running_average=use_running_average,
        momentum=0.9,
        epsilon=1e-5,
        # The named axis is only bound while training under shard_map/vmap; evaluation with the
        # running averages must not reference it.
        axis_name=None if use_running_average else axis_name,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )
