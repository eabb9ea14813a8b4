from stability.models.transformer import Transformer

__all__ = ["Transformer"]
