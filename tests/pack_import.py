"""Imports the pack the way ComfyUI loads it: the repository folder as a package, here under the fixed name
``comfyui_svdquant``, so that every test (and every script using the test helpers) shares one copy of each
module. Importing this module does it once."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_svdquant"

if PACKAGE not in sys.modules:
    spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
