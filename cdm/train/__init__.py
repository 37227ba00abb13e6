"""Training one stage: data, degradations, losses, checkpoints and the loop."""
