"""Training: the fusion loss, both training stages, sharding and checkpoints."""
