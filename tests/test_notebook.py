"""notebooks/transfer_colab.ipynb executed headless, so that it cannot silently rot, and kept equal to its jupytext
twin notebooks/transfer_colab.py (the reviewable source; regenerate the .ipynb with
``jupytext --to ipynb --update notebooks/transfer_colab.py``).

The notebook runs in a fresh IPython kernel of this interpreter (a kernel spec written to a temporary folder, so
neither a user's nor the system's ``python3`` kernel is picked up), with the repository on PYTHONPATH and as the
working directory, ``TRANSFER_NOTEBOOK_SMOKE=1`` (the tiny budget: a tiny random-init ViT, 32 px, a few steps) and
its runs in a temporary ``TRANSFER_NOTEBOOK_WORKDIR``. Every cell must run without error, and each part must
show what it is there for: the backend, the probe's table, the fine-tune's selected step and eval metrics, the two
figures, the trainable counts under three rule lists, the sweep's checked points.
"""
import ast
import json
import os
import re
import sys

import pytest

from conftest import ROOT

NOTEBOOK = os.path.join(ROOT, "notebooks", "transfer_colab.ipynb")
SOURCE = os.path.join(ROOT, "notebooks", "transfer_colab.py")
CELL_TIMEOUT = 300   # seconds per cell; the whole notebook takes well under a minute on 2 idle cores


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """(the executed notebook, its workdir)."""
  import nbformat
  from ipykernel.kernelspec import write_kernel_spec
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager
  from nbclient import NotebookClient

  kernels = tmp_path_factory.mktemp("kernels")
  write_kernel_spec(str(kernels / "transfer-test"))   # argv: sys.executable -m ipykernel_launcher -f {connection}
  with open(kernels / "transfer-test" / "kernel.json") as f:
    assert json.load(f)["argv"][0] == sys.executable
  workdir = str(tmp_path_factory.mktemp("notebook_runs"))
  env = {**os.environ, "TRANSFER_NOTEBOOK_SMOKE": "1", "TRANSFER_NOTEBOOK_WORKDIR": workdir,
         "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
         "IPYTHONDIR": str(tmp_path_factory.mktemp("ipython"))}
  env.pop("MPLBACKEND", None)   # ipykernel's inline backend: figures become image/png outputs
  nb = nbformat.read(NOTEBOOK, as_version=4)
  km = KernelManager(kernel_name="transfer-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
  client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, resources={"metadata": {"path": ROOT}})
  try:
    client.execute(env=env, cleanup_kc=True)   # raises CellExecutionError, with the cell and traceback, on error
  finally:
    if km.has_kernel:
      km.shutdown_kernel(now=True)
  return nb, workdir


def _cell(nb, marker: str):
  """(stdout text, output MIME types) of the one code cell whose source contains ``marker``."""
  cells = [c for c in nb.cells if c.cell_type == "code" and marker in c.source]
  assert len(cells) == 1, f"{len(cells)} code cells contain {marker!r}"
  text = "".join(o.text for o in cells[0].outputs if o.output_type == "stream" and o.name == "stdout")
  mimes = [m for o in cells[0].outputs if o.output_type in ("display_data", "execute_result") for m in o.data]
  return text, mimes


def test_ipynb_equals_its_jupytext_twin_and_has_no_outputs():
  import jupytext
  import nbformat
  twin, notebook = jupytext.read(SOURCE), jupytext.read(NOTEBOOK)
  cells = lambda nb: [(c.cell_type, c.source) for c in nb.cells]
  assert cells(notebook) == cells(twin), (
      "notebooks/transfer_colab.ipynb differs from notebooks/transfer_colab.py: regenerate it with "
      "`jupytext --to ipynb --update notebooks/transfer_colab.py`")
  assert sum(t == "code" for t, _ in cells(twin)) >= 9
  raw = nbformat.read(NOTEBOOK, as_version=4)   # commit-ready: outputs stripped
  assert all(not c.outputs and c.execution_count is None for c in raw.cells if c.cell_type == "code")
  assert raw.metadata.kernelspec.name == "python3" and raw.metadata.accelerator == "TPU"


