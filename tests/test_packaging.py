"""The package's own rules: no adapter library at run time."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import dyprag


def test_no_dyprag_module_imports_peft():
    modules = [f"dyprag.{m.name}" for m in pkgutil.iter_modules(dyprag.__path__)]
    assert {"dyprag.lora", "dyprag.inject", "dyprag.models", "dyprag.lora_io"} <= set(modules)
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print('peft' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"
