"""What every architecture shares: the activation."""

from torch import nn

# ELU, not ReLU: on mostly-black digit images ReLU (and leaky ReLU) decoders collapsed to a constant
# output in a third of short MNIST runs (Adam, lr 1e-3); ELU never did (see LeNetAutoencoder).
Act = nn.ELU
