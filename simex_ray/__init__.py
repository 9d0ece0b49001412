"""simex-ray: SimEx dataset similarity on Ray."""

__version__ = "0.1.0"
