"""The package's own rules: no adapter library at run time."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import dyprag


def test_no_dyprag_module_imports_peft():
    modules = [m.name for m in pkgutil.walk_packages(dyprag.__path__, "dyprag.")
               if not m.name.endswith("__main__")]  # a command: importing it would run it
    assert {"dyprag.engine.lora", "dyprag.engine.inject", "dyprag.engine.models",
            "dyprag.engine.lora_io", "dyprag.run.pipeline"} <= set(modules)
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print('peft' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"
