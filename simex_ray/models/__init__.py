"""Autoencoder architectures, by name.

Every architecture maps float images ``(N, C, H, W)`` in ``[0, 1]`` of its
:class:`~simex_ray.formats.ImageFormat` to a reconstruction of the same shape and
exposes the two named stages ``encode`` (image -> bottleneck code) and ``decode``
(code -> image). It is built as ``cls(image_format=fmt, **kwargs)``; one that
cannot take a format says so in one line (``refuses``). A new architecture is one
module here that decorates its class with ``@register_autoencoder(name)``, plus its
import below.

=========  ==========================================================
``lenet``  the paper's LeNet-5 autoencoder, 1×28×28 only
``conv``   stride-2 convolution blocks and their mirror, any format
``mlp``    fully connected, any format (a cheap control)
=========  ==========================================================
"""

from .conv import ConvAutoencoder, Cost  # importing an architecture registers it
from .layers import Act
from .lenet import LeNetAutoencoder, lenet_features
from .mlp import MLPAutoencoder
from .registry import architectures, create_autoencoder, default_architecture, refusal, register_autoencoder

__all__ = ["Act", "ConvAutoencoder", "Cost", "LeNetAutoencoder", "MLPAutoencoder", "architectures",
           "create_autoencoder", "default_architecture", "lenet_features", "refusal", "register_autoencoder"]
