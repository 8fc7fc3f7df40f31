"""Evaluation (paper sections II-E2 to II-E5; docs/evaluation.md) and inference.

Modules: `predictions` (the `<case_id>.npz` contract), `localization` (2D local maxima),
`matching` (5 mm hit rule, per-case reduction), `froc`, `roc` (GS ROC), `picai` (PI-CAI metrics
through picai_eval), `stats` (fold statistics, Welch + Bonferroni), `report` (metrics.json,
report.md), `figures`, `evaluate` (`focalnet evaluate`), `summary` (`focalnet summarize`),
`inference` (batched jit prediction), `predict` (`focalnet predict` on one exam), `predict_command`
(the body of `focalnet predict`), `batch_predict` (`predict --layout`), `ensemble` (fold ensembles,
flip TTA), `detection_map` (PI-CAI detection maps), `run_predictions` (what `evaluate --workdir`
predicts), `flag_checks` (flag checks before any work). See docs/evaluation.md.
"""
