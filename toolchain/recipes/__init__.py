"""Built-in recipes (TOML files read with importlib.resources)."""
