"""Measurement: model size (`profile`), training-step cost (`step_cost`, `memory`), throughput of
evaluation and data loading (`throughput`), the report's cost columns (`costs`) and the `bench`
benchmark that puts them together. Every measurement of a training step runs `engine.step`."""
