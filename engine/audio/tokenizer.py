"""Step-Audio's dual-codebook audio tokenizer: vq02 (linguistic, Paraformer encoder + k-means,
16.7 Hz) and vq06 (semantic, S3 tokenizer v1, 25 Hz), interleaved 2:3 into LLM token ids.

    tok = AudioTokenizer.from_pretrained("/models/Step-Audio-Tokenizer", device="cuda")
    ids = tok.encode(wav, 48000)                    # [65536 + vq02, ..., 66560 + vq06, ...]
    out = tok.tokenize(wav, 48000)                  # .vq02, .vq06, .ids, .text ("<audio_N>..." form)
    batch = tok.encode_batch([w1, w2], [16000, 44100])
    stream = tok.stream("call-17", 48000)           # live audio, any piece sizes
    update = stream.feed(piece)                     # .vq02 new every 240 ms; .vq06/.ids per 30 s
    update = stream.finish()                        # or tok.abort("call-17"): dropped, no output
    tok = AudioTokenizer.from_pretrained(folder, asr=True)
    text = tok.transcriber.transcribe(wav, 48000).text    # the Paraformer's own ASR (transcriber.py)

Offline = Step-Audio's `wav2token`: resample to 16 kHz, peak-normalise (on by default), optional
silence trim (off by default, as for chat input; the TTS prompt path turns it on), vq02 from the
encoder run in Step-Audio's 240 ms chunk mode, vq06 from independent <= 30 s pieces.

The tokenizer runs the front ends (engine/frontend/: Paraformer fbank + LFR + CMVN, Whisper mel)
and hands their output to the two code models, each of which owns its batching, buckets and
CUDA graphs (`use_cuda_graphs`): `LinguisticTokenizer` (models/paraformer.py: the whole Paraformer
over the windows of all utterances + vq02 search) and `SemanticTokenizer` (models/s3tokenizer.py:
the S3 encoder + vq06 search per batch of pieces, replayed on a side stream, joined before the
Paraformer runs: see `codes`). Graphs
are captured on first use of their bucket (`warmup` captures ahead). Host work per call: the front
ends, metadata copies without syncs, and one `.tolist()` at the end.

Streaming: vq02 codes come out per 240 ms of audio and equal the offline codes; vq06 codes of a
30 s piece exist once the piece is complete (the S3 encoder attends over the whole piece), so ids
come out per 30 s piece and at `finish()`. A stream cannot peak-normalise (the peak is unknown
until the end), so it applies no normalisation: its codes equal
`tokenize(audio, sr, energy_norm=False)` of the whole audio. Normalise live input upstream (AGC)
if needed.

Sessions end with `finish()` (last codes), `close(session)` or `abort(session)` (dropped at once,
no more output). A session not fed for `stream_idle_timeout_s` (default 300 s) is dropped too,
so a client that vanishes does not hold its state forever: every `stream()` / `feed()` call
checks the open sessions (no background thread), and a later feed on a dropped one raises
StreamClosedError saying why.
"""
from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ...kernels import KernelConfig
from ..errors import (AudioInputError, AudioTooShortError, CheckpointError, ConfigError, InvalidRequestError,
                      StreamClosedError)
from ..frontend.audio_input import check_sample_rate, to_mono_float
from ..frontend.paraformer_features import ParaformerFeatures
from ..frontend.preprocess import TOKENIZER_SAMPLE_RATE, prepare_batch
from ..frontend.resample import StreamingResampler
from ..frontend.whisper_mel import HOP as MEL_HOP, whisper_log_mel
from ..models.paraformer import PARAFORMER_SUBDIR, LinguisticTokenizer, load_paraformer
from ..models.paraformer_asr import ParaformerRecognizer, load_recognizer
from ..models.s3tokenizer import (MIN_PIECE_SAMPLES, PIECE_SAMPLES, SemanticTokenizer, load_s3_tokenizer,
                                  split_pieces)
from ..special_tokens import AUDIO_TOKEN_OFFSET, VQ02_CODES, VQ06_CODES, VQ06_OFFSET, audio_token_str
from .transcriber import Transcriber

