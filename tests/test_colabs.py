"""Every notebook in colabs/ runs top to bottom against the installed package (install cells skipped)."""

import json
import pathlib
import subprocess
import sys

import pytest

COLABS = sorted((pathlib.Path(__file__).parent.parent / "colabs").glob("*.ipynb"))


@pytest.mark.parametrize("path", COLABS, ids=lambda p: p.stem)
def test_colab_runs(path, tmp_path):
  cells = json.loads(path.read_text())["cells"]
  for cell in cells:
    if cell["cell_type"] == "code":
      assert not cell.get("outputs"), f"{path.name}: outputs must be cleared in git"
  code = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
  code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("!", "%")))
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  if path.stem == "hf_convert":
    assert "byte-identical: True" in r.stdout
  if path.stem == "quickstart":
    assert "second document unaffected by the first: True" in r.stdout
