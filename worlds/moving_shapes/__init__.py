"""The moving-shapes world: a procedural text-to-video world of coloured shapes moving in stated directions."""