VQ02_PER_GROUP = 2
VQ06_PER_GROUP = 3
STREAM_IDLE_TIMEOUT_S = 300.0


def num_groups(n_vq02: int, n_vq06: int) -> int:
    return min(n_vq02 // VQ02_PER_GROUP, n_vq06 // VQ06_PER_GROUP)


def interleave(vq02: list[int], vq06: list[int], start_group: int = 0) -> list[int]:
    """LLM ids of groups [start_group, n): 2 vq02 ids (65536 + c) then 3 vq06 ids (66560 + c);
    a trailing remainder that does not fill a group is dropped, as Step-Audio does."""
    ids = []
    for g in range(start_group, num_groups(len(vq02), len(vq06))):
        ids += [AUDIO_TOKEN_OFFSET + c for c in vq02[g * 2:g * 2 + 2]]
        ids += [VQ06_OFFSET + c for c in vq06[g * 3:g * 3 + 3]]
    return ids


def ids_to_text(ids: list[int]) -> str:
    """The `<audio_N>` string form (N = id - 65536), each piece one token of the LLM vocabulary."""
    return "".join(audio_token_str(i - AUDIO_TOKEN_OFFSET) for i in ids)


@dataclass
class TokenizerOutput:
    vq02: list[int]
    vq06: list[int]
    ids: list[int] = field(default_factory=list)

    @property
    def text(self) -> str:
        return ids_to_text(self.ids)


@dataclass
class StreamUpdate:
    """What one `feed`/`finish` call produced: new codes of each codebook and new complete groups."""
    vq02: list[int] = field(default_factory=list)
    vq06: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)


