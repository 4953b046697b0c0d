"""``make gpu-check``: everything that needs a GPU, in one command, with a Markdown report.

    python scripts/gpu_check.py [--out gpu-check] [--quick]

On a machine with a CUDA device, in about 8 minutes at most (each step has a time limit):

1. every CUDA-marked test (``pytest -m cuda``);
2. ``benchmarks/codec_speed.py --device cuda`` at 25M and 100M elements: eta against the same
   run's device copy, and ms per 100M parameters (compress + decompress);
3. a 1-process NCCL DDP job with every compressor (``scripts/gpu_ddp_job.py``);
4. a 2-process job sharing the GPU over gloo, with CUDA tensors.

It writes ``<out>/report.md`` (and each step's raw output beside it) and exits non-zero if a
step failed. Without a CUDA device it says so, writes a report saying so, and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Step:
    """One step of the check: its command, time limit, and what came of it."""

    name: str
    command: list[str]
    limit_s: int
    status: str = "not run"
    seconds: float = 0.0
    tail: str = ""

    def run(self, out: Path) -> None:
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        start = time.monotonic()
        log = out / f"{self.name}.log"
        try:
            res = subprocess.run(
                self.command, cwd=ROOT, env=env, capture_output=True, text=True,
                timeout=self.limit_s,
            )  # fmt: skip
            text, self.status = (
                res.stdout + res.stderr,
                "pass" if res.returncode == 0 else (f"FAIL (exit {res.returncode})"),
            )
        except subprocess.TimeoutExpired as e:
            text = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(
                errors="replace"
            )
            self.status = f"TIMEOUT after {self.limit_s} s"
        self.seconds = time.monotonic() - start
        log.write_text(text)
        self.tail = "\n".join(text.strip().splitlines()[-15:])
        print(f"gpu-check: {self.name}: {self.status} in {self.seconds:.0f} s", flush=True)


def _machine() -> str:
    import torch

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return f"GPU {gpu}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}"


def _ddp_table(path: Path) -> list[str]:
    if not path.exists():
        return ["(no results written)"]
    data = json.loads(path.read_text())
    lines = ["| variant | ok | finite | ranks agree | step ms (median) |", "|---|---|---|---|---|"]
    for r in data["rows"]:
        ms = r.get("step_ms_median")
        lines.append(
            f"| `{r['variant']}` | {'yes' if r['ok'] else 'NO'} | {r.get('finite', '-')} | "
            f"{r.get('ranks_agree', '-')} | {'-' if ms is None else f'{ms:.2f}'} |"
            + (f" {r['error']}" if "error" in r else "")
        )
    return lines


def report(steps: list[Step], out: Path, machine: str) -> str:
    lines = ["# commhooks GPU check", "", machine, "", "| step | status | seconds |"]
    lines += ["|---|---|---|"] + [f"| {s.name} | {s.status} | {s.seconds:.0f} |" for s in steps]
    for s in steps:
        lines += ["", f"## {s.name}", "", f"`{' '.join(s.command)}`", ""]
        if s.name == "kernels" and (out / "kernels.md").exists():
            lines += [(out / "kernels.md").read_text()]
        elif s.name.startswith("ddp"):
            lines += _ddp_table(out / f"{s.name}.json")
        lines += ["", "```", s.tail, "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu-check")
    ap.add_argument("--quick", action="store_true", help="small sizes and one round")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch

    machine = _machine()
    if not torch.cuda.is_available():
        msg = f"gpu-check: no CUDA device here ({machine}); nothing to check, exiting 0"
        print(msg)
        (out / "report.md").write_text(f"# commhooks GPU check\n\n{msg}\n")
        return 0
    py = sys.executable
    sizes, reps = ("1M,4M", "1") if args.quick else ("25M,100M", "3")
    steps = [
        Step("cuda-tests", [py, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                            "tests"], 180),
        Step("kernels", [py, "benchmarks/codec_speed.py", "--device", "cuda", "--sizes", sizes,
                         "--reps", reps, "--markdown", str(out / "kernels.md"),
                         "--out", str(out / "kernels.json")], 240),
        Step("ddp-nccl-1", [py, "scripts/gpu_ddp_job.py", "--backend", "nccl", "--world", "1",
                            "--out", str(out / "ddp-nccl-1.json")], 90),
        Step("ddp-gloo-2", [py, "scripts/gpu_ddp_job.py", "--backend", "gloo", "--world", "2",
                            "--out", str(out / "ddp-gloo-2.json")], 120),
    ]  # fmt: skip
    for s in steps:
        s.run(out)
    (out / "report.md").write_text(report(steps, out, machine))
    print(f"gpu-check: report in {out / 'report.md'}")
    return 0 if all(s.status == "pass" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
