"""Building blocks of the transformer models: paged attention, linear, norm, rotary, activation."""
