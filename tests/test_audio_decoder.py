"""SpeechDecoder API (engine/audio/decoder.py): loading, speaker prompts from real speech, token
validation, typed errors, settings variants."""
from __future__ import annotations

import shutil
import subprocess
import time

import numpy as np
import onnxruntime
import pytest
import torch

from stepvox.engine.audio.decoder import SpeakerPrompt, SpeechDecoder, flow_tokens_from_llm_ids
from stepvox.engine.audio.decoder_stream import StreamConfig
from stepvox.engine.errors import (AudioInputError, AudioTooShortError, CheckpointError, ConfigError,
                                   InvalidRequestError, SpeakerPromptError, SpeechTokenError, StreamClosedError)
from stepvox.engine.frontend.fbank import campplus_features
from stepvox.engine.frontend.resample import resample
from stepvox.engine.frontend.wav import read_wav, write_wav


def test_prompt_from_speech_and_resampled_copies(tiny_decoder, speech_wav, tmp_path):
    wav, sr = read_wav(speech_wav)
    prompt = tiny_decoder.make_prompt(wav, sr, tokens=list(range(40)))
    assert prompt.mel.shape == (wav.shape[1] // 256, 80) and prompt.embedding.shape == (192,)
    assert prompt.tokens.tolist() == list(range(40))
    # the embedding is the (fixture) CAM++ ONNX of the mean-normalised 16 kHz fbank
    sess = onnxruntime.InferenceSession(f"{tiny_decoder.campplus.path}", providers=["CPUExecutionProvider"])
    feats = campplus_features(resample(torch.from_numpy(wav[0]), sr, 16000))[None].numpy()
    np.testing.assert_allclose(prompt.embedding.numpy(), sess.run(None, {"feats": feats})[0][0], rtol=1e-5, atol=1e-6)
    # the same speech at 16 kHz / 44.1 kHz (sox) gives nearly the same prompt (documented resampling)
    for rate in (16000, 44100):
        other = str(tmp_path / f"p{rate}.wav")
        subprocess.run(["sox", speech_wav, "-r", str(rate), other], check=True, capture_output=True)
        w2, sr2 = read_wav(other)
        p2 = tiny_decoder.make_prompt(w2, sr2, tokens=[1, 2, 3])
        n = min(p2.mel.shape[0], prompt.mel.shape[0])
        assert abs(p2.mel.shape[0] - prompt.mel.shape[0]) <= 1
        assert (p2.mel[:n] - prompt.mel[:n]).abs().median() < 0.3
        assert torch.nn.functional.cosine_similarity(p2.embedding, prompt.embedding, dim=0) > 0.98
    # stereo in, mono mean out; a path works as well
    stereo = np.stack([wav[0], wav[0]])
    torch.testing.assert_close(tiny_decoder.make_prompt(stereo, sr, tokens=[1]).mel, prompt.mel)
    torch.testing.assert_close(tiny_decoder.make_prompt(speech_wav, tokens=[1]).embedding, prompt.embedding)
    with pytest.raises(AudioInputError, match="16000 given for a 22050 Hz file"):
        tiny_decoder.make_prompt(speech_wav, 16000)
    with pytest.raises(AudioInputError, match="sample_rate is required"):
        tiny_decoder.make_prompt(wav)


def test_prompt_audio_policy(tiny_decoder, speech_wav, tmp_path):
    """The one audio-input policy holds for prompts too: 8 kHz (accepted by the old decoder) is
    refused now, as a file and as samples; at most 8 channels; int16 / int32 / float only."""
    narrow = str(tmp_path / "p8k.wav")
    subprocess.run(["sox", speech_wav, "-r", "8000", narrow], check=True, capture_output=True)
    w8, sr8 = read_wav(narrow)
    assert sr8 == 8000
    with pytest.raises(AudioInputError, match="8000 Hz is below 16000 Hz"):
        tiny_decoder.make_prompt(narrow, tokens=[1])
    with pytest.raises(AudioInputError, match="8000 Hz is below 16000 Hz"):
        tiny_decoder.make_prompt(w8, sr8, tokens=[1])
    wav, sr = read_wav(speech_wav)
    reference = tiny_decoder.make_prompt(wav, sr)
    with pytest.raises(AudioInputError, match="at most 8 channels"):
        tiny_decoder.make_prompt(np.repeat(wav, 9, axis=0), sr)
    torch.testing.assert_close(tiny_decoder.make_prompt(np.repeat(wav, 8, axis=0), sr).mel, reference.mel)
    pcm16 = np.round(wav[0] * 32768.0).clip(-32768, 32767).astype(np.int16)      # read_wav gave x / 2**15
    torch.testing.assert_close(tiny_decoder.make_prompt(pcm16, sr).mel, reference.mel)
    for dtype in (np.uint8, np.int8, np.int64, np.bool_):
        with pytest.raises(AudioInputError, match="unsupported audio dtype"):
            tiny_decoder.make_prompt(np.zeros(30000, dtype), sr)


def test_decode_with_speech_prompt(tiny_decoder, speech_wav):
    wav, sr = read_wav(speech_wav)
    prompt = tiny_decoder.make_prompt(wav, sr).with_tokens(list(range(100, 150)))
    audio = tiny_decoder.token2wav(list(range(2000, 2050)), prompt=prompt, seed=0)
    assert audio.shape == (int(50 / 41.667 * 22050 / 256) * 256,) and audio.dtype == torch.float32
    assert torch.isfinite(audio).all() and audio.abs().max() <= 0.99 and audio.std() > 1e-4
    assert tiny_decoder.sample_rate == 22050


def test_token_errors(tiny_decoder):
    with pytest.raises(SpeechTokenError, match="empty"):
        tiny_decoder.token2wav([])
    with pytest.raises(SpeechTokenError, match="vocabulary"):
        tiny_decoder.token2wav([1, 2, 5120])
    with pytest.raises(SpeechTokenError, match="subtract 65536"):
        tiny_decoder.token2wav([65536 + 3, 65536 + 4])
    with pytest.raises(SpeechTokenError, match="integers"):
        tiny_decoder.token2wav([1.5, 2.0])
    with pytest.raises(SpeechTokenError, match="integers"):
        tiny_decoder.token2wav(torch.tensor([1.0, 2.0]))
    with pytest.raises(SpeechTokenError, match="1-D"):
        tiny_decoder.token2wav(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(SpeechTokenError):
        tiny_decoder.token2wav("12 13")
    with pytest.raises(SpeechTokenError, match="-1"):
        tiny_decoder.token2wav([-1, 3])
    assert flow_tokens_from_llm_ids([65536, 65536 + 5119]) == [0, 5119]
    with pytest.raises(SpeechTokenError):
        flow_tokens_from_llm_ids([3, 65536])
    assert tiny_decoder.token2mel(torch.tensor([[7, 8, 9]])).shape[0] == 80      # [1, N] accepted
    assert issubclass(SpeechTokenError, InvalidRequestError)


def test_prompt_errors(tiny_decoder, speech_wav):
    wav, sr = read_wav(speech_wav)
    no_tokens = tiny_decoder.make_prompt(wav, sr)
    with pytest.raises(SpeakerPromptError, match="no prompt tokens"):
        tiny_decoder.token2wav([1, 2, 3], prompt=no_tokens)
    with pytest.raises(SpeakerPromptError, match="mel"):
        tiny_decoder.token2wav([1, 2, 3], prompt=SpeakerPrompt(torch.zeros(10, 40), torch.zeros(192), torch.tensor([1])))
    with pytest.raises(SpeakerPromptError, match="embedding"):
        tiny_decoder.token2wav([1], prompt=SpeakerPrompt(torch.zeros(10, 80), torch.zeros(100), torch.tensor([1])))
    with pytest.raises(SpeakerPromptError):
        tiny_decoder.token2wav([1], prompt="Tingting")
    with pytest.raises(AudioTooShortError, match="at least"):
        tiny_decoder.make_prompt(wav[:, :1000], sr)
    with pytest.raises(AudioInputError):
        tiny_decoder.make_prompt(wav, 4000)
    with pytest.raises(AudioInputError):
        tiny_decoder.make_prompt(np.full(30000, np.nan, np.float32), sr)
    with pytest.raises(InvalidRequestError, match="noise"):
        tiny_decoder.token2wav([1, 2, 3], noise=torch.zeros(80, 2))


def test_campplus_missing_or_broken(cosyvoice_dir, tmp_path, speech_wav, reference_kernels):
    d = str(tmp_path / "nocamp")
    shutil.copytree(cosyvoice_dir, d)
    (tmp_path / "nocamp" / "campplus.onnx").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="ONNX"):
        SpeechDecoder.from_pretrained(d, device="cpu", kernels=reference_kernels)
    dec = SpeechDecoder.from_pretrained(d, device="cpu", load_campplus=False, kernels=reference_kernels)
    wav, sr = read_wav(speech_wav)
    with pytest.raises(SpeakerPromptError, match="campplus"):
        dec.make_prompt(wav, sr)


def test_stream_misuse(tiny_decoder):
    st = tiny_decoder.open_stream(None, seed=0)
    st.finish()
    with pytest.raises(StreamClosedError):
        tiny_decoder.push(st, [1, 2])
    with pytest.raises(SpeechTokenError, match="without any tokens"):
        tiny_decoder.step_streams([st])
    with pytest.raises(SpeechTokenError):
        tiny_decoder.push(tiny_decoder.open_stream(), [99999])
    with pytest.raises(ConfigError, match="multiple of 5"):
        tiny_decoder.open_stream(config=StreamConfig(first_hop_tokens=7))


def test_warmup_captures_nothing_without_cuda(tiny_decoder):
    assert not tiny_decoder.hift_use_graphs and not tiny_decoder.solver.graphs_on("cpu")
    assert tiny_decoder.warmup(64) == 0
    asked = tiny_decoder.variant(cuda_graphs=True)      # graphs asked for, but there is no CUDA device
    assert not asked.hift_use_graphs and not asked.solver.graphs_on("cpu")
    assert asked.warmup(64) == 0


def test_variant_shares_weights_with_other_settings(tiny_decoder):
    base = tiny_decoder.solver
    v = tiny_decoder.variant(bucket_eager=True)
    assert v.flow is tiny_decoder.flow and v.hift is tiny_decoder.hift and v.campplus is tiny_decoder.campplus
    assert v.config is tiny_decoder.config and v.solver.estimator is base.estimator
    assert v.solver.bucket_eager and not base.bucket_eager                  # the original keeps its settings
    assert v.solver.fused == base.fused and v.solver.use_cuda_graphs == base.use_cuda_graphs
    u = v.variant(fused=False)
    assert not u.solver.fused and u.solver.bucket_eager and base.fused       # other settings carried over
    assert u.flow is tiny_decoder.flow


# ---------------------------------------------------------------- prompt length caps (bounded decode cost)
def test_prompt_audio_longer_than_the_cap_is_refused_before_any_work(tiny_decoder, tmp_path):
    assert tiny_decoder.max_prompt_seconds == 30.0 and tiny_decoder.max_prompt_tokens == 1251
    # one hour of int16 samples as a zero-stride view: refused from its shape, nothing converted
    hour = np.broadcast_to(np.int16(0), (3600 * 16000,))
    start = time.perf_counter()
    with pytest.raises(AudioInputError, match=r"3600.0 s, longer than max_prompt_seconds = 30 s"):
        tiny_decoder.make_prompt(hour, 16000)
    with pytest.raises(AudioInputError, match="max_prompt_seconds = 30 s"):
        tiny_decoder.make_prompt(torch.zeros(2, 31 * 48000), 48000)
    assert time.perf_counter() - start < 0.1
    # a file is refused from its header
    path = str(tmp_path / "long.wav")
    write_wav(path, np.zeros(31 * 16000, np.float32), 16000)
    with pytest.raises(AudioInputError, match=r"long.wav: 31.0 s of audio is longer than the limit of 30 s"):
        tiny_decoder.make_prompt(path)
    with pytest.raises(AudioInputError, match=r"1300 tokens, more than the 1251 of max_prompt_seconds = 30 s"):
        tiny_decoder.make_prompt(np.zeros(16000, np.float32), 16000, tokens=[0] * 1300)


def test_prompt_cap_is_an_argument_and_holds_for_prompts_built_elsewhere(tiny_decoder, speech_wav):
    d = tiny_decoder
    short = SpeechDecoder(d.config, d.flow, d.hift, d.campplus, "cpu", max_prompt_seconds=1.0)
    assert short.max_prompt_tokens == 42 and short.max_prompt_frames == 87
    wav, sr = read_wav(speech_wav)
    assert wav.shape[1] > 1.0 * sr
    with pytest.raises(AudioInputError, match="longer than max_prompt_seconds = 1 s"):
        short.make_prompt(wav, sr)
    prompt = short.make_prompt(wav[:, :sr], sr, tokens=list(range(41)))     # exactly 1 s fits
    assert prompt.mel.shape[0] <= short.max_prompt_frames
    # a SpeakerPrompt made elsewhere: 10**5 tokens or an hour of mel frames are refused at use
    emb = torch.zeros(192)
    huge = SpeakerPrompt(torch.zeros(50, 80), emb, torch.zeros(10 ** 5, dtype=torch.long))
    start = time.perf_counter()
    with pytest.raises(AudioInputError, match=r"100000 tokens, more than the 1251 of max_prompt_seconds = 30 s"):
        d.token2wav([1, 2, 3, 4, 5], prompt=huge, seed=0)
    with pytest.raises(AudioInputError, match="100000 tokens"):
        d.open_stream(huge)
    long_mel = SpeakerPrompt(torch.zeros(3600 * 87, 80), emb, torch.zeros(10, dtype=torch.long))
    with pytest.raises(AudioInputError, match=r"313200 mel frames, more than the 2584 of max_prompt_seconds"):
        d.token2wav([1, 2, 3, 4, 5], prompt=long_mel, seed=0)
    assert time.perf_counter() - start < 0.5
    for bad in (0, -1, float("nan"), float("inf"), "30", True):
        with pytest.raises(ConfigError, match="max_prompt_seconds must be a finite number of seconds"):
            SpeechDecoder(d.config, d.flow, d.hift, d.campplus, "cpu", max_prompt_seconds=bad)
