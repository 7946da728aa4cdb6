"""Training: the loop, evaluation, metrics and plots, optimizers and LR schedules, ablations."""
