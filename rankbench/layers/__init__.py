"""Tensorized layers (tensor-ring / tensor-train linear, conv2d and embedding), their bonds and
rank selectors, and the model-level helpers that enumerate, count and prune them."""
