"""The tones world: a procedural text-to-audio world of beeps and chirps (pitch, count, shape, duration)."""
