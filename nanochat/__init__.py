"""nanochat: train, evaluate and talk to your own small ChatGPT."""
__version__ = "0.1.0"
