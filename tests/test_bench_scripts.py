"""Every bench script imports and every ``bench/run.py`` group has a ``run()``.

The benches are not run here (minutes each, peers installed from PyPI), but a script that no
longer imports is broken for whoever runs ``make bench``: ``bench_rnn_weights.py`` imported
helpers ``bench_int4_conv.py`` had dropped, and nothing noticed until it was run by hand.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
# Scripts the benches run in their own virtual environment, with packages modelshrink never needs.
OWN_VENV = {"ocr_pages": "rapidocr_onnxruntime"}
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py"))


@pytest.fixture(autouse=True)
def _bench_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))


@pytest.mark.parametrize("name", SCRIPTS)
def test_bench_script_imports(name: str) -> None:
    if name in OWN_VENV:
        with pytest.raises(ModuleNotFoundError, match=OWN_VENV[name]):
            importlib.import_module(name)
        return
    importlib.import_module(name)


def test_every_group_has_a_run() -> None:
    run = importlib.import_module("run")
    assert run.GROUPS
    for group, module in run.GROUPS.items():
        assert callable(getattr(importlib.import_module(module), "run", None)), group
