"""The engine: config loading, sharding, optimizer, checkpoints, metrics and the training loop."""
