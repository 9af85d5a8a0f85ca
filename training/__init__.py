"""The one fit loop every stage uses: device, AMP, schedule, checkpoints, resume, logging."""
