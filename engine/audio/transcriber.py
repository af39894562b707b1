"""Speech recognition with the Step-Audio-Tokenizer's own streaming Paraformer: the encoder and front
end the AudioTokenizer already holds, plus the CIF predictor, SAN-M decoder and vocabulary of the
same model folder (models/paraformer_asr.py, models/asr_vocabulary.py).

    tok = AudioTokenizer.from_pretrained("/models/Step-Audio-Tokenizer", asr=True)
    asr = tok.transcriber                       # or Transcriber(tok)
    result = asr.transcribe(wav, 44100)         # .text, .token_ids, .tokens, .token_times
    results = asr.transcribe_batch([w1, w2], [16000, 48000])
    stream = asr.stream(48000)
    delta = stream.feed(piece)                  # text that became certain (often "")
    final = stream.finish()                     # the Transcription of the whole audio

Streaming is FunASR's streaming Paraformer inference (`ParaformerStreaming.inference` /
`generate_chunk`) with Step-Audio's chunk settings (chunk_size [0, 4, 5], encoder look-back 4,
decoder look-back 1): the encoder windows are exactly the tokenizer's 240 ms calls; per window the
predictor's alphas feed CIF with its carried sum, the tokens fired in the window go through the
decoder with its FSMN and cross-attention caches, and the argmax ids (blank / sos / eos dropped)
are the tokens. The end of the audio is the final window (all its rows count, plus the CIF tail);
when the audio ends without a final call of its own (its length a multiple of 240 ms, or a last
piece too short to give a feature row) the 5 carried rows are encoded as a tail window, as
upstream FunASR does (Step-Audio's copy of FunASR would skip the final step and lose the last
~300 ms).

Offline is that same computation over the whole utterance, batched: all windows of all utterances
through the encoder at once (as the tokenizer runs them), the predictor on every window, CIF on
the host from one copy of the alphas, then every fired token through the decoder in one pass (its
FSMN looks only back, so a token's history is the same as in the stream; each token attends to
its window's rows and the look-back rows of the windows decoded before). Offline therefore computes
what the stream computes, only with another float summation order (it is not FunASR's
non-streaming Paraformer, which is another model).

Text: FunASR's postprocessing (asr_vocabulary.tokens_to_text). FunASR's streaming demo
postprocesses each call's tokens on their own, which glues English words across calls; a stream
here hands out only text no later token can change (`committed_text`), so the deltas concatenated
are always a prefix of the final text, which equals the offline text.

Running cost: a stream's full 240 ms windows replay the tokenizer's encoder step graph
(`LinguisticTokenizer.step_window`); predictor, CIF (host, one copy of 9 alphas) and decoder run
eagerly. Offline batches run the encoder eagerly over all windows at once.

No peak normalisation by default (`energy_norm=False`): FunASR's recogniser does not normalise,
and a stream cannot. Pass `energy_norm=True` to transcribe exactly what the tokenizer encodes.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..device.precision import matmul_precision
from ..errors import AudioInputError, AudioTooShortError, ConfigError, StreamClosedError
from ..frontend.audio_input import check_sample_rate, to_mono_float
from ..frontend.preprocess import TOKENIZER_SAMPLE_RATE, prepare_batch
from ..frontend.resample import StreamingResampler
from ..models.asr_vocabulary import committed_text, tokens_to_text
from ..models.paraformer_asr import integrate_and_fire

if TYPE_CHECKING:
    from .tokenizer import AudioTokenizer


@dataclass
class Transcription:
    text: str
    token_ids: list[int] = field(default_factory=list)     # decoder ids, blank / sos / eos dropped
    tokens: list[str] = field(default_factory=list)        # their vocabulary strings
    token_times: list[float] = field(default_factory=list)  # s: end of the 60 ms frame where each token fired


@dataclass
class _Fired:
    """CIF over one utterance's windows (offline): which rows make up each fired token, and per
    token the window it fired in and its time."""
    entries: list[tuple[int, int, float]]    # (token, flat window row, weight), token order
    windows: list[int]                       # global window index of each token
    times: list[float]
    n_rows: dict[int, int]                   # valid rows of each of the utterance's windows


def ends_with_final_call(num_samples: int, calls: list[int], chunk_samples: int) -> bool:
    """Whether the front end's last call was the final (partial) one: every full 240 ms call gives
    rows, so there is one more call than full chunks exactly when the last piece gave rows."""
    return len(calls) > num_samples // chunk_samples


class Transcriber:
    """Speech to text with an AudioTokenizer's Paraformer (loaded with `asr=True`)."""

    def __init__(self, tokenizer: "AudioTokenizer"):
        if tokenizer.recognizer is None:
            raise ConfigError("this AudioTokenizer was loaded without speech recognition: use "
                              "AudioTokenizer.from_pretrained(folder, asr=True)")
        self.linguistic = tokenizer.linguistic      # its streaming step (and CUDA graph) runs the encoder
        self.encoder = tokenizer.linguistic.encoder
        self.features = tokenizer.features
        self.recognizer = tokenizer.recognizer
        self.device = tokenizer.device
        self.tf32 = tokenizer.linguistic.tf32
        self.cfg = self.recognizer.cfg
        self.frame_seconds = self.features.cfg.lfr_n * self.features.cfg.shift_samples / TOKENIZER_SAMPLE_RATE

    # ------------------------------------------------------------------ shared pieces
    def _token_time(self, window: int, row: int | None, num_samples: int) -> float:
        """Seconds at the end of the LFR frame of `row` in `window` (row None: the CIF tail, the end)."""
        end = num_samples / TOKENIZER_SAMPLE_RATE
        if row is None:
            return end
        enc = self.encoder.cfg
        frame = window * enc.chunk_frames - enc.carried_frames + row
        return float(min(max(frame + 1, 0) * self.frame_seconds, end))

    def _embed(self, rows: torch.Tensor, entries: list[tuple[int, int, float]], num_tokens: int) -> torch.Tensor:
        """Token embeddings [num_tokens, D] (float32): token k = sum of weight * rows[row] over its
        entries (token, row, weight), given in token order."""
        if num_tokens == 0:
            return rows.new_zeros(0, rows.shape[-1], dtype=torch.float32)
        entries = [e for e in entries if e[0] < num_tokens]
        tok = np.fromiter((e[0] for e in entries), np.int64, len(entries))
        index = torch.tensor([e[1] for e in entries], dtype=torch.long).to(rows.device, non_blocking=True)
        weight = torch.tensor([e[2] for e in entries], dtype=torch.float32).to(rows.device, non_blocking=True)
        lengths = torch.from_numpy(np.bincount(tok, minlength=num_tokens)).to(rows.device, non_blocking=True)
        return torch.segment_reduce(rows[index].float() * weight[:, None], "sum", lengths=lengths)

    def _decode(self, x: torch.Tensor, history: torch.Tensor, memory: torch.Tensor, slots: torch.Tensor,
                valid: torch.Tensor):
        dec = self.recognizer.decoder
        with matmul_precision(self.tf32, self.device):
            logits, history = dec(x.to(self.recognizer.dtype), history, memory.to(self.recognizer.dtype), slots, valid)
        return logits.argmax(-1), history

    def _result(self, ids: list[int], times: list[float]) -> Transcription:
        vocab = self.recognizer.vocabulary
        kept = [(i, t) for i, t in zip(ids, times) if i not in vocab.dropped_ids]
        token_ids = [i for i, _ in kept]
        tokens = vocab.strings(token_ids)
        return Transcription(tokens_to_text(tokens), token_ids, tokens, [t for _, t in kept])

    # ------------------------------------------------------------------ offline
    def transcribe_batch(self, wavs, sample_rates, *, energy_norm: bool = False,
                         allow_empty: bool = False) -> list[Transcription]:
        """Transcriptions of utterances of any lengths and rates in one batched pass; each equals
        the utterance transcribed alone, and a stream fed the same audio. `sample_rates` is one
        rate or one per wav. AudioTooShortError for audio shorter than one encoder call (~85 ms)
        unless `allow_empty` (then its text is "")."""
        prepared = prepare_batch(wavs, sample_rates, energy_norm=energy_norm, trim=False, device=self.device)
        return self.recognize(prepared, allow_empty=allow_empty)

    def transcribe(self, wav, sample_rate, *, energy_norm: bool = False, allow_empty: bool = False) -> Transcription:
        return self.transcribe_batch([wav], [sample_rate], energy_norm=energy_norm, allow_empty=allow_empty)[0]

    @torch.inference_mode()
    def recognize(self, wavs16k: list[torch.Tensor], allow_empty: bool = False) -> list[Transcription]:
        """Transcriptions of prepared 16 kHz mono utterances (see the module docstring)."""
        feats, calls = [], []
        chunk = self.features.cfg.chunk_samples
        for w in wavs16k:
            rows, counts = self.features.offline(w.to(self.device))
            if counts and not ends_with_final_call(w.numel(), counts, chunk):
                counts = counts + [0]            # tail window
            feats.append(rows)
            calls.append(counts)
        short = [i for i, c in enumerate(calls) if not c]
        if short and not allow_empty:
            details = ", ".join(f"#{i} ({wavs16k[i].numel() / TOKENIZER_SAMPLE_RATE:.3f} s)" for i in short)
            raise AudioTooShortError(f"audio too short for one Paraformer frame: {details}")
        wins = self.encoder.prepare_offline(feats, calls)
        if not wins.windows:
            return [Transcription("") for _ in wavs16k]
        with matmul_precision(self.tf32, self.device):
            rows = self.encoder.encode_windows(wins.h, wins.n_rows, wins.lb_len, wins.index, all_rows=True)
        final = torch.zeros(wins.windows, dtype=torch.bool)
        for first, c, _ in wins.spans:
            if c:
                final[first + c - 1] = True
        alphas = self.recognizer.predictor.window_alphas(rows, wins.n_rows, final.to(self.device)).cpu().numpy()
        fired = [self._fire_utterance(alphas, first, calls_i, w.numel())
                 for (first, _, _), w, calls_i in zip(wins.spans, wavs16k, calls)]
        ids = self._decode_utterances(rows.reshape(-1, rows.shape[-1]), fired, rows.shape[1])
        return [self._result(i, f.times) for i, f in zip(ids, fired)]

    def _fire_utterance(self, alphas: np.ndarray, first: int, calls: list[int], num_samples: int) -> _Fired:
        """CIF over one utterance's windows first, first + 1, ... (one per call)."""
        cfg, enc = self.cfg, self.encoder.cfg
        r = alphas.shape[1]
        integrate, fired = 0.0, 0
        out = _Fired([], [], [], {})
        for k, new_rows in enumerate(calls):
            j = first + k
            final = k == len(calls) - 1
            n_rows = out.n_rows[j] = enc.carried_frames + new_rows
            kept = n_rows if final else min(n_rows, cfg.chunk_frames)
            a = np.append(alphas[j, :kept], np.float32(cfg.tail_threshold)) if final else alphas[j, :kept]
            found, fires, integrate = integrate_and_fire(a, integrate, cfg.threshold)
            out.entries += [(fired + tok, j * r + row, w) for tok, row, w in found if row < kept]
            for row in fires:
                out.windows.append(j)
                out.times.append(self._token_time(k, row if row < kept else None, num_samples))
            fired += len(fires)
        return out

    def _memory_slots(self, fired: _Fired, r: int, slots: np.ndarray, valid: np.ndarray) -> None:
        """Fill one utterance's cross-attention slots [T, look + R]: the look-back rows kept from the
        windows decoded before (the last `look` rows of their concatenation), then the own window's."""
        look = self.cfg.decoder_look_back_rows
        back: list[int] = []
        previous = None
        for t, j in enumerate(fired.windows):
            if j != previous:
                if previous is not None and look:
                    back = (back + list(range(previous * r, previous * r + fired.n_rows[previous])))[-look:]
                previous = j
            own = range(j * r, j * r + fired.n_rows[j])
            slots[t, look - len(back):look] = back
            valid[t, look - len(back):look] = True
            slots[t, look:look + len(own)] = own
            valid[t, look:look + len(own)] = True

    def _decode_utterances(self, flat: torch.Tensor, fired: list[_Fired], r: int) -> list[list[int]]:
        """Decoder over every fired token of every utterance in one pass, tokens padded to [B, T]."""
        counts = [len(f.windows) for f in fired]
        t_max = max(counts)
        if t_max == 0:
            return [[] for _ in fired]
        b, s = len(fired), self.cfg.decoder_look_back_rows + r
        slots = np.zeros((b, t_max, s), np.int64)
        valid = np.zeros((b, t_max, s), bool)
        x = torch.zeros(b, t_max, flat.shape[-1], device=flat.device)
        for u, f in enumerate(fired):
            x[u, :counts[u]] = self._embed(flat, f.entries, counts[u])
            self._memory_slots(f, r, slots[u], valid[u])
        history = self.recognizer.decoder.new_history(b, flat.device, self.recognizer.dtype)
        ids, _ = self._decode(x, history, flat, torch.from_numpy(slots).to(flat.device),
                              torch.from_numpy(valid).to(flat.device))
        ids = ids.tolist()
        return [ids[u][:counts[u]] for u in range(b)]

    # ------------------------------------------------------------------ streaming
    def stream(self, sample_rate: int | None = None) -> "TranscriberStream":
        """A live stream at `sample_rate` (None: 16 kHz; other rates must pass the audio policy)."""
        return TranscriberStream(self, TOKENIZER_SAMPLE_RATE if sample_rate is None else check_sample_rate(sample_rate))


