"""Studies: arms x repeats x folds of ordinary training runs, their ensembles and statistics.

Modules, one concept each:

- `spec`: the study spec (an ml_collections file in `configs/studies/`), its validation and the
  per-cell training overrides (the seed rule lives here); `slurm_options`: the forms of its SLURM
  options; `errors`: `StudyError`;
- `cells`: the cells of a study folder and their state (pending, running, done,
  failed, interrupted);
- `cell_runner`: `focalnet study cell`, one cell = `focalnet train` + `focalnet evaluate`;
- `attempts`: a cell's time over all its attempts (failed, killed, requeued, resumed);
- `local`, `slurm`: the executors (processes on this machine; one `sbatch` job array);
- `ensembles`: averaged predictions of several arms, evaluated like a cell;
- `statistics`: permutation test (picai_eval), Welch's t-test, Bonferroni;
- `convergence`: whether each run's validation loss reached a plateau;
- `report`, `figures`: `DIR/report/` (runs.csv, stats.csv, report.md, PNGs);
- `commands`: the `focalnet study` argument declarations and dispatch;
- `synthetic`: the one-command synthetic MFL study (docs/studies.md).
"""
