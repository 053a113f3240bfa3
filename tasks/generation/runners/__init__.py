"""Model runners: run a packed batch of new tokens over the paged KV cache."""
