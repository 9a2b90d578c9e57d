"""bptt: train recurrent networks on long sequences with truncated backpropagation through time."""

__version__ = "0.1.0"
