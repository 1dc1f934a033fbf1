"""Post-training quantization: folding, equalization, bias correction, AdaRound."""
