"""Demo fixtures: the tiny local model and the demo training run (`rlhf-tui demo` starts it in a subprocess)."""
