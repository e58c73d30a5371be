"""rlad_pl: RL-aware knowledge distillation of reasoning LLMs on PyTorch Lightning."""

__version__ = "0.1.0"
