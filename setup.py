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
    # stepvox serve's browser page (GET /): plain files, no build step
    package_data={"stepvox.server": ["static/*.html", "static/*.js", "static/*.css"]},
    install_requires=[
        "torch==2.11.0",
        "torchaudio==2.11.0",
        "triton==3.6.0",
        "numpy<2.4",
        "safetensors",
        "sentencepiece",
        "protobuf",                 # the tokenizer reads tokenizer.model's pieces (sentencepiece_model_pb2)
        "pyyaml",
        "onnx",
        "onnxruntime",
        "soundfile",                # WAV/FLAC/Ogg reading and writing (libsndfile)
        "soxr",                     # resampling of input audio (a maintained polyphase resampler)
        "pedalboard",               # speed change without pitch change (TTS speed=)
        "silero-vad",               # voice activity of the real-time controller (its ONNX model ships in the wheel)
        "fastapi>=0.110",           # stepvox serve: the HTTP API (routes, pydantic bodies)
        "pydantic>=2",              # stepvox serve: request bodies (v2 validators)
        "uvicorn>=0.30",            # stepvox serve: the ASGI server (graceful SIGTERM)
        "websockets>=12",           # stepvox serve: WebSocket support of uvicorn (/v1/realtime)
        "python-multipart",         # stepvox serve: multipart voice uploads
        "prometheus-client",        # stepvox serve: /metrics
        "nvidia-ml-py",             # stepvox bench kernels: board power and SM clocks through NVML (pynvml)
        "matplotlib",               # bench/streams.py: the plot of first audio and underruns against concurrency
    ],
    # transformers: the official tokenizer that tests/test_tokenizer.py compares with (the pin of
    # Step-Audio's requirements; 5.x builds a different tokenizer from the same files); openai: the
    # official client that tests/test_server.py speaks to the server with; selenium: drives Debian's
    # headless chromium (apt: chromium, chromium-driver) through the browser page in tests/test_server_page.py
    extras_require={"test": ["pytest", "hypothesis", "transformers==4.48.3", "openai>=1.60", "selenium>=4.11"]},
    entry_points={"console_scripts": ["stepvox=stepvox.cli:main"]},
)
