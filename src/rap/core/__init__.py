"""What every job shares: the model's shape and loading, block masks and plans, quantized weights, the memory model,
rap's one forward, and the one boundary with transformers' internals (`hf`)."""
