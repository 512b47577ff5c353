"""Composable transforms, one per module: ``from dsf.transforms import checkpoint``."""

from dsf.transforms.checkpoint import checkpoint

__all__ = ["checkpoint"]
