"""Training engine: one Trainer for every method, metrics, checkpoints and results records."""
