"""Tensors in, tensors out, no files: models, capture, receptive fields, kernel and tap maps,
pooling switches, projections and ranking."""
