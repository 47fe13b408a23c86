"""Knowledge distillation on stock onnxruntime (see :mod:`.technique`)."""
