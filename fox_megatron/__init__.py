"""fox-megatron: Forgetting Transformer attention with Adaptive Computation
Pruning for Megatron-Core pretraining.

Subpackages:
  fox_megatron.kernels  -- Triton forgetting attention + ACP, torch reference
                           (source folder: kernels/)
  fox_megatron.launch   -- YAML -> torchrun / SLURM, no torch import
                           (source folder: launch/)
  fox_megatron.model    -- Megatron-Core layer spec with FoX attention
  fox_megatron.train    -- the trainer
"""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"

# A built wheel places kernels/ and launch/ inside this package (setuptools
# package-dir mapping in pyproject.toml).  In a source checkout (editable
# install, or PYTHONPATH=<repo>) they stay top-level folders next to this one;
# this finder maps exactly those two names so that they import under the
# fox_megatron namespace and never shadow PyPI's "kernels" or a generic
# "launch" module.
_HERE = Path(__file__).resolve().parent
_SOURCE_SUBPACKAGES = {
    f"{__name__}.{name}": _HERE.parent / name
    for name in ("kernels", "launch")
    if not (_HERE / name).is_dir() and (_HERE.parent / name / "__init__.py").is_file()
}


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        folder = _SOURCE_SUBPACKAGES.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


if _SOURCE_SUBPACKAGES and not any(isinstance(f, _SourceTreeFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _SourceTreeFinder())
