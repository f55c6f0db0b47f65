"""The training objective: pure loss functions, summed response log-probs, the chunked LM head."""
