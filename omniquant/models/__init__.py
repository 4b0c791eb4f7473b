"""Architecture adapters: one per model family, naming its decoder blocks, linears and norms."""

from omniquant.models.base import Adapter, get_adapter, supported_model_types

__all__ = ["Adapter", "get_adapter", "supported_model_types"]
