"""Autoencoder architectures, by name.

Every architecture maps float images ``(N, 1, 28, 28)`` in ``[0, 1]`` to a reconstruction of the same
shape and exposes the two named stages ``encode`` (image -> bottleneck code) and ``decode`` (code ->
image). A new architecture is one module here that decorates its class with
``@register_autoencoder(name)``, plus its import below.
"""

from .layers import IMAGE_SHAPE, Act
from .lenet import LeNetAutoencoder, lenet_features  # importing an architecture registers it
from .mlp import MLPAutoencoder
from .registry import architectures, create_autoencoder, register_autoencoder

__all__ = ["IMAGE_SHAPE", "Act", "LeNetAutoencoder", "MLPAutoencoder", "architectures", "create_autoencoder",
           "lenet_features", "register_autoencoder"]
