"""Text from a trained language model: sampling options, decoders that carry a model's state from one token to the
next (gpt's key/value cache, lstm's (h, c)), text decoded as tokens arrive, and `generate` over a run directory."""
