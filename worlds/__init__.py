"""Worlds: procedural tasks small enough to pretrain and align on a CPU.

A world keeps all of its parts in one sub-package: the caption grammar and renderer (``world.py``), the
prompt source (``prompts.py``), the programmatic evaluator that serves as its reward, the model builder
(``model.py``), the one reproducible pretraining command (``pretrain.py``) and the shipped safetensors
(``weights/``). Worlds sit on top of the rest: they may import :mod:`alignkit.modalities` (backbones) and
:mod:`alignkit.rewards`, and nothing below imports a world; they plug in through the same entry points
(``alignkit.prompts``, ``alignkit.rewards``, ``alignkit.models`` for ``builtin:<name>`` pipelines).

* :mod:`alignkit.worlds.shapes`: text-to-image shapes (ShapeEval; ``builtin:shapes``; palette tokens).
* :mod:`alignkit.worlds.moving_shapes`: text-to-video moving shapes (MotionEval; ``builtin:shapes-video``).
* :mod:`alignkit.worlds.tones`: text-to-audio beeps and chirps (ToneEval; ``builtin:tones``).
* :mod:`alignkit.worlds.arithmetic`: masked-diffusion arithmetic (exact match; ``builtin:arithmetic``).
"""
