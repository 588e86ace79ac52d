"""One module per Gemma family: its config, builder and what is new in it."""