class TranscriberStream:
    """One live utterance: audio in any pieces, text out as it becomes certain. Not thread-safe:
    feed it from one thread at a time (`close` may come from another)."""

    def __init__(self, transcriber: Transcriber, sample_rate: int):
        self.transcriber = transcriber
        self.sample_rate = check_sample_rate(sample_rate)
        dev = transcriber.device
        rec = transcriber.recognizer
        self.resampler = StreamingResampler(self.sample_rate, TOKENIZER_SAMPLE_RATE, device=dev)
        self.features = transcriber.features.stream()
        self.encoder_state = transcriber.encoder.new_stream()
        self.integrate = 0.0                               # CIF sum carried into the next window
        self.partial = torch.zeros(rec.cfg.size, device=dev)    # the open token's weighted rows so far
        self.history = rec.decoder.new_history(1, dev, rec.dtype)
        self.look_back = torch.zeros(0, rec.cfg.size, device=dev, dtype=transcriber.encoder.dtype)
        self.windows = 0
        self.samples = 0                                   # 16 kHz samples received
        self.ids: list[int] = []                           # decoder ids, nothing dropped yet
        self.times: list[float] = []
        self.text = ""                                     # handed out so far
        self._committed_ids = 0                            # len(ids) when `text` was last worked out
        self.closed_as: str | None = None
        self._lock = threading.Lock()

    @property
    def token_ids(self) -> list[int]:
        return self.transcriber.recognizer.vocabulary.kept_ids(self.ids)

    def close(self) -> None:
        """Drop the stream's state at once; later calls raise StreamClosedError."""
        with self._lock:
            if self.closed_as is None:
                self.closed_as = "closed"
            self.resampler = self.features = self.encoder_state = None

    def _check_open(self) -> None:
        if self.closed_as is not None:
            raise StreamClosedError(f"transcription stream is {self.closed_as}")

    @torch.inference_mode()
    def feed(self, audio, sample_rate: int | None = None) -> str:
        """Add audio (any length, the offline input rules); returns the text that became certain."""
        self._check_open()
        if sample_rate is not None and check_sample_rate(sample_rate) != self.sample_rate:
            raise AudioInputError(f"stream was opened at {self.sample_rate} Hz, got {sample_rate}")
        if isinstance(audio, (torch.Tensor, np.ndarray)) and tuple(audio.shape[-1:]) == (0,):
            return ""
        wav = to_mono_float(audio)
        with self._lock:
            self._check_open()
            self._consume(self.resampler.push(wav.to(self.transcriber.device)), final=False)
            return self._commit()

    @torch.inference_mode()
    def finish(self) -> Transcription:
        """End of audio: the final window (or the tail window) and the CIF tail. Returns the
        Transcription of the whole audio; `text` begins with every delta handed out."""
        self._check_open()
        with self._lock:
            self._check_open()
            self._consume(self.resampler.finish(), final=True)
            result = self.transcriber._result(self.ids, self.times)
            self.text = result.text
            self.closed_as = "finished"
            self.resampler = self.features = self.encoder_state = None
        return result

    def _commit(self) -> str:
        # text is a function of the whole token list (FunASR's rules look at all of it): O(tokens)
        # per feed that fired any, ~10 ms per 1000 tokens on a CPU core
        if len(self.ids) == self._committed_ids:
            return ""
        self._committed_ids = len(self.ids)
        vocab = self.transcriber.recognizer.vocabulary
        certain = committed_text(vocab.strings(self.token_ids))
        if not certain.startswith(self.text):
            return ""            # a case the probes did not foresee: hold back until it settles
        delta, self.text = certain[len(self.text):], certain
        return delta

    def _consume(self, wav16k: torch.Tensor, final: bool) -> None:
        wav16k = wav16k.to(self.transcriber.device)
        self.samples += wav16k.numel()
        blocks = self.features.push(wav16k) if wav16k.numel() else []
        for rows in blocks:
            self._window(rows, final=False)
        if not final:
            return
        last = self.features.finish()
        if last:
            self._window(last[0], final=True)
        elif self.windows:      # tail window: the carried rows alone
            self._window(wav16k.new_zeros(0, self.transcriber.features.cfg.feature_dim), final=True)

    def _window(self, rows: torch.Tensor, final: bool) -> None:
        tr, rec = self.transcriber, self.transcriber.recognizer
        cfg = rec.cfg
        window_rows = tr.linguistic.step_window(self.encoder_state, rows)[0]        # [carried + new, D]
        n = window_rows.shape[0]
        dev = tr.device
        alphas = rec.predictor.window_alphas(window_rows[None], torch.tensor([n], device=dev),
                                             torch.tensor([final], device=dev))[0].cpu().numpy()
        kept = n if final else min(n, cfg.chunk_frames)
        a = alphas[:kept]
        if final:
            a = np.append(a, np.float32(cfg.tail_threshold))
        found, fires, self.integrate = integrate_and_fire(a, self.integrate, cfg.threshold)
        # row 0: the open token's partial sum (weight 1, for token 0 only); then the window's rows
        rows_ext = torch.cat([self.partial[None], window_rows.float()])
        entries = [(0, 0, 1.0)] + [(t, 1 + row, w) for t, row, w in found if row < kept]
        entries.sort(key=lambda e: e[0])
        embedded = tr._embed(rows_ext, entries, len(fires) + 1)
        self.partial = embedded[-1]
        for row in fires:
            self.times.append(tr._token_time(self.windows, row if row < kept else None, self.samples))
        self.windows += 1
        if not fires:
            return
        memory = torch.cat([self.look_back, window_rows])
        m = memory.shape[0]
        slots = torch.arange(m, device=dev).expand(1, len(fires), m)
        valid = torch.ones(1, len(fires), m, dtype=torch.bool, device=dev)
        ids, self.history = tr._decode(embedded[None, :-1], self.history, memory, slots, valid)
        self.ids += ids[0].tolist()
        look = cfg.decoder_look_back_rows
        self.look_back = memory[m - look:] if look else memory[:0]

