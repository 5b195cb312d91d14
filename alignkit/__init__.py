"""alignkit: GRPO-family RL alignment for diffusion and flow models.

The core never imports a concrete backbone or reward: they plug in through the registries in
:mod:`alignkit.registry` (entry points ``alignkit.samplers`` and ``alignkit.rewards``).
"""

__version__ = "0.1.0"
