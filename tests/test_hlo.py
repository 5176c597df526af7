"""The compiled training steps hold no scatter.

A scatter (the gradient of a gather, of select-and-scatter, of `.at[].set`) runs as
atomics on GPUs: its additions land in a varying order, so two runs, or a run and its
resume, drift apart bit by bit. Each stage's step is compiled here through
tools/benchmark.py's train mode (the path that measures the paper step) at a tiny size,
and its optimised HLO is searched for scatter ops.
"""

import json
import re
import sys

import pytest

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


# Plain convolutions ("off") are what GPUs run; stage 2, the paper's step and the one
# with every loss, is also checked with the CPU's matrix-product convolutions.
@pytest.mark.parametrize("stage,matmul_convs", [
    ("source_only", "off"), ("self_distill", "off"), ("adversarial", "off"),
    ("adversarial", "on")])
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
