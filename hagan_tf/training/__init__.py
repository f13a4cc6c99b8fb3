"""Training: distribution strategy, callbacks (checkpoints, TensorBoard, progress) and the CLI."""
