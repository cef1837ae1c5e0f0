"""`vaultgemma-hf` console script: one sub-command per module of this package.

Each sub-command lives in its own module exposing ``add_parser(subparsers)``; the parser it registers sets
``func`` (called with the parsed namespace, returning an exit code). Modules are imported lazily so that
``vaultgemma-hf env`` stays fast and a missing optional extra only breaks the command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Order is the order shown by --help.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("vaultgemma_hf.cli.run", "Run a pipeline (text-generation) on prompts from stdin or a file."),
    "train": ("vaultgemma_hf.cli.train", "DP-SGD continued pretraining with DPTrainer."),
    "plan": ("vaultgemma_hf.cli.plan", "Plan a DP training budget (privacy x compute x utility)."),
    "audit": (
        "vaultgemma_hf.cli.audit",
        "Empirical privacy audit: canaries, membership inference, extraction, one-run ε lower bound.",
    ),
    "convert": ("vaultgemma_hf.cli.convert", "Convert weights between the JAX/Flax gemma layout and HF safetensors."),
    "env": ("vaultgemma_hf.cli.env", "Print versions of the packages vaultgemma-hf depends on."),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Builds the top-level parser, importing only the sub-command that is asked for (all for --help)."""
    from vaultgemma_hf import __version__

    parser = argparse.ArgumentParser(prog="vaultgemma-hf", description="VaultGemma tools for transformers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if wanted in SUBCOMMANDS and name != wanted:
            subparsers.add_parser(name, help=help_text)
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:  # an optional extra is missing: keep the command, explain on use
            sub = subparsers.add_parser(name, help=f"{help_text} (unavailable: {err})")
            sub.set_defaults(func=lambda _args, _err=err, _name=name: _unavailable(_name, _err))
            continue
        module.add_parser(subparsers)
    return parser


def _unavailable(name: str, err: ImportError) -> int:
    print(f"vaultgemma-hf {name}: cannot run because an import failed: {err}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
