"""Serving: the Triton model repository (`models/`), the package its model.py files share
(`sdserve/`), and the tools that build weights and run Triton locally.

model.py files import `sdserve` as a top-level package (each model archive carries its own
copy beside model.py), so the tools here import it the same way: importing `serving` puts
this folder on sys.path, and a process holds one `sdserve`, never a second `serving.sdserve`.
"""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)
