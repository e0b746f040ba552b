"""Avalanche plugins of our methods: each owns its state and acts on the strategy (loss, gradients, optimiser, its condition)."""
