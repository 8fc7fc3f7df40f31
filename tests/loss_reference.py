"""An independent NumPy reference of the losses (float64, explicit loops): Cao et al. 2019, eqs.
(1)-(3), and the baselines; `LN2` for hand values."""

import math

import numpy as np

LN2 = math.log(2.0)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def ref_ordinal_focal(logits, targets, alpha, gamma, pool_size, valid=None):
    """Eq. (2) per pixel over the valid bits, a pool_size^2 max filter, then eq. (1), mean."""
    x, y = np.asarray(logits, np.float64), np.asarray(targets, np.float64)
    v = np.ones_like(y) if valid is None else np.asarray(valid, np.float64)
    p = _sigmoid(x)
    batch, height, width, channels = x.shape
    q = np.zeros((batch, height, width))
    for b, h, w in np.ndindex(batch, height, width):
        margins = [
            y[b, h, w, j] * (1 - p[b, h, w, j]) ** gamma
            + (1 - y[b, h, w, j]) * p[b, h, w, j] ** gamma
            for j in range(channels)
            if v[b, h, w, j]
        ]
        q[b, h, w] = max(margins, default=0.0)  # eq. (2)
    r = pool_size // 2
    total = 0.0
    for b, h, w in np.ndindex(batch, height, width):
        pooled = q[b, max(h - r, 0) : h + r + 1, max(w - r, 0) : w + r + 1].max()
        ce = sum(
            v[b, h, w, j]
            * (
                -alpha * y[b, h, w, j] * math.log(p[b, h, w, j])
                - (1 - alpha) * (1 - y[b, h, w, j]) * math.log(1 - p[b, h, w, j])
            )
            for j in range(channels)
        )
        total += pooled * ce  # eq. (1)
    return total / (batch * height * width)


def ref_bce(logits, targets):
    p, y = _sigmoid(np.float64(logits)), np.float64(targets)
    return np.mean(np.sum(-y * np.log(p) - (1 - y) * np.log(1 - p), -1))


def ref_focal(logits, targets, alpha, gamma):
    p, y = _sigmoid(np.float64(logits)), np.float64(targets)
    pt = np.where(y == 1, p, 1 - p)
    at = np.where(y == 1, alpha, 1 - alpha)
    return np.mean(np.sum(-at * (1 - pt) ** gamma * np.log(pt), -1))


def ref_softmax_ce(logits, targets):
    z = np.float64(logits)
    log_softmax = z - np.log(np.sum(np.exp(z), -1, keepdims=True))
    return np.mean(-np.sum(np.float64(targets) * log_softmax, -1))


def ref_dice(logits, targets, eps, softmax=False):
    z = np.float64(logits)
    p = np.exp(z) / np.sum(np.exp(z), -1, keepdims=True) if softmax else _sigmoid(z)
    y = np.float64(targets)
    dice = (2 * np.sum(p * y, (1, 2)) + eps) / (np.sum(p + y, (1, 2)) + eps)
    return 1 - np.mean(dice)


def ref_mfl(full, subsets, targets):
    """Eq. (3) with a Python loop over subsets and slices."""
    batch, height, width, _ = full.shape
    chosen, best = [], []
    for b in range(batch):
        d = [np.sum((targets[b] * (full[b] - s[b])) ** 2) for s in subsets]
        chosen.append(int(np.argmin(d)))
        best.append(min(d))
    return np.mean(best) / (height * width), chosen
