"""The shapes world: a procedural text-to-image world of simple coloured shapes."""
