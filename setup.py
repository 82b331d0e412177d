"""manifold_merge: merge fine-tuned neural networks by geometric averaging (JAX)."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="manifold_merge",
    version="0.1.0",
    description=(
        "Merge fine-tuned models by Karcher / Fréchet means on Riemannian manifolds (JAX)."
    ),
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["manifold_merge", "manifold_merge.*"]),
    install_requires=[
        "jax>=0.4.35",
        "jaxlib>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.9",
        "chex>=0.1.87",
        "absl-py>=2.1",
        "ml_collections>=0.1.1",
        "numpy>=1.26",
        "safetensors>=0.4.3",
        "PyYAML>=6.0",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        # Data and text: sklearn's bundled 8x8 digits; Hugging Face's WordPiece tokenizer.
        "scikit-learn>=1.4",
        "tokenizers>=0.19",
    ],
    extras_require={
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
        ],
    },
    entry_points={"console_scripts": ["manifold-merge = manifold_merge.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
