"""The engine (plan, claim OUT, load, step, write, merge) and one small module per command."""
