"""benchmarks/gpu_check.sh (issue 31, item 5), checked without a GPU: its syntax, the dry run that
lists the stages, and the clear refusal (exit 3, one stderr line) when no GPU can be used.

The script itself needs an NVIDIA GPU; docs/GPU.md says it has not been run on one yet.
"""
from __future__ import annotations

import json
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
STAGES = ["install", "devices", "gpu_tests", "train_bench", "slice_preprocess", "slice_train"]


def _run(args, env_update, tmp_path, drop=()):
    env = {k: v for k, v in os.environ.items() if k not in drop and k != "OUT"}
    env.update(env_update)
    return subprocess.run(["bash", SCRIPT, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)


def test_bash_syntax():
    proc = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_dry_run_lists_the_stages_and_runs_nothing(tmp_path):
    out = tmp_path / "out dir"  # a space: every path is quoted in the stage commands
    proc = _run(["--dry-run", "--out", str(out)], {"CUDA_VISIBLE_DEVICES": ""}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    stages = re.findall(r"^stage (\w+) \(timeout (\d+)s\): (.*)$", proc.stdout, re.M)
    assert [s[0] for s in stages] == STAGES
    assert lines[-1].startswith("stage report: ")
    budget = int(re.search(r"budget (\d+)s", lines[0]).group(1))
    assert budget < 8 * 60  # the whole check fits in 8 minutes
    cmds = {name: cmd for name, _, cmd in stages}
    assert "tensorflow[and-cuda]==2.20.*" in cmds["install"]  # setup.py's "gpu" extra
    assert "tests/test_gpu_path.py" in cmds["gpu_tests"]
    assert "--sections training" in cmds["train_bench"]
    for name in ("slice_preprocess", "slice_train"):
        assert "configs/synthetic-1m.yaml" in cmds[name]
        assert "data.synthetic.num_items=1000000" in cmds[name]
        assert "data.synthetic.num_events=100000" in cmds[name]
        assert "train.require_gpu=true" in cmds[name]
    assert "out\\ dir" in cmds["train_bench"]
    assert not out.exists()  # a dry run writes nothing


def test_dry_run_takes_the_output_folder_from_OUT(tmp_path):
    proc = _run(["--dry-run"], {"OUT": str(tmp_path / "o")}, tmp_path)
    assert proc.returncode == 0 and f"output folder {tmp_path / 'o'};" in proc.stdout


def _refused(proc, out, reason):
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no GPU: ") and reason in lines[0]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["status"] == "refused" and reason in report["reason"]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json"]  # nothing else ran


def test_refuses_when_cuda_visible_devices_hides_every_gpu(tmp_path):
    out = tmp_path / "out"
    proc = _run(["--out", str(out)], {"CUDA_VISIBLE_DEVICES": ""}, tmp_path)
    _refused(proc, out, "CUDA_VISIBLE_DEVICES='' hides every GPU")


def test_refuses_without_nvidia_smi(tmp_path):
    out = tmp_path / "out"
    proc = _run(["--out", str(out)], {"GPU_CHECK_NVIDIA_SMI": str(tmp_path / "no-such-smi")},
                tmp_path, drop=("CUDA_VISIBLE_DEVICES",))
    _refused(proc, out, "not found (no NVIDIA driver on this machine)")


def test_refuses_when_nvidia_smi_lists_no_gpu(tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc = _run(["--out", str(out)], {"GPU_CHECK_NVIDIA_SMI": str(fake)}, tmp_path,
                drop=("CUDA_VISIBLE_DEVICES",))
    _refused(proc, out, "-L lists no GPU")


def test_unknown_flag(tmp_path):
    proc = _run(["--fast"], {}, tmp_path)
    assert proc.returncode == 2 and "unknown flag --fast" in proc.stderr
