"""stenvan: video person re-identification (STE-NVAN, NVAN) that reproduces the paper, fast."""

from setuptools import find_packages, setup

setup(
    name="stenvan",
    version="0.1.0",
    description="Fast, trustworthy training and evaluation of video person re-id models (STE-NVAN, NVAN)",
    python_requires=">=3.10",
    packages=find_packages(include=["stenvan", "stenvan.*", "prepare", "prepare.*"]),
    install_requires=[
        "torch", "torchvision", "numpy", "Pillow", "scipy", "webdataset", "tqdm", "tensorboard", "matplotlib",
        "PyYAML", "h5py",  # h5py: MATLAB v7.3 files (LS-VID info_test.mat); scipy reads the older .mat files
    ],
    extras_require={
        # DALI must match the CUDA major version torch was built with (`make install` picks one).
        "cu12": ["nvidia-dali-cuda120"],
        "cu13": ["nvidia-dali-cuda130"],
        # onnx + onnxscript: torch.onnx's exporter (export.py); onnxruntime: the tests run the exported graphs;
        # pytest-xdist: `make test` runs the suite in 2 processes (most tests wait on training subprocesses and disk)
        "test": ["pytest", "pytest-xdist", "onnx", "onnxscript", "onnxruntime"],
    },
)
