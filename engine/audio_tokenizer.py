"""Step-Audio's dual-codebook audio tokenizer: vq02 (linguistic, Paraformer encoder + k-means,
16.7 Hz) and vq06 (semantic, S3 tokenizer v1, 25 Hz), interleaved 2:3 into LLM token ids.

    tok = AudioTokenizer.from_pretrained("/models/Step-Audio-Tokenizer", device="cuda")
    ids = tok.encode(wav, 48000)                    # [65536 + vq02, ..., 66560 + vq06, ...]
    out = tok.tokenize(wav, 48000)                  # .vq02, .vq06, .ids, .text ("<audio_N>..." form)
    batch = tok.encode_batch([w1, w2], [16000, 44100])
    stream = tok.stream("call-17")                  # live audio, any piece sizes
    update = stream.feed(piece, 48000)              # .vq02 new every 240 ms; .vq06/.ids per 30 s
    update = stream.finish()

Offline = Step-Audio's `wav2token`: resample to 16 kHz, peak-normalise (on by default), optional
silence trim (off by default, as for chat input; the TTS prompt path turns it on), vq02 from the
encoder run in Step-Audio's 240 ms chunk mode, vq06 from independent <= 30 s pieces.

Offline on CUDA runs as CUDA graphs (`use_cuda_graphs`): one graph of the whole Paraformer
(windows of all utterances, padded to a window-count bucket) + vq02 search, and one of the S3
encoder + vq06 search per (piece batch, mel-length bucket), each captured on first use of its
bucket (`warmup` captures ahead). The S3 graphs replay on a side stream, beside the Paraformer.
Host work per call: the front ends, metadata copies without syncs, and one `.tolist()` at the end.

Streaming: vq02 codes come out per 240 ms of audio and equal the offline codes; vq06 codes of a
30 s piece exist once the piece is complete (the S3 encoder attends over the whole piece), so ids
come out per 30 s piece and at `finish()`. A stream cannot peak-normalise (the peak is unknown
until the end), so it applies no normalisation: its codes equal
`tokenize(audio, sr, energy_norm=False)` of the whole audio. Normalise live input upstream (AGC)
if needed.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from .audio.kaldi_features import ParaformerFeatures
from .audio.tokenizer_graphs import GraphCache, bucket_batch, bucket_length
from .audio.tokenizer_whisper_mel import HOP as MEL_HOP, whisper_log_mel
from .audio.tokenizer_errors import AudioInputError, AudioTooShortError, StreamClosedError, TokenizerCheckpointError
from .audio.tokenizer_frontend import (TOKENIZER_SAMPLE_RATE, StreamingResampler, check_sample_rate, prepare_waveform,
                                      to_mono_float)
from .models.paraformer import (PARAFORMER_SUBDIR, EncoderStream, ParaformerEncoder, StreamStepGraph,
                                load_paraformer)
from .models.s3tokenizer import MIN_PIECE_SAMPLES, PIECE_SAMPLES, S3Tokenizer, load_s3_tokenizer, split_pieces
from .special_tokens import AUDIO_TOKEN_OFFSET, VQ02_CODES, VQ06_CODES, VQ06_OFFSET, audio_token_str
from ..kernels.nearest_centroid import nearest_centroid

VQ02_PER_GROUP = 2
VQ06_PER_GROUP = 3
WINDOW_UNIT = 4                         # Paraformer window buckets: 4 windows (0.96 s) ...
MAX_GRAPH_WINDOWS = 2560                # ... up to ~10 min of audio per call (longer: eager)
MEL_UNIT = 100                          # S3 length buckets: 1 s of mel frames ...
MEL_CAP = PIECE_SAMPLES // MEL_HOP      # ... up to the 30 s piece
S3_GRAPH_BATCH = 16                     # pieces per S3 batch when graphs (or bucket padding) are on


@contextlib.contextmanager
def _allow_tf32_matmul():
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


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
    def __init__(self, paraformer: ParaformerEncoder, features: ParaformerFeatures, vq02_codebook: torch.Tensor,
                 s3: S3Tokenizer, use_cuda_graphs: bool = True, tf32: bool = False):
        self.paraformer = paraformer
        self.features = features
        self.s3 = s3
        self.device = paraformer.device
        self.vq02_codebook = vq02_codebook.to(self.device, torch.float32)
        self.vq02_sqnorm = self.vq02_codebook.pow(2).sum(-1)
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda"
        # opt-in: float32 encoders' GEMMs on TF32 tensor cores (other numerics than float32)
        self.tf32 = tf32
        self.pad_to_bucket = False       # eager runs padded exactly like graph runs (tests graph inputs on CPU)
        self.concurrent_s3 = True        # S3 graphs (side stream) overlap the Paraformer graph
        self._graph = None
        self._offline_graphs: dict[str, GraphCache] = {}
        self._side_stream = None
        self._streams: dict[str, TokenizerStream] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, tokenizer_dir: str | os.PathLike, device="cpu", dtype=torch.float32,
                        s3_dtype: torch.dtype | None = None, cache_converted: bool = True,
                        use_cuda_graphs: bool = True, tf32: bool = False) -> "AudioTokenizer":
        """Load the released Step-Audio-Tokenizer folder: the FunASR Paraformer subfolder
        (config.yaml, am.mvn, model.pt encoder tensors), linguistic_tokenizer.npy and
        speech_tokenizer_v1.onnx (initializers converted to the native module; with
        `cache_converted`, kept beside it as safetensors). `dtype` is the compute dtype of both
        encoders (`s3_dtype` overrides it for the S3 encoder); the code searches run in float32.
        `tf32` (off by default) lets float32 encoders' matrix products use TF32 tensor cores."""
        root = os.fspath(tokenizer_dir)
        device = torch.device(device)
        para_dir = os.path.join(root, PARAFORMER_SUBDIR)
        if not os.path.isdir(para_dir):
            raise TokenizerCheckpointError(f"missing Paraformer folder {para_dir}")
        encoder, features = load_paraformer(para_dir, device=device, dtype=dtype)
        npy = os.path.join(root, "linguistic_tokenizer.npy")
        try:
            codebook = np.load(npy, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise TokenizerCheckpointError(f"cannot read {npy}: {exc}") from exc
        if codebook.ndim != 2 or codebook.shape[1] != encoder.cfg.output_size or codebook.shape[0] > VQ02_CODES:
            raise TokenizerCheckpointError(
                f"{npy}: codebook shape {codebook.shape}, expected [<= {VQ02_CODES}, {encoder.cfg.output_size}]")
        s3 = load_s3_tokenizer(os.path.join(root, "speech_tokenizer_v1.onnx"), device=device,
                               dtype=s3_dtype or dtype, cache=cache_converted)
        if s3.cfg.codebook_size > VQ06_CODES:
            raise TokenizerCheckpointError(f"S3 codebook has {s3.cfg.codebook_size} rows, the LLM has {VQ06_CODES} ids")
        return cls(encoder, features, torch.from_numpy(codebook.astype(np.float32)), s3, use_cuda_graphs, tf32)

    # ------------------------------------------------------------------ codes
    def vq02_of_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return nearest_centroid(rows.float(), self.vq02_codebook, self.vq02_sqnorm)

    def _precision(self):
        if self.tf32 and self.device.type == "cuda":
            return _allow_tf32_matmul()
        return contextlib.nullcontext()

    def _graphs(self, name: str) -> GraphCache:
        with self._lock:
            if name not in self._offline_graphs:
                body, static = {"vq02": (self._vq02_body, self._vq02_static),
                                "vq06": (self._vq06_body, self._vq06_static)}[name]
                self._offline_graphs[name] = GraphCache(body, static, self.device)
            return self._offline_graphs[name]

    @property
    def graph_count(self) -> int:
        return sum(len(g) for g in self._offline_graphs.values())

    # vq02: the Paraformer over all windows of a batch + the code search
    def _vq02_body(self, key, h, n_rows, lb_len, index) -> torch.Tensor:
        with self._precision():
            rows = self.paraformer.encode_windows(h, n_rows, lb_len, index)
        return self.vq02_of_rows(rows.reshape(-1, rows.shape[-1]))

    def _vq02_static(self, windows: int):
        cfg, dev = self.paraformer.cfg, self.device
        return (torch.zeros(windows, cfg.window_rows, cfg.input_size, device=dev, dtype=self.paraformer.dtype),
                torch.full((windows,), cfg.window_rows, device=dev, dtype=torch.int32),
                torch.zeros(windows, device=dev, dtype=torch.int32),
                torch.zeros(windows, cfg.look_back_rows, device=dev, dtype=torch.long))

    def _vq02_features(self, wavs16k: list[torch.Tensor]):
        return tuple(zip(*(self.features.offline(w.to(self.device)) for w in wavs16k))) if wavs16k else ((), ())

    def _vq02_launch(self, feats, counts):
        """Enqueue the vq02 codes of utterances (their front-end rows and calls): (flat codes on
        the device, per utterance (first code, count)). No host sync."""
        step = self.paraformer.cfg.chunk_frames
        total = sum(len(c) for c in counts)
        graphs = self.use_cuda_graphs and 0 < total <= MAX_GRAPH_WINDOWS
        pad_to = bucket_length(total, WINDOW_UNIT) if total and (graphs or self.pad_to_bucket) else None
        wins = self.paraformer.prepare_offline(list(feats), list(counts), pad_windows_to=pad_to)
        spans = [(first * step, n) for first, _, n in wins.spans]
        if not wins.windows:
            return None, spans
        inputs = (wins.h, wins.n_rows, wins.lb_len, wins.index)
        if graphs:
            cache = self._graphs("vq02")
            with cache.lock:
                return cache.run(pad_to, inputs).clone(), spans
        return self._vq02_body(pad_to, *inputs), spans

    # vq06: the S3 encoder + code search per batch of <= 30 s pieces
    def _vq06_body(self, key, mel, mel_len) -> torch.Tensor:
        with self._precision():
            return self.s3(mel, mel_len, key[2])[0]

    def _vq06_static(self, key):
        batch, frames, _ = key
        return (torch.zeros(batch, self.s3.cfg.n_mels, frames, device=self.device),
                torch.full((batch,), frames, device=self.device, dtype=torch.long))

    def _vq06_mels(self, pieces: list[torch.Tensor]) -> list[torch.Tensor]:
        return [whisper_log_mel(p.to(self.device), self.s3.cfg.n_mels) for p in pieces]

    def _vq06_pieces(self, pieces: list[torch.Tensor], mels: list[torch.Tensor] | None = None,
                     wait: bool = True):
        """Enqueue the vq06 codes (device tensors) of independent <= 30 s pieces (given their
        mels, if computed already). With graphs, the replays go to the S3 side stream (all of
        them: graphs of one pool never overlap); with `wait` the current stream waits for it
        before returning, else the caller does so, once it has enqueued its own work to run
        beside them. Returns (codes per piece, side stream or None). No host sync."""
        s3 = self.s3
        mels = self._vq06_mels(pieces) if mels is None else mels
        frames = [m.shape[-1] for m in mels]
        bucketed = self.use_cuda_graphs or self.pad_to_bucket
        out: list[torch.Tensor | None] = [None] * len(pieces)
        jobs = []
        for group in s3.group_pieces(frames, max_batch=S3_GRAPH_BATCH if bucketed else None):
            length = bucket_length(max(frames[i] for i in group), MEL_UNIT, MEL_CAP) if bucketed else None
            batch = bucket_batch(len(group)) if bucketed else None
            jobs.append((group, length, batch))
        side = self._s3_stream() if self.use_cuda_graphs else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for group, length, batch in jobs:
                mel, mel_len, padded = s3.batch_mels([mels[i] for i in group], length, batch)
                if self.use_cuda_graphs:
                    cache = self._graphs("vq06")
                    with cache.lock:
                        codes = cache.run((batch, length, padded), (mel, mel_len)).clone()
                else:
                    codes = self._vq06_body((batch, length, padded), mel, mel_len)
                for j, i in enumerate(group):
                    out[i] = codes[j, : s3.code_count(frames[i])]
        if side is not None and (wait or not self.concurrent_s3):
            torch.cuda.current_stream(self.device).wait_stream(side)
            side = None
        return out, side

    def _s3_stream(self):
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        return self._side_stream

    def _pieces(self, wavs16k: list[torch.Tensor]):
        """The <= 30 s pieces of utterances and, per utterance, the indices of its pieces."""
        pieces, owner = [], []
        for i, w in enumerate(wavs16k):
            for p in split_pieces(w):
                pieces.append(p)
                owner.append(i)
        return pieces, [[j for j, o in enumerate(owner) if o == i] for i in range(len(wavs16k))]

    @torch.inference_mode()
    def codes(self, wavs16k: list[torch.Tensor]) -> tuple[list[list[int]], list[list[int]]]:
        """(vq02, vq06) codes of 16 kHz utterances: both front ends, then the S3 graphs on a side
        stream beside the Paraformer graph on the current one, then one host sync."""
        feats, counts = self._vq02_features(wavs16k)
        pieces, owned = self._pieces(wavs16k)
        mels = self._vq06_mels(pieces)
        vq06, side = self._vq06_pieces(pieces, mels, wait=False) if pieces else ([], None)
        vq02, spans = self._vq02_launch(feats, counts)
        if side is not None:
            torch.cuda.current_stream(self.device).wait_stream(side)
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
        vq02, spans = self._vq02_launch(*self._vq02_features(wavs16k))
        flat = vq02.tolist() if vq02 is not None else []
        return [flat[a:a + n] for a, n in spans]

    @torch.inference_mode()
    def vq06_codes(self, wavs16k: list[torch.Tensor]) -> list[list[int]]:
        """Semantic codes of 16 kHz utterances: <= 30 s pieces of all utterances in shared batches."""
        pieces, owned = self._pieces(wavs16k)
        codes = self._vq06_pieces(pieces)[0] if pieces else []
        flat = torch.cat(codes).tolist() if codes else []
        starts = np.cumsum([0] + [c.numel() for c in codes]).tolist()
        return [sum((flat[starts[j]:starts[j + 1]] for j in js), []) for js in owned]

    @torch.inference_mode()
    def warmup(self, max_seconds: float = 30.0, batch_sizes=(1,)) -> int:
        """Capture ahead the offline graphs that calls of up to `max_seconds` per utterance and
        the given batch sizes use (Paraformer window buckets; S3 length buckets of padded
        batches, the common case). Returns the number of graphs held. No-op without graphs."""
        if not self.use_cuda_graphs:
            return 0
        windows_per_s = TOKENIZER_SAMPLE_RATE / self.features.cfg.chunk_samples
        piece_frames = min(MEL_CAP, int(max_seconds * TOKENIZER_SAMPLE_RATE) // MEL_HOP)
        vq02, vq06 = self._graphs("vq02"), self._graphs("vq06")
        for b in batch_sizes:
            top = min(MAX_GRAPH_WINDOWS, bucket_length(int(np.ceil(b * max_seconds * windows_per_s)) + 1, WINDOW_UNIT))
            w = WINDOW_UNIT
            while w <= top:
                with vq02.lock:
                    vq02.entry(w)
                w = bucket_length(w + 1, WINDOW_UNIT)
            pieces = b * max(1, int(np.ceil(max_seconds * TOKENIZER_SAMPLE_RATE / PIECE_SAMPLES)))
            batch = bucket_batch(min(pieces, S3_GRAPH_BATCH))
            f = MEL_UNIT
            while True:
                with vq06.lock:
                    vq06.entry((batch, f, True))
                if f >= bucket_length(piece_frames, MEL_UNIT, MEL_CAP):
                    break
                f = bucket_length(f + 1, MEL_UNIT, MEL_CAP)
            if piece_frames >= MEL_CAP:               # whole 30 s pieces fill the last bucket exactly
                with vq06.lock:
                    vq06.entry((batch, MEL_CAP, False))
        return self.graph_count

    # ------------------------------------------------------------------ offline API
    def tokenize_batch(self, wavs, sample_rates, *, energy_norm: bool = True, trim: bool = False,
                       allow_empty: bool = False) -> list[TokenizerOutput]:
        """Codes and ids of many utterances of any lengths in one batched call; each result equals
        the result of tokenizing that utterance alone. `sample_rates` is one rate or one per wav."""
        if isinstance(sample_rates, (int, float, np.integer)):
            sample_rates = [sample_rates] * len(wavs)
        if len(sample_rates) != len(wavs):
            raise AudioInputError(f"{len(wavs)} waveforms but {len(sample_rates)} sample rates")
        prepared = []
        for i, (w, sr) in enumerate(zip(wavs, sample_rates)):
            try:
                prepared.append(prepare_waveform(w, sr, energy_norm=energy_norm, trim=trim, device=self.device))
            except AudioInputError as exc:
                raise type(exc)(f"audio #{i}: {exc}") from exc
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
    def stream_step_graph(self) -> StreamStepGraph | None:
        if not self.use_cuda_graphs:
            return None
        with self._lock:
            if self._graph is None:
                self._graph = StreamStepGraph(self.paraformer, self.vq02_of_rows)
        return self._graph

    def stream(self, session: str | None = None, sample_rate: int | None = None) -> "TokenizerStream":
        """The live stream of `session`: created on first use (at `sample_rate`, default 16 kHz),
        returned again by later calls with the same id, forgotten after `finish`."""
        with self._lock:
            existing = self._streams.get(session) if session is not None else None
        if existing is not None:
            if sample_rate is not None and int(sample_rate) != existing.sample_rate:
                raise AudioInputError(f"stream {session!r} is open at {existing.sample_rate} Hz, not {sample_rate}")
            return existing
        s = TokenizerStream(self, session, sample_rate or TOKENIZER_SAMPLE_RATE)
        if session is not None:
            with self._lock:
                self._streams[session] = s
        return s

    def open_sessions(self) -> list[str]:
        with self._lock:
            return list(self._streams)

    def _forget(self, session: str | None) -> None:
        with self._lock:
            self._streams.pop(session, None)


class TokenizerStream:
    """One live audio stream. Not thread-safe: feed it from one thread at a time."""

    def __init__(self, tokenizer: AudioTokenizer, session: str | None, sample_rate: int):
        self.tokenizer = tokenizer
        self.session = session
        self.sample_rate = check_sample_rate(sample_rate)
        dev = tokenizer.device
        self.resampler = StreamingResampler(self.sample_rate, TOKENIZER_SAMPLE_RATE, device=dev)
        self.features = tokenizer.features.stream()
        self.encoder = EncoderStream(tokenizer.paraformer, tokenizer.vq02_of_rows, tokenizer.stream_step_graph())
        self.piece = torch.zeros(0, device=dev)         # 16 kHz samples of the current S3 piece
        self.vq02: list[int] = []
        self.vq06: list[int] = []
        self.groups = 0
        self.closed = False

    @torch.inference_mode()
    def feed(self, audio, sample_rate: int | None = None) -> StreamUpdate:
        """Add audio (any length; same rules as offline input); returns what became available."""
        if self.closed:
            raise StreamClosedError(f"stream {self.session!r} is finished")
        if sample_rate is not None and int(sample_rate) != self.sample_rate:
            raise AudioInputError(f"stream {self.session!r} was opened at {self.sample_rate} Hz, got {sample_rate}")
        if isinstance(audio, (torch.Tensor, np.ndarray)) and tuple(audio.shape[-1:]) == (0,):
            return StreamUpdate()                       # an empty piece is fine mid-stream
        wav, _ = to_mono_float(audio, self.sample_rate)
        return self._consume(self.resampler.push(wav.to(self.tokenizer.device)), final=False)

    @torch.inference_mode()
    def finish(self) -> StreamUpdate:
        """End of audio: flush the last partial 240 ms call and the last S3 piece."""
        if self.closed:
            raise StreamClosedError(f"stream {self.session!r} is finished")
        self.closed = True
        self.tokenizer._forget(self.session)
        return self._consume(self.resampler.finish(), final=True)

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
                update.vq06 += tok._vq06_pieces([piece])[0][0].tolist()
        self.vq02 += update.vq02
        self.vq06 += update.vq06
        update.ids = interleave(self.vq02, self.vq06, start_group=self.groups)
        self.groups = num_groups(len(self.vq02), len(self.vq06))
        return update
