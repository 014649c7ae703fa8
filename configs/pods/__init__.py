"""Pod presets: a top-level config at pod scale (see _preset.py)."""
