"""commhooks-launch and the thin scripts in launch/: the exact commands, and a real run."""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import re
import subprocess
import sys

import pytest

from commhooks.launch import cli, commands

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent


def _main(*args: str) -> tuple[int, str, str]:
    """``commhooks-launch args`` in this process (the console script itself runs in
    :func:`test_help_has_whole_sentences_and_defaults` and the launch tests): exit status,
    stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as e:
            code = e.code
    return int(code or 0), out.getvalue(), err.getvalue()


def _dry(*args: str) -> str:
    code, _, err = _main(*args)
    assert code == 0, err
    return err.strip()


def test_torchrun_single_and_multi_node() -> None:
    assert _dry("torchrun", "--nproc", "4", "--dry-run", "--", "t.py", "--x", "1") == (
        f"{BIN / 'torchrun'} --nproc_per_node=4 --standalone t.py --x 1"
    )
    multi = _dry("torchrun", "--nproc", "2", "--nnodes", "3", "--rdzv-endpoint", "n0:29400",
                 "--dry-run", "--", "t.py")  # fmt: skip
    assert multi == (
        f"{BIN / 'torchrun'} --nproc_per_node=2 --nnodes=3 --rdzv_backend=c10d "
        "--rdzv_endpoint=n0:29400 --rdzv_id=commhooks t.py"
    )


def test_horovodrun_and_mpirun_put_python_before_a_script() -> None:
    assert _dry("horovodrun", "--np", "2", "--controller", "mpi", "--dry-run", "--", "h.py") == (
        f"{BIN / 'horovodrun'} -np 2 --mpi {sys.executable} h.py"
    )
    root = " --allow-run-as-root" if os.geteuid() == 0 else ""
    line = _dry("mpirun", "--np", "3", "--hosts", "a:2,b:1", "--dry-run", "--", "m.py")
    assert line.endswith(f"-np 3{root} --oversubscribe -x PATH -H a:2,b:1 {sys.executable} m.py")


def test_shaped_dry_run_prints_one_rank_per_namespace() -> None:
    lines = _dry("shaped", "--n", "3", "--rate", "100mbit", "--dry-run", "--", "t.py").splitlines()
    assert lines[0] == "# 3 namespaces chk0..chk2, 100mbit, +0.0 ms"
    for i, line in enumerate(lines[1:]):
        assert line.startswith(f"ip netns exec chk{i} {BIN / 'torchrun'} --nnodes=3 ")
        assert f"--node_rank={i} --nproc_per_node=1 --master_addr=10.213.0.1" in line
        assert line.endswith(" t.py")


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: commands.torchrun(["t.py"], 0), "nproc"),
        (lambda: commands.torchrun(["t.py"], 2, nnodes=2), "rdzv_endpoint"),
        (lambda: commands.horovodrun(["t.py"], 2, controller="nccl"), "controller"),
        (lambda: commands.mpirun(["t.py"], -1), "np"),
    ],
)
def test_bad_arguments_name_the_field(call: object, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}="):
        call()  # type: ignore[operator]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
EX = ROOT / "examples"


def _launch(cmd: list[str], timeout: float = 400) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res


def _trained(stdout: str, compressor: str) -> tuple[float, float]:
    """The test accuracy and the compression ratio rank 0 printed (each exactly once)."""
    # horovodrun prefixes each line with the rank's stream, "[0]<stdout>:".
    prefix = r"^(?:\[\d+\]<stdout>:)?"
    acc = re.findall(
        rf"{prefix}compressor={re.escape(compressor)} test accuracy ([0-9.]+)%", stdout, re.M
    )
    ratio = re.findall(r"ratio ([0-9.]+)x", stdout)
    assert len(acc) == 1 and len(ratio) == 1, stdout
    return float(acc[0]), float(ratio[0])


def test_torchrun_mode_runs_an_example_with_its_options_through_the_thin_script() -> None:
    # The example's own options too (dense warm-up steps, the fp16 wrapper): this is the
    # example's torchrun run, so tests/examples does not launch it again.
    res = _launch(["bash", str(ROOT / "launch" / "torchrun.sh"), "--nproc", "2", "--",
                   str(EX / "ddp_train.py"), "--epochs", "1", "--compressor", "powersgd:rank=2",
                   "--start-iter", "3", "--wrapper", "fp16"])  # fmt: skip
    assert "--nproc_per_node=2 --standalone" in res.stderr
    acc, ratio = _trained(res.stdout, "powersgd:rank=2")
    # The 3 dense warm-up steps count in the whole run's ratio; the last step is compressed.
    assert acc > 50 and ratio > 2
    last = float(re.findall(r"\(last step ([0-9.]+)x\)", res.stdout)[0])
    assert last > 5


def test_mpirun_mode_runs_the_ddp_example() -> None:
    # The ranks find their rank and world through mpi4py (commhooks.mpi.init_from_launcher),
    # the start every example shares. examples/federated_clients.py is deliberately not run
    # here too: after that start its gloo group is the same as under torchrun, where
    # tests/examples runs it.
    res = _launch([str(BIN / "commhooks-launch"), "mpirun", "--np", "2", "--",
                   str(EX / "ddp_train.py"), "--epochs", "1", "--compressor", "sign"])  # fmt: skip
    assert " -np 2 " in res.stderr
    acc, ratio = _trained(res.stdout, "sign")
    assert acc > 50 and ratio > 10


def test_horovodrun_mode_runs_the_horovod_example_reproducibly() -> None:
    cmd = [str(BIN / "commhooks-launch"), "horovodrun", "--np", "2", "--",
           str(EX / "horovod_train.py"), "--epochs", "1", "--compressor", "sign"]  # fmt: skip
    first, second = (_launch(cmd).stdout for _ in range(2))
    acc, ratio = _trained(first, "sign")
    assert acc > 50 and ratio > 10
    line = [x for x in first.splitlines() if "test accuracy" in x]
    assert "last loss" in line[0]
    assert line == [x for x in second.splitlines() if "test accuracy" in x]


@pytest.mark.skipif(os.geteuid() != 0, reason="the shaped cluster needs root")
def test_shaped_mode_runs_an_example() -> None:
    res = _launch([str(BIN / "commhooks-launch"), "shaped", "--n", "2", "--rate", "200mbit", "--",
                   str(EX / "ddp_train.py"), "--epochs", "1", "--compressor", "sign"])  # fmt: skip
    acc, ratio = _trained(res.stdout, "sign")
    assert acc > 50 and ratio > 10


def test_help_has_whole_sentences_and_defaults() -> None:
    top = subprocess.run([str(BIN / "commhooks-launch"), "--help"], capture_output=True,
                         text=True, timeout=60, env=ENV)  # fmt: skip
    assert top.returncode == 0
    assert "mpirun, or on a bandwidth-shaped local cluster, printing the exact command" in " ".join(
        top.stdout.split()
    )
    for name, default in [("torchrun", "(default: 2)"), ("horovodrun", "(default: gloo)"),
                          ("mpirun", "(default: 2)"), ("shaped", "(default: 1800.0)")]:  # fmt: skip
        code, out, _ = _main(name, "--help")
        assert code == 0 and default in " ".join(out.split()), out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["torchrun", "--nproc", "0", "--", "t.py"], "nproc=0: must be an int >= 1"),
        (["torchrun", "--nnodes", "2", "--", "t.py"], "rdzv_endpoint=None: multi-node"),
        (["mpirun", "--np", "-1", "--", "t.py"], "np=-1"),
        (["shaped", "--n", "1", "--dry-run", "--", "t.py"], "n=1: must be an int in [2, 64]"),
        (["shaped", "--rate", "fast", "--dry-run", "--", "t.py"], "rate='fast'"),
        (["horovodrun", "--np", "2"], "give the training script after --"),
    ],
)
def test_bad_arguments_are_usage_errors(args: list[str], message: str) -> None:
    code, _, err = _main(*args)
    assert code == 2
    assert "Traceback" not in err
    assert err.startswith(f"usage: commhooks-launch {args[0]} "), err
    assert f"commhooks-launch {args[0]}: error: {message}" in err


@pytest.mark.parametrize("name", ["torchrun.sbatch", "horovod.sbatch"])
def test_slurm_templates_use_the_venv_job_id_and_gpus(name: str) -> None:
    path = ROOT / "launch" / "slurm" / name
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
    text = path.read_text()
    code = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert "#SBATCH" in text and any(ln.startswith("srun ") for ln in code)
    # Every Python the job runs is the venv's: no bare python on any command line.
    assert not [ln for ln in code if re.search(r"(^|[\s\"'])python3?([\s\"']|$)", ln)], code
    assert "${VENV:-" in text and "/bin/python" in text
    assert "$SLURM_JOB_ID" in text
    # GPUs are asked of srun and the submit line, and checked against the allocation.
    assert 'gpus=(--gpus-per-node="$GPUS_PER_NODE")' in text and '"${gpus[@]}"' in text
    assert "sbatch --gpus-per-node=$GPUS_PER_NODE" in text
    if name.startswith("torchrun"):
        assert "commhooks.launch.cli torchrun" in text and "--rdzv-endpoint" in text
        assert '--rdzv-id "$SLURM_JOB_ID"' in text and "nproc=$GPUS_PER_NODE" in text
        assert '--nproc "$nproc"' in text
