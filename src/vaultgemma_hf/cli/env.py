"""`vaultgemma-hf env`: versions of everything vaultgemma-hf depends on (paste it into bug reports)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys

PACKAGES = (
    "vaultgemma-hf",
    "torch",
    "transformers",
    "accelerate",
    "safetensors",
    "tokenizers",
    "dp-accounting",
    "numpy",
    "peft",
    "opacus",
    "orbax-checkpoint",
    "jax",
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("env", help="Print versions of the packages vaultgemma-hf depends on.")
    parser.add_argument("--json", action="store_true", help="Print JSON instead of aligned text.")
    parser.set_defaults(func=env_command)
    return parser


def collect() -> dict[str, str]:
    """Versions of Python, the platform, our dependencies, the accelerator and the Auto-class policy."""
    info = {"python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = "not installed"
    try:
        import torch

        info["cuda available"] = str(torch.cuda.is_available())
        if torch.cuda.is_available():
            info["cuda device"] = torch.cuda.get_device_name(0)
            info["cuda version"] = str(torch.version.cuda)
    except ImportError:
        pass
    import vaultgemma_hf

    info["Auto* 'vaultgemma' resolves to"] = vaultgemma_hf.AUTO_CLASSES_RESOLVE_TO
    return info


def env_command(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(key) for key in info)
        for key, value in info.items():
            print(f"- {key.ljust(width)}: {value}")
    sys.stdout.flush()
    return 0
