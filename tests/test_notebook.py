"""notebooks/compare_runs.ipynb runs top to bottom (nbclient, kernel python3) on a synthetic run
store and shows the table."""
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from ptq_qlora.report.synthetic import build_synthetic_store  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "compare_runs.ipynb"


def _ensure_python3_kernel() -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user", "--name", "python3"], check=True)


def _text(output) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    data = output.get("data", {})
    return "\n".join(str(data.get(kind, "")) for kind in ("text/markdown", "text/plain", "text/html"))


def test_compare_runs_notebook_executes(tmp_path, monkeypatch):
    _ensure_python3_kernel()
    store = build_synthetic_store(tmp_path / "runs")
    out = tmp_path / "report"
    monkeypatch.setenv("PTQ_QLORA_STORE", str(store.root))  # the kernel inherits the environment
    monkeypatch.setenv("PTQ_QLORA_REPORT_OUT", str(out))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "\n".join(_text(o) for o in outputs)
    assert str(store.root) in text
    assert "| Models | bitext Precision |" in text
    assert "| smollm2-135m + PTQ-BNB-4bit + QLoRA |" in text
    assert "### Across model × task cells" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2
    assert (out / "table.md").exists() and (out / "bars_bitext.png").exists()
