"""Models: tokenizer, region encoders, context encoders, heads and the xT assembly."""
