"""Distillation losses, teacher-output cache, the config and the pipeline runner."""
