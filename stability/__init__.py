"""stability: small-scale proxies for transformer training instabilities, in JAX."""

__version__ = "0.3.0"
