"""Settings dataclasses from sections of the workflow's configuration.

The workflow's defaults live in one place, `config/schemas/config.schema.yaml`, whose `default:`
values Snakemake's `validate()` fills in before any rule reads the config; a section reaches the
library complete. `settings_from` only checks it against the dataclass: an unknown key (a typo)
is an error, never silently ignored, and so is a missing one the dataclass has no default for.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


def settings_from(cls: type[T], section: Mapping[str, Any] | None, where: str, **given: Any) -> T:
    """`cls(**section, **given)` for the config section named `where` (e.g. "train").

    `given`: fields the caller supplies itself (not config keys, e.g. the reference phase).
    Keys the section lacks keep the dataclass's default; without one they are an error.
    """
    section = dict(section or {})
    names = [f.name for f in fields(cls) if f.init and f.name not in given]
    unknown = sorted(set(section) - set(names))
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(unknown)} (unknown options are refused, not ignored); "
            f"known keys: {', '.join(sorted(names))}"
        )
    missing = [
        f.name
        for f in fields(cls)
        if f.init
        and f.name in names
        and f.name not in section
        and f.default is MISSING
        and f.default_factory is MISSING
    ]
    if missing:
        raise ValueError(f"{where} lacks: {', '.join(missing)}")
    return cls(**section, **given)
