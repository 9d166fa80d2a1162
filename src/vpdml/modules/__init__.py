"""Building blocks below the tuner: prompts, the embedding head, BitFit offsets, row-sparse parameters and
optimizers, and backbone introspection and loading."""
