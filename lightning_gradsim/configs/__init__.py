"""The packaged example configs, found by name: ``gradsim compare --config rotated_digits``.

Every ``<group>/<name>.yaml`` under this folder ships in the wheel; its file stem is its name,
unique across groups. ``--config`` of ``gradsim compare`` and ``gradsim fit/validate/test`` takes a
path (as always) or such a name; ``gradsim configs`` lists them and ``gradsim configs NAME`` prints
one, to copy and edit.

>>> list_configs()["rotated_digits"].relative_to(CONFIG_DIR).as_posix()
'digits/rotated_digits.yaml'
>>> resolve_config("rotated_90") == str(CONFIG_DIR / "digits" / "rotated_90.yaml")
True
>>> resolve_config(resolve_config("rotated_90")) == resolve_config("rotated_90")  # a path stays a path
True
>>> try:
...     resolve_config("rotated_9")
... except ConfigNotFoundError as err:
...     print(err)  # doctest: +NORMALIZE_WHITESPACE
no config file or packaged config named 'rotated_9'; close matches: rotated_90, rotated_0, rotated_45
(gradsim configs lists all).
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from ..cli_checks import user_errors

__all__ = ["CONFIG_DIR", "ConfigNotFoundError", "list_configs", "resolve_config", "resolve_config_args", "main"]

#: The folder holding the packaged configs (``<group>/<name>.yaml``).
CONFIG_DIR = Path(__file__).resolve().parent

#: What a packaged config's name looks like: a file stem, no folder, no suffix.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SUFFIXES = (".yaml", ".yml")


class ConfigNotFoundError(FileNotFoundError):
    """``--config`` is neither an existing file nor the name of a packaged config."""


def list_configs() -> dict[str, Path]:
    """Name (file stem) -> path of every packaged config, sorted by name.

    Raises ``RuntimeError`` if two groups hold the same name (a packaging bug: names must be unique).
    """
    found: dict[str, list[Path]] = {}
    for path in sorted(CONFIG_DIR.rglob("*.yaml")):
        found.setdefault(path.stem, []).append(path)
    clashes = {name: paths for name, paths in found.items() if len(paths) > 1}
    if clashes:
        detail = "; ".join(
            f"{n}: {', '.join(p.relative_to(CONFIG_DIR).as_posix() for p in ps)}" for n, ps in clashes.items()
        )
        raise RuntimeError(f"packaged config names must be unique across groups, but {detail}.")
    return {name: paths[0] for name, paths in sorted(found.items())}


def _close_matches(word: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, names, n=3, cutoff=0.6)
    return f"close matches: {', '.join(close)}" if close else f"packaged configs: {', '.join(names)}"


def resolve_config(value: str) -> str:
    """The file ``--config value`` means: ``value`` itself if it exists, else the packaged config of that name.

    Idempotent (a resolved path resolves to itself). A value that is neither a file nor a name
    (LightningCLI's inline YAML, e.g. ``'{trainer: {max_steps: 5}}'``) is returned unchanged; an
    unknown name, or a ``.yaml`` path that does not exist, raises :class:`ConfigNotFoundError`
    naming the close matches.
    """
    if os.path.isfile(value):
        return value
    configs = list_configs()
    if _NAME.fullmatch(value) and not value.endswith(_SUFFIXES):
        if value in configs:
            return str(configs[value])
        raise ConfigNotFoundError(
            f"no config file or packaged config named {value!r}; {_close_matches(value, list(configs))} "
            "(gradsim configs lists all)."
        )
    if value.endswith(_SUFFIXES):
        stem = Path(value).stem
        hint = (
            f"the packaged config {stem!r} is --config {stem}"
            if stem in configs
            else _close_matches(stem, list(configs))
        )
        raise ConfigNotFoundError(f"no such config file {value!r}; {hint} (gradsim configs lists all).")
    return value


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """``argv`` with the value of every ``--config``/``-c`` resolved by :func:`resolve_config`.

    Returns a new list (``sys.argv`` is never touched), so a process that re-runs its own command
    line, as Lightning's DDP launcher does, resolves the same names to the same files.

    >>> resolve_config_args(["--config", "rotated_90", "--trainer.max_steps", "5"])[1].endswith("rotated_90.yaml")
    True
    >>> resolve_config_args(["-c={trainer: {max_steps: 5}}"])
    ['-c={trainer: {max_steps: 5}}']
    """
    out = list(argv)
    for i, arg in enumerate(out):
        for flag in ("--config", "-c"):
            if arg == flag and i + 1 < len(out):
                out[i + 1] = resolve_config(out[i + 1])
            elif arg.startswith(flag + "="):
                out[i] = f"{flag}={resolve_config(arg[len(flag) + 1 :])}"
    return out


@user_errors("gradsim configs")
def main(argv: list[str] | None = None) -> int:
    """``gradsim configs``: list the packaged configs; ``gradsim configs NAME``: print one (to copy and edit)."""
    from ..cli_checks import command_parser

    parser = command_parser(
        prog="gradsim configs",
        description="List the packaged example configs (usable as --config NAME), or print one.",
    )
    parser.add_argument("name", nargs="?", help="a config name: print its YAML")
    parser.add_argument("--path", action="store_true", help="print the file's path instead of its contents")
    args = parser.parse_args(argv)
    configs = list_configs()
    if args.name is None:
        for name, path in configs.items():
            print(f"{name:<32} {path.relative_to(CONFIG_DIR).parent.as_posix()}")
        return 0
    try:
        path = Path(resolve_config(args.name))
    except ConfigNotFoundError as err:
        print(f"gradsim configs: {err}", file=sys.stderr)
        return 2
    print(path if args.path else path.read_text(), end="\n" if args.path else "")
    return 0
