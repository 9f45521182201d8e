"""Shared helpers: the one image reader / writer, file helpers, the TensorFlow import."""
