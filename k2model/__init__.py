"""k2model: the Kimi K2 architecture, the MuonClip optimizer and expert dispatch in pure PyTorch.

This package never imports Ray or MLflow, so the model can be read and tested without a cluster.
"""

from k2model.config import PRESETS, ModelConfig, OptimizerConfig, count_parameters, preset_config

__all__ = ["PRESETS", "ModelConfig", "OptimizerConfig", "count_parameters", "preset_config"]
