from setuptools import find_packages, setup

setup(
    name="bd3jax",
    version="0.1.0",
    description="Block Diffusion language models (BD3-LM) in JAX/Flax",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["bd3jax", "bd3jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.4",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.12.4",
        "grain>=0.2.18",
        "array-record>=0.8",
        "sentencepiece>=0.2.0",
        "ml-collections>=1.0",
        "chex>=0.1.90",
        "absl-py",
        "numpy",
        "tensorboardX>=2.6",
        "tqdm",
    ],
    extras_require={
        # Published reference checkpoints (.safetensors files, HF folders and hub ids).
        "reference": ["safetensors>=0.4", "huggingface_hub>=0.20"],
        "notebook": ["matplotlib>=3.8", "ipykernel", "safetensors>=0.4"],
        # Data sources and tokenizers beyond local text and sentencepiece (none needs TensorFlow).
        "tfds": ["tensorflow-datasets>=4.9.9"],
        "hf": ["datasets>=3.0", "huggingface_hub>=0.20"],
        "gpt2": ["tiktoken>=0.7"],
        # Generative perplexity under a Hugging Face causal LM (GPT-2 Large in the paper).
        "gpt2-eval": ["transformers>=4.40", "torch>=2.2"],
        "test": ["pytest>=8", "pytest-xdist>=3.5", "nbclient>=0.10", "nbformat>=5.9", "ipykernel",
                 "matplotlib>=3.8", "safetensors>=0.4", "tensorflow-datasets>=4.9.9", "datasets>=3.0",
                 "tiktoken>=0.7"],
    },
)
