"""Training: the step (loss, optimizers), the loop, checkpoints, the workdir, held-out evaluation,
the typed run config."""
