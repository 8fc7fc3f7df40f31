"""Evaluation (paper sections II-E2 to II-E5; docs/evaluation.md) and inference.

Modules: `predictions` (the `<case_id>.npz` contract), `localization` (2D local maxima),
`matching` (5 mm hit rule, per-case reduction), `froc`, `roc` (GS ROC), `picai` (PI-CAI metrics
through picai_eval), `stats` (fold statistics, Welch + Bonferroni), `report` (metrics.json,
report.md), `figures`, `evaluate` (`focalnet evaluate`), `summary` (`focalnet summarize`),
`inference` (batched jit prediction), `predict` (`focalnet predict`). See docs/evaluation.md.
"""
