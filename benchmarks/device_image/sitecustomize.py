"""The device image's missing packages, for ``benchmarks/gpu_check.sh --dry-run``: with this folder on
``PYTHONPATH`` every Python process sees as absent what the lent GPU machine's image lacks (it holds torch,
transformers, pyarrow, pyyaml, safetensors, tokenizers and pytest, but not these, and nothing can be
installed there), so a dry run on the CPU fails where the device run would.

A ``None`` in ``sys.modules`` is Python's own mark of a module that is not there: ``import`` raises
``ModuleNotFoundError`` and ``importlib.util.find_spec`` answers ``None``, so optional imports fall back as
they would on the device."""

import sys

MISSING = ("ray", "mlflow", "boto3", "botocore", "moto", "zstandard")

for _name in MISSING:
    sys.modules.setdefault(_name, None)
