"""Audio modality: Stable Audio 3 text-to-audio backbone (:mod:`alignkit.modalities.audio.stable_audio`), wav
input/output and previews (:mod:`alignkit.media.audio`) and a tiny offline pipeline builder
(:mod:`alignkit.modalities.audio.tiny`).

Audio samples are waveforms ``[B, C, T]`` float32 in [-1, 1] at the sampler's ``sample_rate`` (Hz).
"""
