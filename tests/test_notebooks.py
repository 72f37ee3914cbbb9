"""Notebooks run headless: their code cells execute in order in quick mode."""

import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["train_step_by_step.ipynb", "lora_quickstart.ipynb",
                                  "soups_and_merging.ipynb", "sparse_finetuning.ipynb",
                                  "ot_fusion.ipynb"])
def test_notebook_runs(name, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("SCION_DATA_DIR", str(tmp_path / "data"))
    # Plots go to a non-interactive backend (plt.show() does nothing) with a throwaway cache.
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "matplotlib"))
    notebook = json.load(open(os.path.join(ROOT, "notebooks", name)))
    namespace = {"__name__": "__main__"}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{name}:{cell['id']}", "exec"), namespace)
    assert namespace["QUICK"] is True
