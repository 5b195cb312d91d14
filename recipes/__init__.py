"""Recipe files (hydra YAML): top-level recipes and the config groups they compose.

Installed as ``alignkit.recipes``."""
