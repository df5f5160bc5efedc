"""imaml-seg: few-shot medical image segmentation with implicit MAML."""

__version__ = "0.1.0"
