"""Random-weight folders of the three releases a TTS needs, in their real formats: a
Step-Audio-TTS-3B folder (a tiny Step1 LM whose LM head favours speech tokens, with
CosyVoice-300M-25Hz/ and CosyVoice-300M-25Hz-Music/), a Step-Audio-Tokenizer folder, and a speakers
folder in the official layout (Tingting, TingtingRAP, Tingting哼唱) whose prompts are generated
voiced audio (espeak-ng speech when it is installed)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import soundfile as sf

from .cosyvoice import write_cosyvoice_dir
from .speech import espeak_wav
from .step1 import write_random_step1
from .tokenizer import TINY, write_tokenizer_dir

# the official speakers_info.json transcripts
SPEAKERS = {
    "TingtingRAP": "（RAP）远远甩开的笑他是陆行龟 他曾跌倒也曾吃过灰 他说有福的人才会多吃亏 他的爸爸让他小心交友可他偏偏钻进个垃圾堆 他说他明白How to play",
    "Tingting哼唱": "（哼唱）你从一座叫 我 的小镇经过 刚好屋顶的雪化成雨飘落",
    "Tingting": "那等我们到海洋馆之后，给妈妈买个礼物，好不好呀？",
}
PROMPT_TEXT = "Hello, this is the voice prompt of a tiny test speaker."


def voiced_audio(seconds: float, sample_rate: int = 22050, seed: int = 0) -> np.ndarray:
    """A speech-like signal: harmonics on a moving pitch under a syllable envelope, with breath noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.8 * t + seed)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 10))
    env = np.clip(np.sin(2 * np.pi * 3.0 * t), 0, None) ** 0.5
    return (0.25 * voiced * env + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def write_speakers_dir(folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "speakers_info.json"), "w", encoding="utf-8") as f:
        json.dump(SPEAKERS, f, ensure_ascii=False, indent=1)
    for i, sid in enumerate(SPEAKERS):
        path = os.path.join(folder, f"{sid}_prompt.wav")
        if shutil.which("espeak-ng"):
            espeak_wav(path, PROMPT_TEXT)
        else:
            sf.write(path, voiced_audio(3.0, seed=i), 22050, subtype="PCM_16")
    return folder


def write_tts_folders(root: str, seed: int = 0) -> dict[str, str]:
    """Write the three folders under `root`; returns {"model", "tokenizer", "speakers"} paths."""
    model = write_random_step1(os.path.join(root, "Step-Audio-TTS-3B"), seed=seed, audio_head_scale=4.0)
    write_cosyvoice_dir(os.path.join(model, "CosyVoice-300M-25Hz"), seed=seed)
    write_cosyvoice_dir(os.path.join(model, "CosyVoice-300M-25Hz-Music"), seed=seed + 10)
    tokenizer = os.path.join(root, "Step-Audio-Tokenizer")
    write_tokenizer_dir(tokenizer, TINY, seed=seed)
    return {"model": model, "tokenizer": tokenizer, "speakers": write_speakers_dir(os.path.join(root, "speakers"))}
