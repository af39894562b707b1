"""SpeechDecoder: Step-Audio speech tokens -> 22.05 kHz waveform (flow matching + HiFT), offline,
batched and streaming (SPEC.md §3, §6, §8).

    decoder = SpeechDecoder.from_pretrained("Step-Audio-TTS-3B/CosyVoice-300M-25Hz", device="cuda")
    prompt = decoder.make_prompt(wav, sample_rate, tokens=prompt_flow_tokens)   # once per speaker
    audio = decoder.token2wav(tokens, prompt=prompt, seed=0)                      # [samples] float32
    for chunk in decoder.stream(token_chunks, prompt=prompt, seed=0): ...

Tokens are flow ids in [0, 5120) (LLM id - 65536; `flow_tokens_from_llm_ids` converts). The flow
runs in bf16 on CUDA (as the official `flow.to(bfloat16)`), HiFT in float32. Randomness (ODE start
noise, SineGen phases and noise) comes from `seed` through position-indexed noise tapes, so a seeded
stream and the seeded offline decode share it; `noise` overrides the ODE start explicitly.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch

from ...kernels import KernelConfig
from ..device.graphs import bucket_length
from ..errors import (AudioInputError, AudioTooShortError, ConfigError, InvalidRequestError, SpeakerPromptError,
                      SpeechTokenError)
from ..frontend.audio_input import check_sample_rate, checked_audio
from ..frontend.mel import mel_spectrogram
from ..frontend.resample import resample
from ..frontend.wav import read_wav
from ..models.campplus import CampPlus
from ..models.cosyvoice_checkpoint import load_weights
from ..models.cosyvoice_config import CosyVoiceConfig, load_cosyvoice_config
from ..models.flow import FlowModel, FlowPrep, FlowRequest
from ..models.flow_solver import FlowSolver
from ..models.hift import HiFTGenerator, HiFTGraphs
from ..special_tokens import AUDIO_TOKEN_OFFSET, FLOW_VOCAB
from .decoder_stream import DecoderStream, StreamConfig, Window

SPEAKER_RATE = 16000            # CAM++ input rate
MIN_PROMPT_SECONDS = 0.1
# a voice prompt needs a few seconds; decode cost grows with the square of prompt + target
# length (a 5-minute prompt made a 2 s decode take 139 s), so longer prompts are refused
MAX_PROMPT_SECONDS = 30.0


def flow_tokens_from_llm_ids(ids) -> list[int]:
    """LLM audio ids (65536 + k) -> flow ids k; SpeechTokenError for anything that is not an audio id."""
    ids = _as_int_list(ids, "llm ids")
    bad = [i for i in ids if not AUDIO_TOKEN_OFFSET <= i < AUDIO_TOKEN_OFFSET + FLOW_VOCAB]
    if bad:
        raise SpeechTokenError(f"not speech-token LLM ids (expected {AUDIO_TOKEN_OFFSET}.."
                         f"{AUDIO_TOKEN_OFFSET + FLOW_VOCAB - 1}): {bad[:5]}")
    return [i - AUDIO_TOKEN_OFFSET for i in ids]


def _as_int_list(tokens, what: str) -> list[int]:
    if isinstance(tokens, torch.Tensor):
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise SpeechTokenError(f"{what} must be integers, got a {tokens.dtype} tensor")
        if tokens.dim() == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.dim() != 1:
            raise SpeechTokenError(f"{what} must be 1-D, got shape {list(tokens.shape)}")
        return [int(t) for t in tokens.tolist()]
    if isinstance(tokens, np.ndarray):
        if tokens.dtype.kind not in "iu":
            raise SpeechTokenError(f"{what} must be integers, got dtype {tokens.dtype}")
        return _as_int_list(torch.from_numpy(tokens.astype(np.int64)), what)
    if isinstance(tokens, (list, tuple)):
        for t in tokens:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise SpeechTokenError(f"{what} must be integers, got {type(t).__name__} {t!r}")
        return [int(t) for t in tokens]
    raise SpeechTokenError(f"{what} must be a list, numpy array or tensor of ints, got {type(tokens).__name__}")


@dataclass
class SpeakerPrompt:
    """A speaker prompt, built once: prompt mel [frames, 80] (22.05 kHz matcha mel), CAM++
    embedding [192], and the prompt's flow tokens [N] (from the tokenizer; may be set later with
    `with_tokens`). Prompt mel frames require prompt tokens."""
    mel: torch.Tensor
    embedding: torch.Tensor
    tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def with_tokens(self, tokens) -> "SpeakerPrompt":
        toks = torch.tensor(_as_int_list(tokens, "prompt tokens"), dtype=torch.long)
        return SpeakerPrompt(self.mel, self.embedding, toks)


class SpeechDecoder:
    def __init__(self, config: CosyVoiceConfig, flow: FlowModel, hift: HiFTGenerator, campplus: CampPlus | None,
                 device, cuda_graphs: bool = True, fused: bool = True, bucket_eager: bool = False,
                 max_prompt_seconds: float = MAX_PROMPT_SECONDS):
        """cuda_graphs: the pre-solve, the ODE solve and HiFT as CUDA graphs per length bucket (CUDA
        only); fused: the estimator's channels-last kernels and fused Euler steps (False: the plain
        modules, the reference); bucket_eager: pad eager solves to the buckets the graphs use;
        max_prompt_seconds: the longest speaker prompt accepted (audio, and the same length in
        prompt tokens and mel frames for a prompt built elsewhere)."""
        if isinstance(max_prompt_seconds, bool) or not isinstance(max_prompt_seconds, (int, float)) \
                or not MIN_PROMPT_SECONDS <= max_prompt_seconds < math.inf:
            raise ConfigError(f"max_prompt_seconds must be a finite number of seconds >= {MIN_PROMPT_SECONDS}, "
                              f"got {max_prompt_seconds!r}")
        self.max_prompt_seconds = float(max_prompt_seconds)
        self.config = config
        self.flow, self.hift, self.campplus = flow, hift, campplus
        self.device = torch.device(device)
        self.solver = FlowSolver(flow.estimator, config.flow.cfm, config.flow.output_size,
                                 use_cuda_graphs=cuda_graphs, fused=fused, bucket_eager=bucket_eager)
        self.flow_prep = FlowPrep(flow)
        self.hift_graphs = HiFTGraphs(hift)
        self.hift_use_graphs = bool(cuda_graphs) and self.device.type == "cuda"

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, cosyvoice_dir: str, device=None, flow_dtype: torch.dtype | None = None,
                        cuda_graphs: bool | None = None, fused: bool = True, load_campplus: bool = True,
                        campplus_threads: int = 1, kernels: KernelConfig = KernelConfig(),
                        bucket_eager: bool = False, max_prompt_seconds: float = MAX_PROMPT_SECONDS) -> "SpeechDecoder":
        """Load a released CosyVoice folder (cosyvoice.yaml, flow.pt, hift.pt, campplus.onnx).
        flow_dtype defaults to bf16 on CUDA, float32 on CPU; CUDA graphs default on for CUDA.
        campplus.onnx is optional (only make_prompt needs it). kernels: how the flow's and HiFT's
        kernels run (stepvox.kernels.KernelConfig)."""
        cfg = load_cosyvoice_config(cosyvoice_dir)
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if flow_dtype is None:
            flow_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        with torch.device("meta"):
            flow, hift = FlowModel(cfg.flow, kernels), HiFTGenerator(cfg.hift, kernels)
        load_weights(flow, os.path.join(cosyvoice_dir, "flow.pt"), device, flow_dtype).eval()
        load_weights(hift, os.path.join(cosyvoice_dir, "hift.pt"), device, torch.float32).eval()
        camp = None
        camp_path = os.path.join(cosyvoice_dir, "campplus.onnx")
        if load_campplus and os.path.isfile(camp_path):
            camp = CampPlus(camp_path, embed_dim=cfg.flow.spk_embed_dim, threads=campplus_threads)
        graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        return cls(cfg, flow, hift, camp, device, cuda_graphs=graphs, fused=fused, bucket_eager=bucket_eager,
                   max_prompt_seconds=max_prompt_seconds)

    def variant(self, cuda_graphs: bool | None = None, fused: bool | None = None,
                bucket_eager: bool | None = None) -> "SpeechDecoder":
        """A decoder sharing this one's weights with other settings (benchmarks compare them)."""
        return SpeechDecoder(self.config, self.flow, self.hift, self.campplus, self.device,
                             cuda_graphs=self.solver.use_cuda_graphs if cuda_graphs is None else cuda_graphs,
                             fused=self.solver.fused if fused is None else fused,
                             bucket_eager=self.solver.bucket_eager if bucket_eager is None else bucket_eager,
                             max_prompt_seconds=self.max_prompt_seconds)

    def warmup(self, max_frames: int, batch_sizes=(1,), min_frames: int = 1) -> int:
        """Capture the CUDA graphs of every length bucket in [min_frames, max_frames] (prompt + target
        mel frames for the flow, vocoded frames for HiFT) for each batch size, so no request pays a
        capture (~0.1-0.3 s) on the way. Returns the number of graphs held."""
        step = self.solver.bucket
        for b in batch_sizes:
            for length in range(bucket_length(min_frames, step), max_frames + step, step):
                for padded in (False, True):
                    self.solver.capture(b, length, padded, self.flow.dtype)
            if self.solver.graphs_on(self.device):      # pre-solve graphs for the likely token buckets
                tstep = self.flow_prep.token_bucket
                for length in range(bucket_length(min_frames, step), max_frames + step, step):
                    flow = self.config.flow
                    tokens = bucket_length(int(length * flow.input_frame_rate * flow.mel_hop_size
                                               / flow.mel_sampling_rate), tstep)
                    for tb in (tokens, tokens + tstep):
                        self.flow_prep.capture(b, tb, length)
            if self.hift_use_graphs:
                hstep = self.hift_graphs.bucket
                for frames in range(bucket_length(min_frames, hstep), max_frames + hstep, hstep):
                    self.hift_graphs.capture(b, frames)
        return self.solver.graph_count + self.flow_prep.graph_count + self.hift_graphs.graph_count

    def _run_hift(self, mel, start_phase, noise, phase_offset=None, phase_anchor=None, frames=None):
        """HiFT on a batch -> (waveform [B, T*256], cycles [B, H, T*256]). frames: each item's valid
        mel frames when the batch is right-padded to T (eager only; None or all T: unpadded); the
        CUDA graph of the frame bucket when graphs are on (same result as the eager forward up to
        float rounding)."""
        if self.hift_use_graphs and mel.is_cuda:
            return self.hift_graphs(mel, start_phase, noise, phase_offset, phase_anchor)
        padded = frames is not None and any(f != mel.shape[-1] for f in frames)
        valid = torch.tensor(frames, device=mel.device) if padded else None
        wav, _, cycles = self.hift(mel, start_phase, noise, phase_offset, phase_anchor, frames=valid)
        return wav, cycles

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def samples_per_token_frame(self) -> int:
        return self.config.hift.samples_per_frame

    # ------------------------------------------------------------------ prompts
    @property
    def max_prompt_tokens(self) -> int:
        """The prompt length cap in flow tokens (input_frame_rate tokens per second)."""
        return math.ceil(self.max_prompt_seconds * self.config.flow.input_frame_rate)

    @property
    def max_prompt_frames(self) -> int:
        """The prompt length cap in mel frames (what make_prompt gives for max_prompt_seconds)."""
        mel = self.config.mel
        return int(self.max_prompt_seconds * mel.sampling_rate) // mel.hop_size + 1

    def _check_prompt_length(self, count: int, unit: str, cap: int) -> None:
        if count > cap:
            raise AudioInputError(f"the speaker prompt has {count} {unit}, more than the {cap} of "
                                  f"max_prompt_seconds = {self.max_prompt_seconds:g} s")

    def make_prompt(self, wav, sample_rate: int | None = None, tokens=None) -> SpeakerPrompt:
        """Speaker prompt from prompt audio: a WAV path, or samples ([N] or [channels, N]) with their
        rate (16-192 kHz), at most `max_prompt_seconds` long (refused before anything is computed;
        a file from its header). Resampled to 22.05 kHz for the mel and 16 kHz for CAM++ with
        torchaudio's sinc filter, as the official preprocessing. tokens: the prompt's flow ids
        (tokenizer output - 65536, at most `max_prompt_tokens`); optional here, required before
        decoding with a prompt (`with_tokens`)."""
        if isinstance(wav, (str, os.PathLike)):
            wav, file_rate = read_wav(os.fspath(wav), max_seconds=self.max_prompt_seconds)
            if sample_rate is not None and int(sample_rate) != file_rate:
                raise AudioInputError(f"sample_rate {sample_rate} given for a {file_rate} Hz file")
            sample_rate = file_rate
        if sample_rate is None:
            raise AudioInputError("sample_rate is required for raw samples")
        sample_rate = check_sample_rate(sample_rate)
        length = wav.shape[-1] if isinstance(wav, (torch.Tensor, np.ndarray)) and wav.ndim else 0
        if length > self.max_prompt_seconds * sample_rate:
            raise AudioInputError(f"prompt audio is {length / sample_rate:.1f} s, longer than max_prompt_seconds = "
                                  f"{self.max_prompt_seconds:g} s")
        if tokens is not None and hasattr(tokens, "__len__"):
            self._check_prompt_length(len(tokens), "tokens", self.max_prompt_tokens)
        wav, sr = checked_audio(wav, sample_rate)
        if wav.numel() < MIN_PROMPT_SECONDS * sr:
            raise AudioTooShortError(f"prompt audio is {wav.numel() / sr:.3f} s; need at least {MIN_PROMPT_SECONDS} s")
        if self.campplus is None:
            raise SpeakerPromptError("this decoder was loaded without campplus.onnx: pass a SpeakerPrompt built "
                              "elsewhere (e.g. from the common CosyVoice folder)")
        mel = mel_spectrogram(resample(wav, sr, self.config.mel.sampling_rate), self.config.mel)[0].T.contiguous()
        emb = self.campplus.embed(resample(wav, sr, SPEAKER_RATE))
        toks = torch.tensor(self._check_tokens(tokens, "prompt tokens", allow_empty=True), dtype=torch.long)
        return SpeakerPrompt(mel=mel, embedding=emb, tokens=toks)

    def _prompt_tensors(self, prompt: SpeakerPrompt | None):
        cfg = self.config.flow
        if prompt is None:
            return (torch.zeros(0, dtype=torch.long, device=self.device),
                    torch.zeros(0, cfg.output_size, device=self.device),
                    torch.zeros(cfg.spk_embed_dim, device=self.device))
        if not isinstance(prompt, SpeakerPrompt):
            raise SpeakerPromptError(f"prompt must be a SpeakerPrompt, got {type(prompt).__name__}")
        mel, emb = prompt.mel, prompt.embedding
        if not isinstance(mel, torch.Tensor) or not isinstance(emb, torch.Tensor):
            raise SpeakerPromptError("the prompt mel and embedding must be tensors")
        self._check_prompt_length(mel.shape[0] if mel.dim() else 0, "mel frames", self.max_prompt_frames)
        if hasattr(prompt.tokens, "__len__"):
            self._check_prompt_length(len(prompt.tokens), "tokens", self.max_prompt_tokens)
        if mel.dim() != 2 or mel.shape[1] != cfg.output_size:
            raise SpeakerPromptError(f"prompt mel must be [frames, {cfg.output_size}], got {list(mel.shape)}")
        if emb.numel() != cfg.spk_embed_dim:
            raise SpeakerPromptError(f"prompt embedding must have {cfg.spk_embed_dim} values, got {emb.numel()}")
        if not (torch.isfinite(mel).all() and torch.isfinite(emb).all()):
            raise SpeakerPromptError("the prompt mel or embedding holds NaN/inf values")
        toks = self._check_tokens(prompt.tokens, "prompt tokens", allow_empty=True)
        if mel.shape[0] > 0 and not toks:
            raise SpeakerPromptError("the prompt has mel frames but no prompt tokens: set them with "
                                     "prompt.with_tokens(...)")
        if toks and mel.shape[0] == 0:
            raise SpeakerPromptError("the prompt has tokens but no mel frames")
        return (torch.tensor(toks, dtype=torch.long, device=self.device), mel.float().to(self.device),
                emb.float().reshape(-1).to(self.device))

    def _check_tokens(self, tokens, what: str = "tokens", allow_empty: bool = False) -> list[int]:
        if tokens is None:
            if allow_empty:
                return []
            raise SpeechTokenError(f"{what} are missing")
        toks = _as_int_list(tokens, what)
        if not toks and not allow_empty:
            raise SpeechTokenError(f"{what} are empty")
        vocab = self.config.flow.vocab_size
        bad = [t for t in toks if not 0 <= t < vocab]
        if bad:
            hint = (f" (LLM ids? subtract {AUDIO_TOKEN_OFFSET}, see flow_tokens_from_llm_ids)"
                    if all(AUDIO_TOKEN_OFFSET <= t < AUDIO_TOKEN_OFFSET + vocab for t in bad) else "")
            raise SpeechTokenError(f"{what} outside the flow vocabulary [0, {vocab}): {bad[:5]}{hint}")
        return toks

    # ------------------------------------------------------------------ offline
    def _seed(self, seed: int | None) -> int:
        return random.randrange(2 ** 62) if seed is None else int(seed)

    def _requests(self, token_lists, prompts, seeds, noises) -> tuple[list[FlowRequest], list[DecoderStream]]:
        reqs, streams = [], []
        for toks, prompt, seed, noise in zip(token_lists, prompts, seeds, noises):
            st = self.open_stream(prompt, seed)
            st.push(self._check_tokens(toks))
            st.finish()
            fields = st.flow_inputs(Window(0, len(st.tokens), final=True))   # offline: one window
            if noise is not None:
                noise = torch.as_tensor(noise, device=self.device)
                need = st.prompt_frames + fields["mel_len"]
                if noise.dim() != 2 or noise.shape[0] != self.config.flow.output_size or noise.shape[1] < need:
                    raise InvalidRequestError(f"noise must be [{self.config.flow.output_size}, >= {need}] "
                                             f"(prompt + target mel frames), got {list(noise.shape)}")
                fields["noise"] = noise.float()
            reqs.append(FlowRequest(**fields))
            streams.append(st)
        return reqs, streams

    @torch.no_grad()
    def token2mel(self, tokens, prompt: SpeakerPrompt | None = None, noise=None,
                  seed: int | None = None) -> torch.Tensor:
        """Flow only: [80, mel frames] float32 on the device."""
        reqs, _ = self._requests([tokens], [prompt], [self._seed(seed)], [noise])
        return self.flow.generate(reqs, self.solver, self.flow_prep)[0][0]

    @torch.no_grad()
    def mel2wav(self, mel: torch.Tensor, seed: int | None = None, source_noise=None, start_phase=None) -> torch.Tensor:
        """HiFT only: mel [80, T] (or [B, 80, T]) -> waveform [T*256] (or [B, T*256]) float32.
        source_noise [.., 9, T*256] / start_phase [.., 9] override the seeded SineGen randomness."""
        single = mel.dim() == 2
        mel = (mel[None] if single else mel).float().to(self.device)
        b, _, t = mel.shape
        h, n = self.hift.harmonics, t * self.samples_per_token_frame
        streams = [self.open_stream(None, self._seed(seed) + i) for i in range(b)]
        noise = torch.stack([s.source_tape.take(0, n) for s in streams]) if source_noise is None else \
            torch.as_tensor(source_noise, device=self.device).float().reshape(b, h, n)
        phase = torch.stack([s.start_phase for s in streams]) if start_phase is None else \
            torch.as_tensor(start_phase, device=self.device).float().reshape(b, h)
        wav = self._run_hift(mel, phase, noise)[0]
        return wav[0] if single else wav

    @torch.no_grad()
    def token2wav(self, tokens, prompt: SpeakerPrompt | None = None, noise=None,
                  seed: int | None = None) -> torch.Tensor:
        """Offline decode of one utterance -> waveform [G(N) * 256] float32 on the device."""
        return self.token2wav_batch([tokens], [prompt], [seed], [noise])[0]

    @torch.no_grad()
    def token2wav_batch(self, token_lists, prompts=None, seeds=None, noises=None) -> list[torch.Tensor]:
        """Several utterances decoded together: one encoder batch, one padded ODE solve; HiFT
        batches utterances of equal mel length (padding would change its edge samples)."""
        n = len(token_lists)
        if n == 0:
            return []
        prompts = prompts if prompts is not None else [None] * n
        seeds = [self._seed(s) for s in (seeds if seeds is not None else [None] * n)]
        noises = noises if noises is not None else [None] * n
        if not len(prompts) == len(seeds) == len(noises) == n:
            raise InvalidRequestError("token_lists, prompts, seeds and noises must have the same length")
        reqs, streams = self._requests(token_lists, prompts, seeds, noises)
        mels, _ = self.flow.generate(reqs, self.solver, self.flow_prep)
        jobs = [(st, st.hift_inputs(mel), mel) for st, mel in zip(streams, mels)]
        outs = self._vocode(jobs, final=True)
        return outs

    def _vocode(self, jobs, final) -> list[torch.Tensor]:
        """jobs: (stream, hift_inputs, piece) -> emitted chunks; final: one flag for all jobs, or one per job.
        Eager HiFT runs every job in one batch, right-padded with per-item frame masks (HiFTGenerator's
        `frames`); HiFT graphs take equal lengths only, so there equal-length jobs share a batch."""
        results: list = [None] * len(jobs)
        groups: dict[int, list[int]] = {}
        for i, (_, inp, _) in enumerate(jobs):
            key = inp["mel"].shape[1] if self.hift_use_graphs else 0
            groups.setdefault(key, []).append(i)
        for idxs in groups.values():
            ins = [jobs[i][1] for i in idxs]
            frames = [x["mel"].shape[1] for x in ins]
            wav, cycles = self._run_hift(_padded_stack([x["mel"].float() for x in ins]),
                                         torch.stack([x["start_phase"] for x in ins]),
                                         _padded_stack([x["noise"] for x in ins]),
                                         torch.stack([x["phase_offset"] for x in ins]),
                                         torch.tensor([x["phase_anchor"] for x in ins], device=self.device),
                                         frames=frames)
            for k, i in enumerate(idxs):
                n = frames[k] * self.samples_per_token_frame
                results[i] = jobs[i][0].take_wav(ins[k]["mel"], wav[k, :n], cycles[k, :, :n],
                                                 final if isinstance(final, bool) else final[i])
        return results

    # ------------------------------------------------------------------ streaming
    def open_stream(self, prompt: SpeakerPrompt | None = None, seed: int | None = None,
                    config: StreamConfig | None = None) -> DecoderStream:
        toks, mel, emb = self._prompt_tensors(prompt)
        return DecoderStream(prompt_tokens=toks, prompt_mel=mel, speaker=emb, seed=self._seed(seed),
                             config=config or StreamConfig(), mel_frames=self.config.flow.mel_frames,
                             samples_per_frame=self.samples_per_token_frame,
                             mel_channels=self.config.flow.output_size, harmonics=self.hift.harmonics,
                             device=self.device)

    def checked_tokens(self, tokens) -> list[int]:
        """`tokens` as a list of flow ids (any count, none included); SpeechTokenError otherwise."""
        return self._check_tokens(tokens, allow_empty=True)

    def push(self, stream: DecoderStream, tokens) -> None:
        """Validate and queue tokens on a stream (any count; windows are cut in 5-token groups)."""
        stream.push(self.checked_tokens(tokens))

    @torch.no_grad()
    def decode_windows(self, streams: list[DecoderStream]) -> list[list[torch.Tensor]]:
        """One round: the next ready window of each of `streams` (streams without one are skipped),
        all windows in one padded flow batch and their mel in one HiFT batch (one per length under
        HiFT graphs, which take equal lengths). Returns, per stream, the audio chunks (float32 on
        the device) this round emitted. A cross-stream scheduler (decoder_scheduler.py) calls this
        with the streams it picked; `step_streams` repeats it until nothing is ready."""
        _check_streams(streams)
        out: list[list[torch.Tensor]] = [[] for _ in streams]
        ready = [(i, st, st.pending_window()) for i, st in enumerate(streams)]
        ready = [(i, st, w) for i, st, w in ready if w is not None]
        if not ready:
            return out
        reqs = [FlowRequest(**st.flow_inputs(w)) for _, st, w in ready]
        mels, mus = self.flow.generate(reqs, self.solver, self.flow_prep)
        jobs, finals = [], []
        for (_, st, w), mel, mu in zip(ready, mels, mus):
            piece = st.take_mel(w, mel, mu)
            jobs.append((st, st.hift_inputs(piece), piece))
            finals.append(w.final)
        for (i, _, _), chunk in zip(ready, self._vocode(jobs, finals)):
            if chunk.numel():
                out[i].append(chunk)
        return out

    @torch.no_grad()
    def step_streams(self, streams: list[DecoderStream]) -> list[list[torch.Tensor]]:
        """Decode every window that is ready on any of `streams`, batched across streams (rounds of
        `decode_windows`). Returns, per stream, the audio chunks (float32 on the device) emitted."""
        _check_streams(streams)
        out: list[list[torch.Tensor]] = [[] for _ in streams]
        while any(st.pending_window() is not None for st in streams):
            for mine, chunks in zip(out, self.decode_windows(streams)):
                mine.extend(chunks)
        return out

    def stream(self, token_chunks: Iterable, prompt: SpeakerPrompt | None = None, seed: int | None = None,
               config: StreamConfig | None = None) -> Iterator[torch.Tensor]:
        """Streaming token2wav: consume token chunks as they arrive, yield audio chunks (float32 on
        the device). Concatenated, they cover the same G(N) * 256 samples as token2wav."""
        st = self.open_stream(prompt, seed, config)
        for chunk in token_chunks:
            self.push(st, chunk)
            yield from self.step_streams([st])[0]
        st.finish()
        yield from self.step_streams([st])[0]


def _check_streams(streams: list[DecoderStream]) -> None:
    """A stream's windows depend on the previous one, so one call takes each stream once."""
    if len({id(st) for st in streams}) != len(streams):
        raise InvalidRequestError("a decoder stream is listed twice in one call")
    for st in streams:
        if st.finished and not st.tokens:
            raise SpeechTokenError("a stream was finished without any tokens")


def _padded_stack(items: list[torch.Tensor]) -> torch.Tensor:
    """[C, T_i] tensors -> [B, C, max T] with zeros past each item's end."""
    length = max(t.shape[-1] for t in items)
    if all(t.shape[-1] == length for t in items):
        return torch.stack(items)
    out = items[0].new_zeros(len(items), items[0].shape[0], length)
    for i, t in enumerate(items):
        out[i, :, :t.shape[-1]] = t
    return out
