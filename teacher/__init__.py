"""Building the ViT teacher (timm, hub or local weights) and its fine-tuning recipe."""
