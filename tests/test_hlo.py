"""The compiled training steps hold no scatter, and runs ask XLA for deterministic kernels.

A scatter (the gradient of a gather, of select-and-scatter, of `.at[].set`) runs as
atomics on GPUs: its additions land in a varying order, so two runs, or a run and its
resume, drift apart bit by bit. Each stage's step is compiled here through
tools/benchmark.py's train mode (the path that measures the paper step) at a tiny size,
and its optimised HLO is searched for scatter ops.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from fada_jax import main as main_lib
from tiny_runs import REPO, TINY

sys.path.insert(0, str(REPO / "tools"))
import benchmark  # noqa: E402  (tools/ is not a package)

SCATTER_OPS = re.compile(r"\s((?:select-and-)?scatter)\(")


def scatter_ops(hlo_text: str) -> list[str]:
  """The scatter instructions of an HLO module's text (not names or metadata)."""
  return SCATTER_OPS.findall(hlo_text)


def test_scatter_ops_finds_scatters_and_skips_names():
  hlo = ("  %scatter.3 = f32[4,8]{1,0} scatter(%a, %i, %u), to_apply=%add, "
         'metadata={op_name="jit(step)/scatter-add"}\n'
         "  %x = f32[2] select-and-scatter(%p, %s, %z), window={size=3}\n"
         '  %y = f32[2] add(%p, %q), metadata={op_name="no_scatter(here)"}\n')
  assert scatter_ops(hlo) == ["scatter", "select-and-scatter"]


# Plain convolutions ("off") are what GPUs run. The CPU's matrix-product convolutions
# ("on") are checked on the cheaper stage-1 step: they rewrite the same convolutions in
# every stage, and stage 2 costs twice the compile time.
@pytest.mark.parametrize("stage,matmul_convs", [
    ("source_only", "off"), ("self_distill", "off"), ("adversarial", "off"),
    ("source_only", "on")])
def test_compiled_training_step_has_no_scatter(stage, matmul_convs, tmp_path, capsys):
  width, height = TINY["data.source_size"]
  hlo_path = tmp_path / "step.hlo"
  benchmark.main(["--mode=train", "--arch=resnet18", f"--width={TINY['model.width']}",
                  f"--stage={stage}", "--batch=8", f"--size={width}x{height}",
                  f"--matmul-convs={matmul_convs}", "--compile-only",
                  f"--dump-hlo={hlo_path}", "--json"])
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["stage"] == stage
  hlo = hlo_path.read_text()
  assert "ENTRY" in hlo
  assert scatter_ops(hlo) == []


USER_FLAGS = "--xla_force_host_platform_device_count=2"
DETERMINISTIC = "--xla_gpu_deterministic_ops=true"


@pytest.mark.parametrize("user_flags,arguments,expected", [
    (USER_FLAGS, [], f"{USER_FLAGS} {DETERMINISTIC}"),  # appended, the user's kept
    ("", [], DETERMINISTIC),
    (f"{USER_FLAGS} --xla_gpu_deterministic_ops=false", [],
     f"{USER_FLAGS} --xla_gpu_deterministic_ops=false"),  # the user's own choice wins
    (USER_FLAGS, ["--nodeterministic"], USER_FLAGS),
], ids=["appended", "alone", "user_choice_kept", "switched_off"])
def test_main_sets_gpu_determinism_in_xla_flags(user_flags, arguments, expected, tmp_path):
  env = dict(os.environ, XLA_FLAGS=user_flags, JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  # --mode=eval without --checkpoint stops with a one-line error once the run has started.
  run = subprocess.run(
      [sys.executable, "-m", "fada_jax.main", "--config=configs/demo.py", "--mode=eval",
       f"--workdir={tmp_path}", "--verbosity=0", *arguments],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 2, run.stderr[-2000:]
  assert "--checkpoint" in run.stderr.strip().splitlines()[-1]
  assert re.findall(r"XLA_FLAGS=(.*)", run.stderr) == [expected]


def test_cpu_backend_accepts_the_determinism_flag():
  # XLA aborts at start-up on a flag it does not know; this one must start on CPU too.
  flags = main_lib.with_gpu_determinism(USER_FLAGS)
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-c", "import jax; print(jax.device_count())"],
                       env=env, capture_output=True, text=True, timeout=120, check=False)
  assert run.returncode == 0 and run.stdout.split() == ["2"], run.stderr[-2000:]
