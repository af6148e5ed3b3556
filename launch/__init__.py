"""fox_megatron.launch: YAML config -> torchrun command line or sbatch script.

Imports no torch (it runs on login nodes). Entry point: ``fox-launch``
(``fox_megatron.launch.cli:main``), also ``python -m fox_megatron.launch``.
"""

from .cli import main
from .slurm import parse_job_id, render_sbatch
from .torchrun import local_command, node_commands, run_env

__all__ = ["main", "render_sbatch", "parse_job_id", "local_command", "node_commands", "run_env"]
