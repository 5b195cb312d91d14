"""The arithmetic world: "37+48=" -> "85" with a shipped masked-diffusion LM (``builtin:arithmetic``)."""
