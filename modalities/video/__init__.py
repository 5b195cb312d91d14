"""Video modality: mp4 input/output (:mod:`alignkit.media.video`) and video backbones."""
