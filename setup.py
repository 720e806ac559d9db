from setuptools import setup

setup(
    name="fused-attn",
    version="0.1.0",
    description="FlashAttention-style attention as hand-written Triton kernels for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["fused_attn", "fused_attn.kernels", "fused_attn.integrations", "fused_attn.distributed",
              "fused_attn.explore"],
    # numpy: the Triton interpreter (CPU runs) needs it and CPU builds of torch do not pull it in. Triton 3.6's
    # interpreter also needs numpy < 2.4 (fused_attn says so at run time); triton >= 3.7 runs with any.
    # tqdm: the progress of long runs (check, bench).
    install_requires=["torch>=2.11", "triton>=3.6", "numpy", "tqdm"],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3.6", "hypothesis>=6", "transformers>=5.20,<6", "matplotlib>=3.5",
                 "streamlit>=1.40"],
        "hf": ["transformers>=5.20,<6"],
        "bench": ["matplotlib>=3.5"],
        "app": ["streamlit>=1.40", "transformers>=5.20,<6", "matplotlib>=3.5"],
    },
    entry_points={"console_scripts": ["fused-attn = fused_attn.__main__:main"]},
)
