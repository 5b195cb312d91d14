"""Every setting a user can write in a recipe documents itself: the help text the docs reference is built from."""

from __future__ import annotations

import dataclasses
import typing

from alignkit.config import RunConfig


def _all_fields() -> list[tuple[str, dataclasses.Field]]:
    """Every field of :class:`RunConfig` by its recipe path, nested sections and dict values included."""
    out = []

    def walk(tp: type, path: str) -> None:
        hints = typing.get_type_hints(tp)
        for f in dataclasses.fields(tp):
            name = f"{path}.{f.name}" if path else f.name
            out.append((name, f))
            inner = hints[f.name]
            args = typing.get_args(inner)
            if typing.get_origin(inner) is dict and dataclasses.is_dataclass(args[1]):
                walk(args[1], f"{name}.<name>")
            elif dataclasses.is_dataclass(inner):
                walk(inner, name)

    walk(RunConfig, "")
    return out


def test_every_config_field_has_help_text() -> None:
    fields = _all_fields()
    assert len(fields) > 80  # every section, nested ones included (reward.<name>.fn, train.ema.decay, ...)
    missing = [name for name, f in fields if not str(f.metadata.get("help", "")).strip()]
    assert not missing, f"fields without metadata={{'help': ...}}: {missing}"
    assert {"reward.<name>.fn", "train.ema.decay", "backbone.lora.rank", "algo.plan.options"} <= {n for n, _ in fields}
