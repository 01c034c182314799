"""Training: batches -> objectives (advantages, losses) -> one loop -> checkpoints."""
