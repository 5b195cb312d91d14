"""Video modality: mp4 input/output (:mod:`modalities.video.io`) and video backbones."""
