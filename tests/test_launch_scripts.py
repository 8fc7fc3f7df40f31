"""The scripts in launch/ call `focalnet` with flags it declares, and the two that run without a
cluster (one host; a SLURM array task, run here as its batch script) reach `focalnet train` with
their fold and compilation cache. launch/local_cpu_processes.sh refuses bad counts and passes a
SIGTERM on to its processes (its start-up runs in tests/test_train_input_pipeline.py); a SLURM
array task's batch script stops at a step on a SIGTERM for the batch shell and resumes when run
again, and the SLURM scripts append to their output. `make clean` removes the demo folder named."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from focalnet_jax.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "launch").glob("*.sh"))
CALL = re.compile(r"python -m focalnet_jax\.cli (\w+)((?:[^\n]*\\\n)*[^\n]*)")


def _declared_flags(command: str) -> set[str]:
    subparsers = next(a for a in build_parser()._actions if a.choices and command in a.choices)
    return {
        flag for action in subparsers.choices[command]._actions for flag in action.option_strings
    }


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launch_scripts_parse_and_pass_only_declared_flags(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    calls = CALL.findall(script.read_text())
    assert calls, f"{script.name} calls no focalnet command"
    for command, rest in calls:
        used = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", rest))
        assert used <= _declared_flags(command), (script.name, used - _declared_flags(command))


def _run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(REPO), **env}
    environ["PATH"] = f"{os.path.dirname(sys.executable)}:{environ['PATH']}"
    environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    command = ["bash", str(REPO / "launch" / script), *args]
    return subprocess.run(
        command, env=environ, cwd=REPO, capture_output=True, text=True, timeout=120
    )


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("focalnet train: error: "), done.stderr[-2000:]
    return last


def test_slurm_folds_task_trains_its_array_index_with_the_arrays_cache(tmp_path):
    """Task 3 of the array sets data.fold=3 (`--fold`), refused against 2 folds; a task's cache is
    the array's WORKDIR/compilation_cache (logged before the absent store is refused). Nothing is
    written."""
    workdir, store = tmp_path / "cv", tmp_path / "absent"
    env = {"CONFIG": "configs/demo.py", "WORKDIR": str(workdir)}
    args = [f"--config.data.store={store}", "--config.data.num_folds=2"]
    done = _run("slurm_folds.sh", *args, **env, SLURM_ARRAY_TASK_ID="3")
    assert (
        _one_line_error(done) == "focalnet train: error: data.fold=3 not in [0, data.num_folds=2)"
    )
    done = _run("slurm_folds.sh", *args, **env, SLURM_ARRAY_TASK_ID="1")
    assert _one_line_error(done) == f"focalnet train: error: store {store} does not exist"
    assert f"compilation cache: {workdir / 'compilation_cache'}" in done.stderr
    assert not workdir.exists()


def test_slurm_folds_outside_a_job_array_says_how_to_submit_it(tmp_path):
    """Run outside a job array (no SLURM_ARRAY_TASK_ID: `bash launch/slurm_folds.sh`), the script
    failed with bash's `SLURM_ARRAY_TASK_ID: unbound variable`; nothing is written."""
    workdir = tmp_path / "cv"
    environ = {k: v for k, v in os.environ.items() if k != "SLURM_ARRAY_TASK_ID"}
    script = REPO / "launch" / "slurm_folds.sh"
    done = subprocess.run(
        ["bash", str(script), "--config.data.num_folds=2"],
        env={**environ, "CONFIG": "configs/demo.py", "WORKDIR": str(workdir)},
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"{script}: SLURM_ARRAY_TASK_ID is not set (task k of a SLURM job array trains fold k); "
        "submit it as an array: CONFIG=... WORKDIR=... sbatch --array=0-4 "
        f"{script} [--config.KEY=VALUE ...]"
    ]
    assert done.stdout == "" and not workdir.exists()


@pytest.mark.parametrize("given", ["absolute", "-run"])
def test_one_host_passes_config_workdir_and_overrides(tmp_path, given):
    # A WORKDIR starting with a dash (relative to the folder run in) was taken for a flag:
    # "argument --workdir: expected one argument".
    workdir, store = tmp_path / "run" if given == "absolute" else REPO / given, tmp_path / "absent"
    done = _run("one_host.sh", "configs/demo.py", str(workdir) if given == "absolute" else given,
                f"--config.data.store={store}")  # fmt: skip
    assert _one_line_error(done) == f"focalnet train: error: store {store} does not exist"
    cache = workdir / "compilation_cache" if given == "absolute" else f"{given}/compilation_cache"
    assert f"compilation cache: {cache}" in done.stderr
    assert not workdir.exists()


