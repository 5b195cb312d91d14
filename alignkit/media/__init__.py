"""Media for every modality in one place: captioned preview grids (:mod:`.grids`), mp4 video
(:mod:`.video`, PyAV) and PCM wav audio (:mod:`.audio`, the standard library)."""

from alignkit.media.grids import frame_strips, save_grid, save_previews_with_files, save_samples, waveform_images

__all__ = ["frame_strips", "save_grid", "save_previews_with_files", "save_samples", "waveform_images"]
