"""The tutorial notebook runs top to bottom (its cells assert what they show), so it cannot rot."""
from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO


@pytest.mark.integration
def test_the_tutorial_runs_top_to_bottom(tmp_path):
  notebook = nbformat.read(REPO / "examples" / "tutorial.ipynb", as_version=4)
  NotebookClient(notebook, kernel_name="python3", timeout=600,
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  errors = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
  assert not errors
  assert (tmp_path / "runs" / "cvae" / "results.json").is_file()
  assert "| 4.00 | finished |" in "".join(o.get("text", "") for o in notebook.cells[-1].outputs)
