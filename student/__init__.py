"""Students (timm CNNs), structured pruning with torch-pruning, safe saving, ONNX export."""