class AudioTokenizer:
    def __init__(self, linguistic: LinguisticTokenizer, features: ParaformerFeatures, semantic: SemanticTokenizer,
                 stream_idle_timeout_s: float = STREAM_IDLE_TIMEOUT_S,
                 recognizer: ParaformerRecognizer | None = None):
        """stream_idle_timeout_s: a live stream not fed for this long is dropped (math.inf: never);
        recognizer: the Paraformer's predictor, decoder and vocabulary, for `transcriber`."""
        if isinstance(stream_idle_timeout_s, bool) or not isinstance(stream_idle_timeout_s, (int, float)) \
                or not stream_idle_timeout_s > 0:
            raise ConfigError(f"stream_idle_timeout_s must be a number of seconds > 0, got {stream_idle_timeout_s!r}")
        self.stream_idle_timeout_s = float(stream_idle_timeout_s)
        self.linguistic = linguistic
        self.features = features
        self.semantic = semantic
        self.recognizer = recognizer
        self._transcriber: Transcriber | None = None
        self.device = linguistic.device
        self._streams: dict[str, TokenizerStream] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, tokenizer_dir: str | os.PathLike, device="cpu", dtype=torch.float32,
                        s3_dtype: torch.dtype | None = None, cache_converted: bool = True,
                        use_cuda_graphs: bool = True, tf32: bool = False, bucket_eager: bool = False,
                        kernels: KernelConfig = KernelConfig(),
                        stream_idle_timeout_s: float = STREAM_IDLE_TIMEOUT_S, asr: bool = False) -> "AudioTokenizer":
        """Load the released Step-Audio-Tokenizer folder: the FunASR Paraformer subfolder
        (config.yaml, am.mvn, model.pt encoder tensors), linguistic_tokenizer.npy and
        speech_tokenizer_v1.onnx (initializers converted to the native module; with
        `cache_converted`, kept beside it as safetensors). `dtype` is the compute dtype of both
        encoders (`s3_dtype` overrides it for the S3 encoder); the code searches run in float32.
        `tf32` (off by default) lets float32 encoders' matrix products use TF32 tensor cores;
        `bucket_eager` pads eager runs to the buckets the CUDA graphs use; `kernels` says how the
        kernels run (stepvox.kernels.KernelConfig); `stream_idle_timeout_s` when a forgotten live
        stream is dropped. `asr` also loads the Paraformer's CIF predictor, decoder and tokens.json
        (same model.pt; the encoder is shared) for `transcriber`; CheckpointError if the folder
        has none."""
        root = os.fspath(tokenizer_dir)
        device = torch.device(device)
        para_dir = os.path.join(root, PARAFORMER_SUBDIR)
        if not os.path.isdir(para_dir):
            raise CheckpointError(f"missing Paraformer folder {para_dir}")
        encoder, features = load_paraformer(para_dir, device=device, dtype=dtype, kernels=kernels)
        recognizer = load_recognizer(para_dir, encoder.cfg, device=device, dtype=dtype) if asr else None
        npy = os.path.join(root, "linguistic_tokenizer.npy")
        try:
            codebook = np.load(npy, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {npy}: {exc}") from exc
        if codebook.ndim != 2 or codebook.shape[1] != encoder.cfg.output_size or codebook.shape[0] > VQ02_CODES:
            raise CheckpointError(
                f"{npy}: codebook shape {codebook.shape}, expected [<= {VQ02_CODES}, {encoder.cfg.output_size}]")
        s3 = load_s3_tokenizer(os.path.join(root, "speech_tokenizer_v1.onnx"), device=device,
                               dtype=s3_dtype or dtype, cache=cache_converted, kernels=kernels)
        if s3.cfg.codebook_size > VQ06_CODES:
            raise CheckpointError(f"S3 codebook has {s3.cfg.codebook_size} rows, the LLM has {VQ06_CODES} ids")
        graphs = dict(use_cuda_graphs=use_cuda_graphs, bucket_eager=bucket_eager, tf32=tf32)
        linguistic = LinguisticTokenizer(encoder, torch.from_numpy(codebook.astype(np.float32)), **graphs)
        return cls(linguistic, features, SemanticTokenizer(s3, **graphs), stream_idle_timeout_s=stream_idle_timeout_s,
                   recognizer=recognizer)

    def variant(self, use_cuda_graphs: bool | None = None, bucket_eager: bool | None = None) -> "AudioTokenizer":
        """A tokenizer sharing this one's models with other run settings (benchmarks compare them)."""
        settings = dict(use_cuda_graphs=self.linguistic.use_cuda_graphs if use_cuda_graphs is None else use_cuda_graphs,
                        bucket_eager=self.linguistic.bucket_eager if bucket_eager is None else bucket_eager,
                        tf32=self.linguistic.tf32)
        return AudioTokenizer(LinguisticTokenizer(self.linguistic.encoder, self.linguistic.codebook, **settings),
                              self.features, SemanticTokenizer(self.semantic.model, **settings),
                              stream_idle_timeout_s=self.stream_idle_timeout_s, recognizer=self.recognizer)

    @property
    def transcriber(self) -> Transcriber:
        """Speech recognition over this tokenizer's encoder and front end (ConfigError unless it
        was loaded with `asr=True`)."""
        if self._transcriber is None:
            self._transcriber = Transcriber(self)
        return self._transcriber

    @property
    def graph_count(self) -> int:
        return self.linguistic.graph_count + self.semantic.graph_count

    # ------------------------------------------------------------------ codes
    def _features(self, wavs16k: list[torch.Tensor]):
        return tuple(zip(*(self.features.offline(w.to(self.device)) for w in wavs16k))) if wavs16k else ((), ())

    def _mels(self, pieces: list[torch.Tensor]) -> list[torch.Tensor]:
        return [whisper_log_mel(p.to(self.device), self.semantic.model.cfg.n_mels) for p in pieces]

    @staticmethod
    def _pieces(wavs16k: list[torch.Tensor]):
        """The <= 30 s pieces of utterances and, per utterance, the indices of its pieces."""
        pieces, owner = [], []
        for i, w in enumerate(wavs16k):
            for p in split_pieces(w):
                pieces.append(p)
                owner.append(i)
        return pieces, [[j for j, o in enumerate(owner) if o == i] for i in range(len(wavs16k))]

    @torch.inference_mode()
    def codes(self, wavs16k: list[torch.Tensor]) -> tuple[list[list[int]], list[list[int]]]:
        """(vq02, vq06) codes of 16 kHz utterances: both front ends, the S3 graphs, then the
        Paraformer graph, then one host sync. The two run one after the other, not side by side:
        graphs captured on torch's one default capture stream share a cuBLAS workspace, and on
        released-size folders their overlapping replays hung the GPU (H100, 2026-12-06; confirm
        with bench/check_tok_hang.py)."""
        feats, counts = self._features(wavs16k)
        pieces, owned = self._pieces(wavs16k)
        vq06, _ = self.semantic.launch(self._mels(pieces), wait=True) if pieces else ([], None)
        vq02, spans = self.linguistic.launch(feats, counts)
        parts = ([vq02[a:a + n] for a, n in spans] if vq02 is not None else []) + vq06
        flat = torch.cat(parts).tolist() if parts else []
        out02, at = [], 0
        for _, n in spans:
            out02.append(flat[at:at + n] if vq02 is not None else [])
            at += n if vq02 is not None else 0
        piece_codes = []
        for c in vq06:
            piece_codes.append(flat[at:at + c.numel()])
            at += c.numel()
        out06 = [sum((piece_codes[j] for j in js), []) for js in owned]
        return out02, out06

    @torch.inference_mode()
    def vq02_codes(self, wavs16k: list[torch.Tensor]) -> list[list[int]]:
        """Linguistic codes of 16 kHz utterances, all encoded in one batched pass."""
        vq02, spans = self.linguistic.launch(*self._features(wavs16k))
        flat = vq02.tolist() if vq02 is not None else []
        return [flat[a:a + n] for a, n in spans]

    @torch.inference_mode()
    def vq06_codes(self, wavs16k: list[torch.Tensor]) -> list[list[int]]:
        """Semantic codes of 16 kHz utterances: <= 30 s pieces of all utterances in shared batches."""
        pieces, owned = self._pieces(wavs16k)
        codes = self.semantic.launch(self._mels(pieces))[0] if pieces else []
        flat = torch.cat(codes).tolist() if codes else []
        starts = np.cumsum([0] + [c.numel() for c in codes]).tolist()
        return [sum((flat[starts[j]:starts[j + 1]] for j in js), []) for js in owned]

    @torch.inference_mode()
    def warmup(self, max_seconds: float = 30.0, batch_sizes=(1,)) -> int:
        """Capture ahead the offline graphs that calls of up to `max_seconds` per utterance and
        the given batch sizes use (Paraformer window buckets; S3 length buckets of padded
        batches, the common case). Returns the number of graphs held. No-op without graphs."""
        windows_per_s = TOKENIZER_SAMPLE_RATE / self.features.cfg.chunk_samples
        piece_frames = int(min(max_seconds, PIECE_SAMPLES / TOKENIZER_SAMPLE_RATE) * TOKENIZER_SAMPLE_RATE) // MEL_HOP
        for b in batch_sizes:
            self.linguistic.warmup(int(np.ceil(b * max_seconds * windows_per_s)) + 1)
            pieces = b * max(1, int(np.ceil(max_seconds * TOKENIZER_SAMPLE_RATE / PIECE_SAMPLES)))
            self.semantic.warmup(piece_frames, pieces)
        return self.graph_count

    # ------------------------------------------------------------------ offline API
    def tokenize_batch(self, wavs, sample_rates, *, energy_norm: bool = True, trim: bool = False,
                       allow_empty: bool = False) -> list[TokenizerOutput]:
        """Codes and ids of many utterances of any lengths in one batched call; each result equals
        the result of tokenizing that utterance alone. `sample_rates` is one rate or one per wav."""
        prepared = prepare_batch(wavs, sample_rates, energy_norm=energy_norm, trim=trim, device=self.device)
        vq02, vq06 = self.codes(prepared)
        outputs = [TokenizerOutput(a, b, interleave(a, b)) for a, b in zip(vq02, vq06)]
        short = [i for i, o in enumerate(outputs) if not o.ids]
        if short and not allow_empty:
            details = ", ".join(f"#{i} ({prepared[i].numel() / TOKENIZER_SAMPLE_RATE:.3f} s)" for i in short)
            raise AudioTooShortError(f"audio too short for one 120 ms token group: {details}")
        return outputs

    def tokenize(self, wav, sample_rate, *, energy_norm: bool = True, trim: bool = False,
                 allow_empty: bool = False) -> TokenizerOutput:
        return self.tokenize_batch([wav], [sample_rate], energy_norm=energy_norm, trim=trim,
                                   allow_empty=allow_empty)[0]

    def encode(self, wav, sample_rate, **kwargs) -> list[int]:
        """LLM token ids (interleaved 2 vq02 + 3 vq06 per 120 ms) of one utterance."""
        return self.tokenize(wav, sample_rate, **kwargs).ids

    def encode_batch(self, wavs, sample_rates, **kwargs) -> list[list[int]]:
        return [o.ids for o in self.tokenize_batch(wavs, sample_rates, **kwargs)]

    def encode_to_text(self, wav, sample_rate, **kwargs) -> str:
        """The `<audio_N>...` string form Step-Audio puts into chat prompts."""
        return self.tokenize(wav, sample_rate, **kwargs).text

    # ------------------------------------------------------------------ streaming API
    def stream(self, session: str | None = None, sample_rate: int | None = None) -> "TokenizerStream":
        """The live stream of `session`: created on first use (at `sample_rate`, None meaning 16 kHz;
        any other value must pass the audio rate policy), returned again by later calls with the
        same id, forgotten after `finish`, `close`, `abort` or `stream_idle_timeout_s` unfed.
        `session=None` gives an unregistered stream."""
        if session is not None and not isinstance(session, str):
            raise InvalidRequestError(f"a stream session id must be a string, got {type(session).__name__}")
        rate = TOKENIZER_SAMPLE_RATE if sample_rate is None else check_sample_rate(sample_rate)
        self._drop_idle()
        with self._lock:
            existing = self._streams.get(session) if session is not None else None
            if existing is not None:
                if sample_rate is not None and rate != existing.sample_rate:
                    raise AudioInputError(f"stream {session!r} is open at {existing.sample_rate} Hz, not {rate}")
                existing.touch()
                return existing
            s = TokenizerStream(self, session, rate)
            if session is not None:
                self._streams[session] = s
        return s

    def open_sessions(self) -> list[str]:
        self._drop_idle()
        with self._lock:
            return list(self._streams)

    def close(self, session: str) -> bool:
        """Forget `session` at once: its state is released and it gives no more output (a later
        feed raises StreamClosedError). False when no such session is open."""
        return self._end(session, "closed")

    def abort(self, session: str) -> bool:
        """Cancel `session`: as `close`, for a request given up (its feed raises "aborted")."""
        return self._end(session, "aborted")

    def _end(self, session: str, why: str) -> bool:
        with self._lock:
            stream = self._streams.pop(session, None)
        if stream is None:
            return False
        stream.release(why)
        return True

    def _drop_idle(self) -> None:
        """Drop the sessions unfed for stream_idle_timeout_s (run on every stream/feed call)."""
        if math.isinf(self.stream_idle_timeout_s):
            return
        deadline = time.monotonic() - self.stream_idle_timeout_s
        with self._lock:
            idle = [k for k, st in self._streams.items() if st.last_used < deadline and not st._busy]
            dropped = [self._streams.pop(k) for k in idle]
        for st in dropped:
            st.release(st._idle_reason())

    def _forget(self, stream: "TokenizerStream") -> None:
        # only this stream: its id may since have been given to a new one
        with self._lock:
            if self._streams.get(stream.session) is stream:
                del self._streams[stream.session]


class TokenizerStream:
    """One live audio stream. Not thread-safe: feed it from one thread at a time."""

    def __init__(self, tokenizer: AudioTokenizer, session: str | None, sample_rate: int):
        self.tokenizer = tokenizer
        self.session = session
        self.sample_rate = check_sample_rate(sample_rate)
        dev = tokenizer.device
        self.resampler = StreamingResampler(self.sample_rate, TOKENIZER_SAMPLE_RATE, device=dev)
        self.features = tokenizer.features.stream()
        self.encoder = tokenizer.linguistic.stream()
        self.piece = torch.zeros(0, device=dev)         # 16 kHz samples of the current S3 piece
        self.vq02: list[int] = []
        self.vq06: list[int] = []
        self.groups = 0
        self.closed_as: str | None = None           # why it takes no more audio
        self.last_used = time.monotonic()
        # close/abort may come from another thread while a feed runs: the state is let go
        # when that feed ends, and its output is dropped
        self._state_lock = threading.Lock()
        self._busy = False

    @property
    def closed(self) -> bool:
        return self.closed_as is not None

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def release(self, why: str) -> None:
        """No more output: mark why, and let go of the audio and model state it holds."""
        with self._state_lock:
            if self.closed_as is None:
                self.closed_as = why
            if not self._busy:
                self._drop_state()

    def _drop_state(self) -> None:
        self.resampler = self.features = self.encoder = self.piece = None

    def _idle_reason(self) -> str:
        return f"expired: not fed for {self.tokenizer.stream_idle_timeout_s:g} s (stream_idle_timeout_s)"

    def _begin(self) -> None:
        """Enter a feed/finish: StreamClosedError if the stream is finished, closed, aborted or idle too long."""
        self.tokenizer._drop_idle()
        expired = time.monotonic() - self.last_used > self.tokenizer.stream_idle_timeout_s
        if expired:     # also an unregistered stream, whose idle time no sweep sees
            self.tokenizer._forget(self)
            self.release(self._idle_reason())
        with self._state_lock:
            if self.closed_as is not None:
                raise StreamClosedError(f"stream {self.session!r} is {self.closed_as}")
            self._busy = True
        self.touch()

    def _end(self, update: StreamUpdate) -> StreamUpdate:
        with self._state_lock:
            self._busy = False
            if self.closed_as is None:
                return update
            self._drop_state()
            return update if self.closed_as == "finished" else StreamUpdate()

    @torch.inference_mode()
    def feed(self, audio, sample_rate: int | None = None) -> StreamUpdate:
        """Add audio (any length; same rules as offline input); returns what became available."""
        self._begin()
        update = StreamUpdate()
        try:
            if sample_rate is not None and check_sample_rate(sample_rate) != self.sample_rate:
                raise AudioInputError(f"stream {self.session!r} was opened at {self.sample_rate} Hz, got {sample_rate}")
            if not (isinstance(audio, (torch.Tensor, np.ndarray)) and tuple(audio.shape[-1:]) == (0,)):
                wav = to_mono_float(audio)                 # (an empty piece is fine mid-stream)
                update = self._consume(self.resampler.push(wav.to(self.tokenizer.device)), final=False)
        finally:
            update = self._end(update)
        return update

    @torch.inference_mode()
    def finish(self) -> StreamUpdate:
        """End of audio: flush the last partial 240 ms call and the last S3 piece."""
        self._begin()
        update = StreamUpdate()
        try:
            self.tokenizer._forget(self)
            update = self._consume(self.resampler.finish(), final=True)
        finally:
            with self._state_lock:
                if self.closed_as is None:
                    self.closed_as = "finished"
            update = self._end(update)
        return update

    def close(self) -> None:
        """Drop this stream at once (no more output)."""
        self.tokenizer._forget(self)
        self.release("closed")

    def _consume(self, wav16k: torch.Tensor, final: bool) -> StreamUpdate:
        update = StreamUpdate()
        wav16k = wav16k.to(self.piece.device)   # the resampler's empty tail is a CPU tensor
        blocks = self.features.push(wav16k) if wav16k.numel() else []
        if final:
            blocks += self.features.finish()
        for rows in blocks:
            update.vq02 += self.encoder.step(rows)[1].tolist()
        self.piece = torch.cat([self.piece, wav16k])
        tok = self.tokenizer
        while self.piece.numel() >= PIECE_SAMPLES or (final and self.piece.numel()):
            piece, self.piece = self.piece[:PIECE_SAMPLES], self.piece[PIECE_SAMPLES:]
            if piece.numel() >= MIN_PIECE_SAMPLES:
                update.vq06 += tok.semantic.launch(tok._mels([piece]))[0][0].tolist()
        self.vq02 += update.vq02
        self.vq06 += update.vq06
        update.ids = interleave(self.vq02, self.vq06, start_group=self.groups)
        self.groups = num_groups(len(self.vq02), len(self.vq06))
        return update
