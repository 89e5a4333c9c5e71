"""Training: the task-agnostic core, checkpoints, metric logs, the ClipCrop and detection tasks."""
