"""What every architecture shares: the image shape and the activation."""

from torch import nn

IMAGE_SHAPE = (1, 28, 28)  # (C, H, W) of every image the autoencoders take

# ELU, not ReLU: on mostly-black digit images ReLU (and leaky ReLU) decoders collapsed to a constant
# output in a third of short MNIST runs (Adam, lr 1e-3); ELU never did (see LeNetAutoencoder).
Act = nn.ELU
