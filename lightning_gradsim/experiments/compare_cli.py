"""``gradsim compare`` on the command line: flags and a YAML config in, the error table out.

``gradsim compare --help`` and ``--list`` load no training code (``--list`` loads the rules, hence
torch); a run imports :mod:`lightning_gradsim.experiments.compare`. Keys of ``--config`` files are
:func:`~lightning_gradsim.experiments.compare.compare`'s arguments.

>>> build_parser().parse_args(["--methods", "sum", "pcgrad", "--vary", "angle=0,90"]).methods
['sum', 'pcgrad']

On the command line::

    gradsim compare --setup rotated_digits --methods main_only sum unweighted --vary angle=0,180 --seeds 0 1
    gradsim compare --config rotated_digits --jobs 2     # a packaged config by name, or a path
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from ..cli_checks import UsageError, check_out_dir, command_parser, int_at_least, one_line, user_errors
from .registry import DEFAULT_METHODS, list_setups

__all__ = ["build_parser", "main"]


#: The keys a ``gradsim compare`` YAML config may have.
CONFIG_KEYS: tuple[str, ...] = (
    "setup",
    "methods",
    "seeds",
    "variants",
    "options",
    "gate",
    "max_steps",
    "eval_every",
    "log_every",
    "jobs",
    "out_dir",
    "trainer",
    "progress",
    "select",
)


def _parse_assignments(items: Sequence[str] | None, what: str) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"{what} {item!r} must look like key=value.")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``gradsim compare`` (built without importing torch)."""
    parser = command_parser(
        prog="gradsim compare",
        description="Run methods x seeds (x variants) on one setup; print and save the main task's test error table.",
    )
    parser.add_argument(
        "--config", help="YAML file or packaged config name (gradsim configs) with keys as below; flags override it"
    )
    parser.add_argument("--setup", help="setup name (default rotated_digits)")
    parser.add_argument("--methods", nargs="+", help=f"methods (default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--seeds", nargs="+", type=int_at_least(0), help="seeds (default 0 1 2)")
    parser.add_argument(
        "--vary", action="append", metavar="KEY=V1,V2", help="sweep a setup option, e.g. angle=0,90,180"
    )
    parser.add_argument(
        "--set", dest="options", action="append", metavar="KEY=VALUE", help="a setup option for every run"
    )
    parser.add_argument("--gate", action="append", metavar="KEY=VALUE", help="a gate argument, e.g. aux_weight=0.5")
    parser.add_argument("--max-steps", type=int_at_least(1))
    parser.add_argument("--eval-every", type=int_at_least(1))
    parser.add_argument("--log-every", type=int_at_least(1))
    parser.add_argument("--jobs", type=int_at_least(1), help="parallel runs (processes)")
    parser.add_argument("--out-dir", help="output folder (default runs/compare/<setup>)")
    parser.add_argument(
        "--resume", action="store_true", help="reuse the finished runs an interrupted compare kept in --out-dir"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--list", action="store_true", help="list setups and methods, then exit")
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        metavar="MODULE",
        help="import a module first (one that registers setups or methods)",
    )
    return parser


@user_errors("gradsim compare")
def main(argv: list[str] | None = None) -> int:
    """``gradsim compare [--config FILE] [--setup S] [--methods ...] [--seeds ...] [--vary k=v1,v2] ...``"""
    import yaml

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.imports:
        import importlib

        for module in args.imports:
            importlib.import_module(module)
    if args.list:
        print("setups:")
        for name, desc in list_setups().items():
            print(f"  {name:<18} {desc}")
        from ..methods import list_methods

        print("methods:\n  " + " ".join(list_methods()))
        return 0
    cfg: dict[str, Any] = {}
    if args.config:
        from ..configs import ConfigNotFoundError, resolve_config

        try:
            args.config = resolve_config(args.config)
        except ConfigNotFoundError as err:
            parser.error(str(err))
        try:
            with open(args.config) as f:
                cfg = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as err:
            raise UsageError(f"--config {args.config}: cannot be read as YAML ({one_line(err)}).") from None
        if not isinstance(cfg, dict):
            raise UsageError(f"--config {args.config}: a mapping of keys {sorted(CONFIG_KEYS)} is expected.")
        bad = set(cfg) - set(CONFIG_KEYS)
        if bad:
            parser.error(f"unknown key(s) {sorted(bad)} in {args.config}; allowed: {sorted(CONFIG_KEYS)}")
    for key in ("setup", "methods", "seeds", "max_steps", "eval_every", "log_every", "jobs", "out_dir"):
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    bad_vary = [item for item in args.vary or [] if "=" not in item]
    if bad_vary:
        raise UsageError(f"--vary {bad_vary[0]!r} must look like key=v1,v2 (e.g. angle=0,90).")
    if args.vary:
        cfg["variants"] = {
            **cfg.get("variants", {}),
            **{
                k: v if isinstance(v, list) else [v]
                for k, v in ((k, yaml.safe_load("[" + v + "]")) for k, v in (item.split("=", 1) for item in args.vary))
            },
        }
    cfg["options"] = {**(cfg.get("options") or {}), **_parse_assignments(args.options, "--set")}
    cfg["gate"] = {**(cfg.get("gate") or {}), **_parse_assignments(args.gate, "--gate")}
    if args.no_progress:
        cfg["progress"] = False
    cfg.setdefault("setup", "rotated_digits")
    cfg.setdefault("out_dir", os.path.join("runs", "compare", cfg["setup"]))
    check_out_dir(cfg["out_dir"], "--out-dir")
    from .compare import compare

    try:
        result = compare(**cfg, resume=args.resume)
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise UsageError(str(err).strip("'\"")) from None
    print(result.markdown())
    if result.has_auroc:
        print("\n" + result.markdown("auroc"))
    print("\nfiles:")
    for key, path in result.files.items():
        print(f"  {key:<9} {path}")
    return 0