@pytest.mark.parametrize("counts", [("0", "1"), ("x", "1"), ("2", "0"), ("2", "2x")])
def test_local_cpu_processes_refuses_counts_that_are_not_positive_integers(tmp_path, counts):
    """N=0 started nothing and exited with status 0; N=x failed with `x: unbound variable`."""
    done = _run("local_cpu_processes.sh", *counts, "configs/demo.py", str(tmp_path / "run"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.splitlines() == [
        f"{REPO / 'launch' / 'local_cpu_processes.sh'}: N (processes) and D (devices per process) "
        f"must be positive integers, got N={counts[0]} D={counts[1]}"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("script", "args", "env", "expected"),
    [
        # bash's own `line 6: 2: workdir`, status 1; `3: config` where N and D were missing.
        ("one_host.sh", ["configs/demo.py"], {},
         "usage: {script} CONFIG WORKDIR [--config.KEY=VALUE ...]"),
        ("local_cpu_processes.sh", ["configs/demo.py", "runs/mh"], {},
         "usage: [PORT=P] {script} N D CONFIG WORKDIR [--config.KEY=VALUE ...] (N processes of D "
         "devices each)"),
        ("slurm_multinode.sh", [], {"CONFIG": "configs/demo.py"},
         "{script}: CONFIG and WORKDIR must be set: CONFIG=... WORKDIR=... sbatch {script} "
         "[--config.KEY=VALUE ...]"),
        ("slurm_folds.sh", [], {"WORKDIR": "runs/cv", "SLURM_ARRAY_TASK_ID": "0"},
         "{script}: CONFIG and WORKDIR must be set: CONFIG=... WORKDIR=... sbatch {script} "
         "[--config.KEY=VALUE ...]"),
    ],
)  # fmt: skip
def test_a_script_missing_an_argument_prints_its_usage(script, args, env, expected):
    environ = {k: v for k, v in os.environ.items() if k not in ("CONFIG", "WORKDIR")}
    path = REPO / "launch" / script
    done = subprocess.run(
        ["bash", str(path), *args], env={**environ, **env}, cwd=REPO, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert (done.returncode, done.stderr.splitlines()) == (2, [expected.format(script=path)])


# tests/test_train_sigterm.py's tiny run (no MFL), `STEPS` steps, each logged (the progress bar
# shows it).
# SIGTERM comes once the bar shows step 2 and must arrive before the last step (a SIGTERM then
# completes the run): 8 steps left under a second for it, 40 leave several.
STEPS = 40
TINY_RUN = [
    "--config.data.num_folds=2", "--config.data.slices=all", "--config.model.depth=18",
    "--config.model.width=0.125", "--config.model.output_stride=16",
    "--config.train.batch_size=4", "--config.train.checkpoint_every=1000",
    "--config.train.eval_every=0", "--config.train.log_every=1", f"--config.train.steps={STEPS}",
    "--config.loss.mfl=false",
]  # fmt: skip


def _until(condition, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what()
        time.sleep(0.2)


def _steps_shown(log: str) -> int:
    """The last step of the run the progress bar in `log` shows (0: none yet)."""
    return max(map(int, re.findall(rf"\b(\d+)/{STEPS}\b", log)), default=0)


def test_slurm_scripts_append_to_their_output():
    """A requeued job keeps why its earlier run ended (`stopped by SIGTERM at step N`): SLURM
    truncated the output file when the job started again."""
    for name in ("slurm_folds.sh", "slurm_multinode.sh"):
        assert "#SBATCH --open-mode=append" in (REPO / "launch" / name).read_text().splitlines()


def _signalled_at_step_2(
    argv: list[str], env: dict, log_file: Path, signum: int = signal.SIGTERM, group: bool = False
) -> tuple[int, str]:
    """Runs `argv` (a launch script) until its progress bar shows step 2, sends the script's
    process `signum` (`group`: its whole process group, as a terminal's Ctrl-C does), and returns
    its exit status and log; nothing of it is left running."""
    with open(log_file, "wb") as stderr:
        script = subprocess.Popen(
            argv, env=env, cwd=REPO, stdout=stderr, stderr=stderr, start_new_session=True
        )

    def log() -> str:
        return log_file.read_text(errors="replace")

    try:
        _until(lambda: _steps_shown(log()) >= 2 or script.poll() is not None,
               lambda: f"no step 2: {log()[-2000:]}")  # fmt: skip
        assert script.poll() is None, f"ended ({script.returncode}) before step 2: {log()[-2000:]}"
        if group:
            os.killpg(script.pid, signum)
        else:
            script.send_signal(signum)
        status = script.wait(timeout=180)
        _until(lambda: "checkpoints and TensorBoard logs" in log() or "stopped by" in log(),
               lambda: log()[-2000:], timeout=60)  # fmt: skip
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(script.pid, signal.SIGKILL)  # whatever is left of its processes
        script.wait()
    return status, log()


def test_a_slurm_folds_task_signalled_as_its_batch_shell_saves_its_step_and_resumes(tmp_path):
    """SIGTERM to the task's batch shell only (what `sbatch --signal=B:TERM@120` and `scancel
    --batch` send): the training stops at a step with its checkpoint, and the task run again (a
    requeue) resumes there. The script ran the training as a child of bash, which died of the
    signal and left it training on, to be killed by SLURM at the job's end."""
    from test_train_helpers import cpu_devices_env, small_synthetic_store

    from focalnet_jax.evaluation.ensemble import final_step

    store = small_synthetic_store(tmp_path / "data", cases=6, seed=3)
    workdir = tmp_path / "cv"
    env = cpu_devices_env(1, SLURM_ARRAY_TASK_ID="0")
    env.update(CONFIG="configs/focalnet.py", WORKDIR=str(workdir))
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{env['PATH']}"
    argv = ["bash", str(REPO / "launch" / "slurm_folds.sh"), f"--config.data.store={store}"]
    status, log = _signalled_at_step_2([*argv, *TINY_RUN], env, tmp_path / "first.log")
    stopped = re.findall(r"focalnet train: stopped by SIGTERM at step (\d+) in (\S+);", log)
    assert status == 143 and len(stopped) == 1, (status, log[-2000:])
    step = int(stopped[0][0])
    assert stopped[0][1] == str(workdir / "fold0") and 2 <= step < STEPS
    assert [p.name for p in (workdir / "fold0" / "checkpoints").iterdir()] == [str(step)]
    again = subprocess.run(
        [*argv, *TINY_RUN], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0 and f"start at {step}" in again.stderr, again.stderr[-2000:]
    assert final_step(workdir / "fold0") == (STEPS, "")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_local_cpu_processes_pass_a_sigterm_for_the_script_on_to_every_process(tmp_path, signum):
    """SIGTERM to the script alone, or Ctrl-C (SIGINT to its process group): both processes
    stop at the same step with its checkpoint and the script exits with their status, 143
    (untrapped, the script died of it and left them training: they ignore SIGINT, as background
    jobs of a script)."""
    from test_train_helpers import cpu_devices_env, small_synthetic_store

    store = small_synthetic_store(tmp_path / "data", cases=6, seed=3)
    workdir = tmp_path / "run"
    env = cpu_devices_env(1)
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{env['PATH']}"
    env.pop("PORT", None)
    argv = ["bash", str(REPO / "launch" / "local_cpu_processes.sh"), "2", "1"]
    argv += ["configs/focalnet.py", str(workdir), f"--config.data.store={store}", *TINY_RUN]
    group = signum == signal.SIGINT
    status, log = _signalled_at_step_2(argv, env, tmp_path / "script.log", signum, group)
    stopped = re.findall(r"focalnet train: stopped by SIGTERM at step (\d+) in (\S+);", log)
    assert status == 143 and len(stopped) == 2 and stopped[0] == stopped[1], (status, log[-2000:])
    step = int(stopped[0][0])
    assert stopped[0][1] == str(workdir) and 2 <= step < STEPS
    assert [p.name for p in (workdir / "checkpoints").iterdir()] == [str(step)]


def test_make_clean_removes_the_demo_folder_named_with_a_dollar_sign_and_no_other(tmp_path):
    """make expanded the `$x` of `make clean DEMO_DIR='d$x'` and deleted `d` instead."""
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    for folder in ("d$x", "d", ".venv"):
        (tmp_path / folder).mkdir()
    done = subprocess.run(["make", "-s", "clean", "DEMO_DIR=d$x"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Makefile", "d"]
