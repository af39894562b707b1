"""stepvox: an inference engine for the Step-Audio speech-dialogue models.

One distribution whose subpackages live in top-level folders (see DESIGN.md):
python/stepvox -> stepvox, engine -> stepvox.engine, kernels -> stepvox.kernels.
"""
from setuptools import find_packages, setup

ROOTS = {"stepvox": "python/stepvox", "stepvox.engine": "engine", "stepvox.kernels": "kernels"}


def _packages():
    found = []
    for name, folder in ROOTS.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(folder)]
    return found


def _package_dir():
    mapping = dict(ROOTS)
    for name, folder in ROOTS.items():
        for sub in find_packages(folder):
            mapping[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"
    return mapping


setup(
    name="stepvox",
    version="0.1.0",
    description="Inference engine for the Step-Audio speech-dialogue models",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir=_package_dir(),
    install_requires=[
        "torch==2.11.0",
        "torchaudio==2.11.0",
        "triton==3.6.0",
        "numpy<2.4",
        "safetensors",
        "sentencepiece",
        "pyyaml",
        "onnx",
        "onnxruntime",
    ],
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": ["stepvox=stepvox.cli:main"]},
)
