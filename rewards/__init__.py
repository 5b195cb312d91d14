"""Reward plug-ins. Each module registers its rewards under ``alignkit.rewards`` entry points."""
