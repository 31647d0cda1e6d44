"""Ray Train: the training tasks, the per-worker loop, the launcher, gradient caching."""