def test_notebook_runs_headless_on_cpu_and_reports_the_backend(executed):
  nb, _ = executed
  assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
  text, _ = _cell(nb, "jax.default_backend()")
  assert "backend cpu: CPU: " in text and f"python {sys.executable}" in text, text
  text, _ = _cell(nb, "TRANSFER_NOTEBOOK_SMOKE")
  assert text.startswith("SMOKE (tiny budget)"), text
  text, _ = _cell(nb, "transfer.load_pretrained(")
  assert re.search(r"ImageClassifier: [\d,]+ parameters .* ImageNet head \(1280, 1000\)", text), text


def test_probe_prints_its_table(executed):
  nb, _ = executed
  text, _ = _cell(nb, "probe.main(")
  assert re.search(r"^method\s+setting\s+accuracy\s+time$", text, re.M), text
  for method in ("ridge", "logistic", "1-shot", "kNN"):
    row = re.search(rf"^{method}\s.*\s\s(\d\.\d{{3}})( \+- \d\.\d{{3}})?\s+(\(same\)|\d+\.\d s)$", text, re.M)
    assert row and 0 <= float(row.group(1)) <= 1, (method, text)


def test_finetune_selects_on_validation_and_the_figures_are_drawn(executed):
  nb, workdir = executed
  text, _ = _cell(nb, "train.train(config, RUN_DIR)")
  shown = ast.literal_eval(text.split("results.json:", 1)[1].strip())
  with open(os.path.join(workdir, "finetune_smoke", "results.json")) as f:
    results = json.load(f)   # the run went to the temporary workdir
  assert results["step"] == 6 and results["selected_step"] in (3, 6), results
  # Counted over the 360 eval images once: a whole number of them (6 steps of a random ViT learn nothing to hold
  # it to; the confusion matrix below must give the same figure).
  assert results["eval/accuracy"] * 360 == pytest.approx(round(results["eval/accuracy"] * 360), abs=1e-6), results
  assert "val/accuracy" in results, results
  assert shown["selected_step"] == results["selected_step"]
  assert shown["eval/accuracy"] == round(results["eval/accuracy"], 4)
  _, mimes = _cell(nb, "metrics.read(RUN_DIR)")
  assert "image/png" in mimes, mimes   # the learning curve
  text, mimes = _cell(nb, "predict.predict(")
  assert "image/png" in mimes, mimes   # the confusion matrix
  counted = re.search(r"confusion matrix of 360 eval images at step (\d+): accuracy (\S+) \(results.json "
                      r"eval/accuracy (\S+)\)", text)
  assert counted, text
  assert int(counted.group(1)) == results["selected_step"] and counted.group(2) == counted.group(3), text


def test_rules_change_what_trains_and_the_sweep_dry_run_lists_its_points(executed):
  nb, workdir = executed
  text, _ = _cell(nb, "optim.param_specs(")
  counts = {name: int(n.replace(",", "")) for name, n in re.findall(r"^(.+): ([\d,]+) trainable parameters$", text,
                                                                      re.M)}
  # EfficientNet-Lite0 with a 10-class head (the README's table): everything, or the head alone.
  assert counts["full fine-tune"] == 3_383_818 and counts["frozen backbone + head"] == 12_810, counts
  assert len(set(counts.values())) == len(counts) == 3, counts
  assert text.count("regex") == 3, text   # each list's rules table
  text, _ = _cell(nb, "sweep.main(")
  checked = re.search(r"^(\d+) of \1 points checked \(configs/digits_efficientnet.py\)", text, re.M)
  assert checked and int(checked.group(1)) >= 2 and "--dry-run: nothing run" in text, text
  points = re.findall(rf"^\| \d+ +\| (\S+) +\| {re.escape(os.path.join(workdir, 'sweep'))}/(\S+) +\| to run +\|$", text,
                      re.M)
  assert len(points) == int(checked.group(1)) and all(p == d for p, d in points), text   # each in WORKDIR/sweep/<point>
