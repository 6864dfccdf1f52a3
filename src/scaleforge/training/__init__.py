"""The trainer and what it is built from: optimizers, objectives, callbacks, logging and checkpoints."""
