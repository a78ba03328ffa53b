"""Export trained drafters into checkpoints that load as written (docs/export.md).

- :func:`export_checkpoint` (``python -m dspark_lightning export``): a Lightning checkpoint -> ``hf``, ``deepspec``,
  ``sglang`` or ``attached`` directory.
- :func:`load_drafter`: any of those back into ``DSpark`` / ``DFlash`` / ``Eagle3``.
- ``deepspec.import_deepspec`` (``import-deepspec``): a DeepSpec draft directory -> our checkpoint or ``hf`` repo.
- ``push.push`` (``push``): upload an export directory to the Hugging Face Hub.
"""

from .checkpoint import TrainedDrafter, read_checkpoint
from .exporter import FORMATS, export_checkpoint, write_export
from .loading import detect_format, load_drafter

__all__ = ["FORMATS", "TrainedDrafter", "detect_format", "export_checkpoint", "load_drafter", "read_checkpoint",
           "write_export"]
