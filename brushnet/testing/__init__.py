"""Scaffolding for tests and demos: tiny diffusers models saved as real folders. Not runtime code."""
