"""What runs in each Ray Train worker: the epoch (train_loop), the timed step (step), the
recipe, the model and its backbone's weights (model, weights), evaluation, checkpoints, what
NVML tells (nvml) and the FLOPs of a step (flops)."""
