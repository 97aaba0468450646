"""Smaller or faster models from any base: quantization, distillation, pruning."""
