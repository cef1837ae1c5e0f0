"""Packaging for vaultgemma-hf."""

from setuptools import find_packages, setup

# transformers: CI (`make test`) runs the newest 5.x release, `make test-min` the 5.17.0 lower bound (the GPU image's
# version); the upper bound is the next major release because the model code only uses transformers' public API
# (5.24's rename of `past_key_values` to `cache` is handled: both names are accepted).
install_requires = [
    "torch>=2.6",
    "transformers>=5.17,<6",
    "safetensors>=0.4.3",
    "tokenizers>=0.21",
    "accelerate>=1.0",
    "dp-accounting>=0.5",
    "numpy>=1.26",
    "scipy>=1.10",
    "rich>=13",
    "tqdm>=4.66",
]

extras = {
    "convert": ["orbax-checkpoint>=0.11", "jax>=0.4.30", "ml_dtypes>=0.5"],
    "peft": ["peft>=0.13"],
    "plot": ["matplotlib>=3.8"],
    "bench": ["opacus>=1.5"],
    "quality": ["ruff>=0.6"],
}
# jax-privacy: its `auditing` module is the independent oracle of the privacy audit's statistics.
extras["test"] = [
    "pytest>=8",
    "pytest-timeout>=2.3",
    "peft>=0.13",
    "matplotlib>=3.8",
    "sentencepiece>=0.2",
    "jax-privacy>=2.0; python_version >= '3.11'",  # its tests are skipped where it is missing
]
extras["dev"] = sorted({dep for deps in extras.values() for dep in deps})

setup(
    name="vaultgemma-hf",
    version="0.1.0.dev0",
    description="VaultGemma as a first-class Hugging Face transformers model, with DP-SGD continued pretraining.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras,
    entry_points={"console_scripts": ["vaultgemma-hf=vaultgemma_hf.cli.main:main"]},
    include_package_data=True,
    package_data={"vaultgemma_hf": ["fixtures/**/*", "trainer/templates/*"]},
)
