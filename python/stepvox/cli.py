"""The `stepvox` command.

  stepvox tts TEXT --out FILE [--model DIR --tokenizer DIR --speakers DIR] [--voice NAME] ...
                                                      text to speech, with latency and RTF
  stepvox serve [--model DIR --tokenizer DIR --speakers DIR] [--chat [DIR]] [--port 8000] ...
                                                      an OpenAI-compatible speech (and voice-chat) server
  stepvox chat [TEXT] [--audio FILE] [--out FILE] [--url URL] ...
                                                      talk to a running server (text in, text and speech out)
  stepvox generate [--model DIR] [--prompt TEXT ...]   generate and report throughput
  stepvox plan --model DIR [--tp 1 2 4 8]              tensor-parallel memory/speed plan
  stepvox --version
Given no model folder, `tts` and `serve` write tiny random-weight folders of the three releases (and
a generated voice prompt), `serve --chat` with no folder a tiny random-weight Step1 chat model,
`generate` a tiny random-weight Step1 checkpoint, and each says so.
A mistake of the user's (a bad option, a bad model folder) is one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time

import torch

from stepvox import __version__
from stepvox.engine.audio.decoder_stream import StreamConfig
from stepvox.engine.config import KV_CACHE_DTYPES, EngineConfig, Step1Config
from stepvox.engine.models.step1_quantize import quantize_folder
from stepvox.engine.errors import AudioInputError, CheckpointError, ConfigError, InvalidRequestError, StepvoxError
from stepvox.engine.frontend.audio_formats import FORMATS, RATES, output_rate
from stepvox.engine.frontend.tempo import check_speed, check_volume
from stepvox.engine.pipelines.audio import Audio
from stepvox.engine.pipelines.tts import TTS, tagged_text
from stepvox.engine.pipelines.tts_text import MODES
from stepvox.engine.pipelines.voice_chat import (CHAT_MEMORY_FRACTION, MAX_MEMORY_FRACTION, TTS_MEMORY_FRACTION,
                                                 VoiceChat, memory_split)
from stepvox.engine.pipelines.voices import UnknownVoiceError, VoiceRef
from stepvox.engine.sampling_params import SamplingParams
from stepvox import kernel_bench
from stepvox.kernels import BACKENDS
from stepvox.kernels.catalog import OPS
from stepvox.llm import LLM
from stepvox.plan import main as plan_main
from stepvox.server import ServerConfig, bind_socket, serve
from stepvox.server.client import stream_chat
from stepvox.testing import FIXTURES_VERSION
from stepvox.testing.step1 import write_random_step1
from stepvox.testing.tts import write_tts_folders

COMMANDS = ("tts", "serve", "chat", "generate", "plan", "quantize", "bench")
USER_ERRORS = (ConfigError, CheckpointError, InvalidRequestError)   # exit 2; other StepvoxErrors exit 1
DEFAULT_MODEL = "stepvox-tiny-step1"
DEFAULT_TTS = "stepvox-tiny-tts"
DEFAULT_CHAT = "stepvox-tiny-chat"
TINY_CHAT = "tiny"                        # `serve --chat` with no folder: the tiny random-weight chat model
COMPLETE_MARKER = ".stepvox-complete"     # written last: a folder without it is not a finished checkpoint
STALE_PARTIAL_S = 3600                    # a partial folder this old belongs to a writer that was killed


def _one_line(message) -> str:
    return " ".join(str(message).split())


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, `stepvox: error: ...`, and exit code 2 (no usage dump)."""

    def error(self, message):
        sys.stderr.write(f"stepvox: error: {_one_line(message)}\n")
        raise SystemExit(2)


# ---------------------------------------------------------------- argument types
def _add_precision_options(parser, what: str) -> None:
    parser.add_argument("--quantization", choices=("fp8",), default=None,
                        help=f"fp8: {what}'s linear weights in FP8 (W8A16, quantized while loading; an FP8 folder "
                             "loads as FP8 anyway)")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                        help="fp8: a one-byte KV cache (twice the tokens; scales calibrated at load); auto: the "
                             "model's dtype")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port in [0, 65535], got {text!r}")
    return value


def _stream_window(text: str) -> StreamConfig:
    """HOP+OVERLAP in audio tokens: the speech decoder stream's first hop and its overlap."""
    hop, plus, overlap = text.partition("+")
    try:
        return StreamConfig(first_hop_tokens=int(hop), overlap_tokens=int(overlap)).validate()
    except (ValueError, StepvoxError) as exc:
        detail = str(exc) if plus and isinstance(exc, StepvoxError) else "expected HOP+OVERLAP, e.g. 5+5"
        raise argparse.ArgumentTypeError(f"{detail}, got {text!r}") from None


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


# ---------------------------------------------------------------- the embedded default checkpoint
def _clear_stale_partials(parent: str, name: str) -> None:
    prefix = f".{name}.partial-"
    for entry in os.listdir(parent):
        path = os.path.join(parent, entry)
        try:
            if entry.startswith(prefix) and time.time() - os.path.getmtime(path) > STALE_PARTIAL_S:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass                                   # another run removed it first


def _complete(folder: str) -> bool:
    try:
        with open(os.path.join(folder, COMPLETE_MARKER)) as f:
            return f.read() == FIXTURES_VERSION
    except OSError:
        return False


def materialized(name: str, write, parent: str | None = None) -> str:
    """The folder `name` under `parent` (default: the temp folder), made by `write(path)` if it is
    not there yet. It is written into a temporary sibling and renamed into place once complete, so
    an interrupted writer never leaves a folder that a later run would take for a finished one; a
    folder without the completion marker, or whose marker names another FIXTURES_VERSION (an older
    writer's), is replaced."""
    parent = parent or tempfile.gettempdir()
    folder = os.path.join(parent, name)
    if _complete(folder):
        return folder
    _clear_stale_partials(parent, name)
    work = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    try:
        write(work)
        with open(os.path.join(work, COMPLETE_MARKER), "w") as f:
            f.write(FIXTURES_VERSION)
        if os.path.lexists(folder):                # incomplete: move it out of the way, then drop it
            doomed = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
            try:
                os.replace(folder, os.path.join(doomed, "old"))
            except FileNotFoundError:
                pass                               # a concurrent run moved it first
            shutil.rmtree(doomed, ignore_errors=True)
        try:
            os.rename(work, folder)
        except OSError:                            # a concurrent run finished first: use its folder
            if not _complete(folder):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)   # still there when interrupted or beaten to it
    return folder


def default_model(parent: str | None = None) -> str:
    """The tiny random-weight Step1 checkpoint (see `materialized`)."""
    return materialized(DEFAULT_MODEL, lambda path: write_random_step1(path, seed=0), parent)


def default_chat_model(parent: str | None = None) -> str:
    """A tiny random-weight Step1 folder for `serve --chat` (see `materialized`)."""
    return materialized(DEFAULT_CHAT, lambda path: write_random_step1(path, seed=7), parent)


def default_tts_folders(parent: str | None = None) -> dict[str, str]:
    """Tiny random-weight Step-Audio-TTS-3B, Step-Audio-Tokenizer and speakers folders."""
    root = materialized(DEFAULT_TTS, lambda path: write_tts_folders(path, seed=0), parent)
    return {k: os.path.join(root, v) for k, v in (("model", "Step-Audio-TTS-3B"),
                                                  ("tokenizer", "Step-Audio-Tokenizer"), ("speakers", "speakers"))}


# ---------------------------------------------------------------- commands
def cmd_generate(args) -> int:
    # every option is checked before anything is written or loaded
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, ignore_eos=args.ignore_eos, seed=args.seed)
    options = dict(device=args.device, dtype=args.dtype, tensor_parallel_size=args.tp,
                   max_model_len=args.max_model_len, enforce_eager=args.eager, kernel_backend=args.kernels,
                   quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    EngineConfig(**options).validate()
    if args.model is not None and not os.path.isdir(args.model):
        raise CheckpointError(f"--model {args.model}: no such folder")
    model = args.model
    if model is None:
        model = default_model()
        print(f"no --model given: using a tiny random-weight Step1 checkpoint written to {model} "
              f"(2 layers, hidden 64, real 74752-token vocabulary; its output is noise)")
    t0 = time.perf_counter()
    llm = LLM(model, **options)
    try:
        return _report_generation(llm, args, params, time.perf_counter() - t0)
    finally:
        llm.shutdown()


def _report_generation(llm: LLM, args, params: SamplingParams, load_s: float) -> int:
    prompts = args.prompt or ["Hello, how are you today?"]
    prompts = (prompts * args.batch)[:max(args.batch, len(prompts))]
    t1 = time.perf_counter()
    outs = llm.generate(prompts, params)
    gen_s = time.perf_counter() - t1
    eng = llm.engine
    for out in outs[:min(len(outs), 4)]:
        c = out.outputs[0]
        print(f"[{out.request_id}] prompt {len(out.prompt_token_ids)} tokens -> {len(c.token_ids)} tokens "
              f"({c.finish_reason})")
        print(f"  ids:  {c.token_ids[:32]}{' ...' if len(c.token_ids) > 32 else ''}")
        print(f"  text: {c.text[:200]!r}")
    new_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs if o.metrics.first_token_time]
    ttft_text = f"{1e3 * min(ttft):.1f}-{1e3 * max(ttft):.1f} ms" if ttft else "-"
    print(f"device {eng.device} dtype {str(eng.dtype).replace('torch.', '')}; load {load_s:.2f} s; "
          f"KV cache {eng.block_manager.num_pages} pages of {eng.ecfg.page_size} tokens")
    print(f"{len(outs)} requests, {eng.stats['prefill_tokens']} prefill + {new_tokens} generated tokens in "
          f"{gen_s:.3f} s: {new_tokens / gen_s:.1f} generated tokens/s, "
          f"time to first token {ttft_text}, {eng.stats['steps']} steps")
    return 0


def cmd_tts(args) -> int:
    # every option (and the text) is checked before anything is written or loaded
    fmt = args.format or _format_of(args.out)
    output_rate(fmt, args.sample_rate, 22050)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise InvalidRequestError(f"--out {args.out}: no such folder {out_dir}")
    if os.path.isdir(args.out):
        raise InvalidRequestError(f"--out {args.out} is a folder; give a file name")
    tagged_text(args.text, args.emotion, args.language, args.speed, args.mode)
    check_speed(args.speed_factor)
    check_volume(args.volume)
    SamplingParams(temperature=args.temperature, top_k=50, seed=args.seed, max_tokens=args.max_tokens)
    options = dict(kernel_backend=args.kernels, max_model_len=args.max_model_len, quantization=args.quantization,
                   kv_cache_dtype=args.kv_cache_dtype)
    EngineConfig(device=args.device, **options).validate()
    _check_tts_folders(args)
    if (args.clone_wav is None) != (args.clone_text is None):
        raise InvalidRequestError("--clone-wav and --clone-text go together")
    if args.clone_wav is not None and not os.path.isfile(args.clone_wav):
        raise AudioInputError(f"--clone-wav {args.clone_wav}: no such file")
    folders, speakers = _tts_folders(args)
    device = None if args.device == "auto" else args.device
    t0 = time.perf_counter()
    tts = TTS.from_pretrained(folders["model"], folders["tokenizer"], speakers, device=device,
                              voices_dir=args.voices_dir, stream_config=args.stream_window, **options)
    try:
        load_s = time.perf_counter() - t0
        clone = VoiceRef(args.clone_wav, args.clone_text) if args.clone_wav is not None else None
        request = dict(clone=clone, emotion=args.emotion, language=args.language, speed=args.speed, mode=args.mode,
                       speed_factor=args.speed_factor, volume=args.volume, seed=args.seed,
                       temperature=args.temperature, max_tokens=args.max_tokens)
        t1 = time.perf_counter()
        chunks, first = [], None
        for chunk in tts.stream(args.text, args.voice, **request):
            now = time.perf_counter() - t1
            first = now if first is None else first
            chunks.append(chunk)
            if args.stream:
                print(f"chunk {len(chunks)}: {chunk.duration:.3f} s of audio at {1e3 * now:.1f} ms", flush=True)
        total = time.perf_counter() - t1
        audio = Audio.concatenate(chunks, tts.sample_rate)
        if audio.samples.size == 0:
            raise InvalidRequestError("the model produced no speech tokens for this text")
        try:
            path = audio.save(args.out, fmt, args.sample_rate)
        except OSError as exc:
            raise InvalidRequestError(f"--out {args.out}: cannot write: {exc.strerror or exc}") from exc
        file_rate = output_rate(fmt, args.sample_rate, audio.sample_rate)
        print(f"wrote {path}: {fmt} at {file_rate} Hz, {audio.duration:.2f} s of audio ({len(chunks)} chunks"
              f"{', streamed' if args.stream else ''}); load {load_s:.2f} s; first audio {1e3 * first:.1f} ms; "
              f"total {total:.2f} s; RTF {total / audio.duration:.3f}")
        return 0
    finally:
        tts.shutdown()


def _check_tts_folders(args) -> None:
    given = [x is not None for x in (args.model, args.tokenizer)]
    if any(given) and not all(given):
        raise ConfigError("--model and --tokenizer go together (a Step-Audio-TTS-3B and a Step-Audio-Tokenizer folder)")
    for flag, path in (("--model", args.model), ("--tokenizer", args.tokenizer), ("--speakers", args.speakers)):
        if path is not None and not os.path.isdir(path):
            raise CheckpointError(f"{flag} {path}: no such folder")


def _tts_folders(args) -> tuple[dict[str, str], str | None]:
    """({"model", "tokenizer"} folders, the speakers folder): the given ones, or the tiny default's."""
    if args.model is None:
        folders = default_tts_folders()
        print(f"no --model given: using tiny random-weight folders of Step-Audio-TTS-3B, Step-Audio-Tokenizer and a "
              f"speakers folder written under {os.path.dirname(folders['model'])} (their speech is noise)", flush=True)
        return folders, args.speakers or folders["speakers"]
    return {"model": args.model, "tokenizer": args.tokenizer}, args.speakers


def cmd_serve(args) -> int:
    # every option is checked, and the port taken, before anything is written or loaded
    api_key = args.api_key if args.api_key is not None else os.environ.get("STEPVOX_API_KEY") or None
    name = args.served_model_name or (os.path.basename(os.path.normpath(args.model)) if args.model else DEFAULT_TTS)
    chat_name = args.served_chat_model_name or (
        DEFAULT_CHAT if args.chat in (None, TINY_CHAT) else os.path.basename(os.path.normpath(args.chat)))
    config = ServerConfig(model_name=name, chat_model_name=chat_name, api_key=api_key,
                          max_concurrent=args.max_concurrent, max_queue=args.max_queue,
                          max_body_bytes=args.max_body_mib << 20, default_voice=args.default_voice,
                          max_streams=args.max_streams, min_slack_ms=args.min_slack_ms)
    options = {k: v for k, v in dict(kernel_backend=args.kernels, max_model_len=args.max_model_len,
                                     max_num_seqs=args.max_num_seqs, num_kv_pages=args.num_kv_pages,
                                     gpu_memory_utilization=args.gpu_memory_utilization,
                                     enforce_eager=args.eager or None, quantization=args.quantization,
                                     kv_cache_dtype=args.kv_cache_dtype).items() if v is not None}
    EngineConfig(device=args.device, **options).validate()
    _check_tts_folders(args)
    chat_options = _check_chat_options(args)
    if args.voices_dir is not None and os.path.exists(args.voices_dir) and not os.path.isdir(args.voices_dir):
        raise ConfigError(f"--voices-dir {args.voices_dir} is not a folder")
    sock = bind_socket(args.host, args.port)
    try:
        folders, speakers = _tts_folders(args)
        limits = {k: v for k, v in dict(max_text_chars=args.max_text_chars,
                                        max_reference_seconds=args.max_reference_seconds).items() if v is not None}
        device = None if args.device == "auto" else args.device
        t0 = time.perf_counter()
        if args.chat is None:
            model = TTS.from_pretrained(folders["model"], folders["tokenizer"], speakers, device=device,
                                        voices_dir=args.voices_dir, stream_config=args.stream_window, **limits,
                                        **options)
            tts = model
        else:
            model = VoiceChat.from_pretrained(_chat_folder(args), folders["model"], folders["tokenizer"], speakers,
                                              device=device, voices_dir=args.voices_dir, chat_engine_args=options,
                                              tts_engine_args=options, stream_config=args.stream_window,
                                              **chat_options, **limits)
            tts = model.tts
    except BaseException:
        sock.close()
        raise
    if args.default_voice is not None and args.default_voice not in tts.voices():
        model.shutdown()
        sock.close()
        raise UnknownVoiceError(f"--default-voice {args.default_voice!r} is not a voice; known voices: {tts.voices()}")
    host, port = sock.getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host
    kept = f"kept in {args.voices_dir}" if args.voices_dir else "kept in memory only (--voices-dir keeps them)"
    chat_line = ""
    routes = "POST /v1/audio/speech"
    if args.chat is not None:
        asr = "on" if model.transcriber is not None else "off (--no-asr)"
        chat_line = f"; chat model {chat_name} on {model.chat_engine.engine.device}; speech recognition {asr}"
        routes += f", /v1/chat/completions ({chat_name})" + (", /v1/audio/transcriptions" if model.transcriber else "")
    print(f"loaded in {time.perf_counter() - t0:.1f} s on {tts.engine.engine.device}: voices {tts.voices()}; "
          f"registered voices {kept}{chat_line}; API key {'required' if api_key else 'not required'}", flush=True)
    print(f"serving {name} on http://{shown_host}:{port} ({routes}; GET /health, /metrics)", flush=True)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                            format="%(levelname)s:     %(name)s: %(message)s")
    serve(model, config, sock, shutdown_timeout_s=args.shutdown_timeout, log_level=args.log_level,
          access_log=not args.no_access_log)
    return 0


def _check_chat_options(args) -> dict:
    """VoiceChat.from_pretrained's options from the --chat flags, checked before anything loads."""
    chat_only = {"--chat-tensor-parallel-size": args.chat_tensor_parallel_size,
                 "--chat-memory-fraction": args.chat_memory_fraction,
                 "--tts-memory-fraction": args.tts_memory_fraction, "--no-asr": args.no_asr or None,
                 "--served-chat-model-name": args.served_chat_model_name}
    if args.chat is None:
        given = [flag for flag, value in chat_only.items() if value is not None]
        if given:
            raise ConfigError(f"{given[0]} goes with --chat")
        return {}
    if args.chat != TINY_CHAT and not os.path.isdir(args.chat):
        raise CheckpointError(f"--chat {args.chat}: no such folder")
    if args.gpu_memory_utilization is not None:
        raise ConfigError("--gpu-memory-utilization is for a TTS alone; with --chat, split the GPU with "
                          "--chat-memory-fraction and --tts-memory-fraction")
    chat_fraction, tts_fraction = memory_split(args.chat_memory_fraction or CHAT_MEMORY_FRACTION,
                                               args.tts_memory_fraction or TTS_MEMORY_FRACTION,
                                               ("--chat-memory-fraction", "--tts-memory-fraction"))
    tp = args.chat_tensor_parallel_size or 1
    EngineConfig(device=args.device, tensor_parallel_size=tp).validate()
    return dict(chat_tensor_parallel_size=tp, chat_memory_fraction=chat_fraction, tts_memory_fraction=tts_fraction,
                asr=not args.no_asr)


def _chat_folder(args) -> str:
    if args.chat != TINY_CHAT:
        return args.chat
    folder = default_chat_model()
    print(f"--chat {TINY_CHAT}: using a tiny random-weight Step1 chat model written to {folder} (2 layers, hidden 64; "
          "its answers are noise)", flush=True)
    return folder


# ---------------------------------------------------------------- stepvox chat
CHAT_OUT_FORMATS = {"wav": "wav", "mp3": "mp3", "flac": "flac", "ogg": "opus", "opus": "opus", "pcm": "pcm16",
                    "raw": "pcm16"}
CHAT_IN_FORMATS = {"wav": "wav", "mp3": "mp3", "flac": "flac", "ogg": "ogg", "opus": "ogg", "pcm": "pcm16",
                   "raw": "pcm16"}


def cmd_chat(args) -> int:
    # every option is checked before anything is sent
    if not args.url.startswith(("http://", "https://")):
        raise ConfigError(f"--url {args.url}: give the server's address as http://HOST:PORT")
    if args.out is None and (args.voice is not None or args.format is not None):
        raise ConfigError("--voice and --format go with --out (the spoken answer's file)")
    out_format = None
    if args.out is not None:
        out_format = args.format or CHAT_OUT_FORMATS.get(os.path.splitext(args.out)[1].lower().lstrip("."))
        if out_format is None:
            raise InvalidRequestError(f"--out {args.out}: cannot tell the format from the extension "
                                      f"({', '.join('.' + e for e in CHAT_OUT_FORMATS)}); pass --format")
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_dir):
            raise InvalidRequestError(f"--out {args.out}: no such folder {out_dir}")
    audio_part = _audio_part(args.audio) if args.audio is not None else None
    if args.text is not None and not args.text.strip() and audio_part is None:
        raise InvalidRequestError("the text to send is empty")
    api_key = args.api_key if args.api_key is not None else os.environ.get("STEPVOX_API_KEY") or None
    request = {k: v for k, v in dict(model=args.model, max_completion_tokens=args.max_tokens,
                                     temperature=args.temperature, seed=args.seed,
                                     speech_max_tokens=args.speech_max_tokens).items() if v is not None}
    if out_format is not None:
        request["modalities"] = ["text", "audio"]
        request["audio"] = {"format": out_format, **({"voice": args.voice} if args.voice else {})}
    history = [{"role": "system", "content": args.system}] if args.system else []
    if args.text is not None or audio_part is not None:
        parts = ([{"type": "text", "text": args.text}] if args.text else []) + ([audio_part] if audio_part else [])
        _chat_turn(args, request, history, parts, api_key, 1)
        return 0
    interactive = sys.stdin.isatty()
    turn = 0
    while True:
        if interactive:
            sys.stderr.write("you> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            return 0
        if line.strip():
            turn += 1
            _chat_turn(args, request, history, line.strip(), api_key, turn)


def _audio_part(path: str) -> dict:
    fmt = CHAT_IN_FORMATS.get(os.path.splitext(path)[1].lower().lstrip("."))
    if fmt is None:
        raise AudioInputError(f"--audio {path}: cannot tell the format from the extension "
                              f"({', '.join('.' + e for e in CHAT_IN_FORMATS)})")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise AudioInputError(f"--audio {path}: {exc.strerror or exc}") from exc
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode("ascii"), "format": fmt}}


def _chat_turn(args, request: dict, history: list, content, api_key: str | None, turn: int) -> None:
    """One turn: the answer's text printed as it streams, its audio written, the history kept."""
    history.append({"role": "user", "content": content})

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    answer = stream_chat(args.url, {**request, "messages": history}, api_key, on_text=show, timeout_s=args.timeout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    history.append({"role": "assistant", "content": answer.text})
    usage = answer.usage or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", "?")
    report = [f"{usage.get('prompt_tokens', '?')} prompt tokens ({cached} cached), "
              f"{usage.get('completion_tokens', '?')} completion tokens ({answer.finish_reason})"]
    if answer.first_text_s is not None:
        report.append(f"first text {1e3 * answer.first_text_s:.0f} ms")
    if args.out is not None:
        path = args.out if turn == 1 else "{0}-{2}{1}".format(*os.path.splitext(args.out), turn)
        try:
            with open(path, "wb") as f:
                f.write(answer.audio)
        except OSError as exc:
            raise InvalidRequestError(f"--out {path}: cannot write: {exc.strerror or exc}") from exc
        first = f"first audio {1e3 * answer.first_audio_s:.0f} ms, " if answer.first_audio_s is not None else ""
        report.append(f"{first}{len(answer.audio)} bytes of audio written to {path}")
    sys.stderr.write(f"stepvox chat: {'; '.join(report)}\n")


def _format_of(path: str) -> str:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    fmt = {"ogg": "opus", "raw": "pcm"}.get(ext, ext)
    if fmt not in FORMATS:
        raise InvalidRequestError(f"--out {path}: cannot tell the format from the extension; pass --format")
    return fmt


def cmd_quantize(args) -> int:
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    EngineConfig(device=device).validate()
    t0 = time.perf_counter()
    quantize_folder(args.src, args.dst, lm_head=args.lm_head, device=device)
    cfg = Step1Config.from_folder(args.dst)
    size = sum(os.path.getsize(os.path.join(args.dst, f)) for f in os.listdir(args.dst) if f.endswith(".safetensors"))
    print(f"wrote {args.dst}: FP8 linear weights{' and LM head' if args.lm_head else ''} of "
          f"{cfg.num_hidden_layers} layers, {size / 1e9:.2f} GB of safetensors, in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_plan(args) -> int:
    return plan_main(args)


def cmd_bench_kernels(args) -> int:
    if args.list:
        for name, op in OPS.items():
            shape = ",".join(f"{k}={v}" for k, v in op.default_shape.items())
            print(f"{name:22s} {op.family:5s} kernels/{op.module}.py  {shape}  {op.note}")
        return 0
    name = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
        result = kernel_bench.run(args.op, args.shape, args.dtype, device, small=args.small or device.type == "cpu")
    except (KeyError, ValueError, RuntimeError) as exc:
        raise InvalidRequestError(str(exc).strip("'\"")) from None
    print(kernel_bench.format_rows(result["rows"]))
    if result["peaks"]:
        print(f"peaks on {result['device']} (same run): {result['peaks']['matmul_tflops']:.0f} TF/s bf16 matmul, "
              f"{result['peaks']['copy_gbs']:.0f} GB/s copy")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if all(r["ok"] for r in result["rows"]) else 1


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="stepvox", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"stepvox {__version__}")
    sub = ap.add_subparsers(dest="command")
    t = sub.add_parser("tts", help="text to speech with Step-Audio-TTS-3B")
    t.add_argument("text", help="the text to speak (tags such as (高兴1) may be written inline)")
    t.add_argument("--out", required=True, help="audio file to write (.wav .flac .mp3 .ogg .pcm)")
    t.add_argument("--model", help="Step-Audio-TTS-3B folder (with CosyVoice-300M-25Hz/ and -Music/)")
    t.add_argument("--tokenizer", help="Step-Audio-Tokenizer folder")
    t.add_argument("--speakers", help="speakers folder (speakers_info.json + {id}_prompt.wav)")
    t.add_argument("--voices-dir", help="folder of registered voices (kept across runs)")
    t.add_argument("--voice", default="Tingting")
    t.add_argument("--clone-wav", help="a 1-30 s reference recording to clone the voice of")
    t.add_argument("--clone-text", help="the words spoken in --clone-wav")
    t.add_argument("--emotion", help="e.g. 高兴1 高兴2 生气1 生气2 悲伤1 撒娇1")
    t.add_argument("--language", help="e.g. 中文 英文 韩语 日语 四川话 粤语 广东话")
    t.add_argument("--speed", help="spoken speed tag: 慢速1 慢速2 快速1 快速2")
    t.add_argument("--mode", choices=sorted(MODES), default="normal", help="rap and humming use the Music decoder")
    t.add_argument("--speed-factor", type=_positive_float, default=1.0, help="tempo, pitch kept (0.5-2)")
    t.add_argument("--volume", type=float, default=1.0, help="0-4; peaks are kept below full scale")
    t.add_argument("--format", choices=FORMATS, default=None, help="default: from --out's extension")
    t.add_argument("--sample-rate", type=int, choices=RATES, default=None, help="default: 22050 (Opus 24000)")
    t.add_argument("--stream", action="store_true",
                   help="print a line per audio chunk as it arrives (synthesis always streams)")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--stream-window", type=_stream_window, default=None, metavar="HOP+OVERLAP",
                   help="the speech decoder stream's first hop and overlap in audio tokens (multiples "
                   "of 5; default 15+20, upstream's overlap). 5+5 gives the earliest first audio (bench/RESULTS.md); "
                   "the overlap is every window's look-ahead")
    t.add_argument("--temperature", type=float, default=0.7)
    t.add_argument("--max-tokens", type=_positive_int, default=None, help="audio tokens per sentence (default: "
                                                                          "proportional to its length)")
    t.add_argument("--device", default="auto")
    t.add_argument("--max-model-len", type=_positive_int, default=None)
    t.add_argument("--kernels", choices=BACKENDS, default="auto",
                   help="kernel implementation: Triton on GPUs (auto), or force triton / reference")
    _add_precision_options(t, "the TTS model")
    t.set_defaults(func=cmd_tts)
    v = sub.add_parser("serve", help="an OpenAI-compatible speech server (POST /v1/audio/speech; with --chat, "
                                     "voice chat too)")
    v.add_argument("--model", help="Step-Audio-TTS-3B folder (default: tiny random-weight folders)")
    v.add_argument("--tokenizer", help="Step-Audio-Tokenizer folder")
    v.add_argument("--speakers", help="speakers folder (speakers_info.json + {id}_prompt.wav)")
    v.add_argument("--voices-dir", help="folder where voices registered through the API are kept across restarts")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    v.add_argument("--port", type=_port, default=8000, help="TCP port (0: a free one, printed at start)")
    v.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1/ routes (default: $STEPVOX_API_KEY)")
    v.add_argument("--served-model-name", help="the model id of /v1/models (default: the --model folder's name)")
    v.add_argument("--default-voice", help="voice of requests that name none (default: Tingting, or the first)")
    v.add_argument("--max-concurrent", type=_positive_int, default=64, help="speech requests synthesising at once")
    v.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot; beyond them: 429")
    v.add_argument("--max-streams", type=_positive_int, default=None,
                   help="real-time speech streams held at once; beyond them: 429 deadline_risk (default: no limit)")
    v.add_argument("--min-slack-ms", type=float, default=None, metavar="MS",
                   help="refuse speech (429 deadline_risk) while a running stream's recent chunk slack (its "
                        "deadline minus its send time) is below MS (default: off)")
    v.add_argument("--max-body-mib", type=_positive_int, default=16, help="largest request body (413 beyond)")
    v.add_argument("--max-text-chars", type=_positive_int, default=None, help="longest input text (default 5000)")
    v.add_argument("--max-reference-seconds", type=_positive_float, default=None,
                   help="longest voice reference (default 30)")
    v.add_argument("--shutdown-timeout", type=_positive_float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGTERM before they are cancelled")
    v.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info")
    v.add_argument("--no-access-log", action="store_true", help="no line per request")
    v.add_argument("--device", default="auto")
    v.add_argument("--max-model-len", type=_positive_int, default=None)
    v.add_argument("--max-num-seqs", type=_positive_int, default=None, help="LM sequences batched at once")
    v.add_argument("--num-kv-pages", type=_positive_int, default=None, help="KV-cache size in pages")
    v.add_argument("--gpu-memory-utilization", type=_fraction, default=None)
    v.add_argument("--eager", action="store_true", help="no CUDA graphs")
    _add_precision_options(v, "the TTS model (and with --chat the chat model)")
    v.add_argument("--stream-window", type=_stream_window, default=None, metavar="HOP+OVERLAP",
                   help="the speech decoder stream's first hop and overlap in audio tokens (multiples "
                   "of 5; default 15+20, upstream's overlap). 5+5 gives the earliest first audio (bench/RESULTS.md); "
                   "the overlap is every window's look-ahead")
    v.add_argument("--kernels", choices=BACKENDS, default="auto",
                   help="kernel implementation: Triton on GPUs (auto), or force triton / reference")
    v.add_argument("--chat", nargs="?", const=TINY_CHAT, metavar="DIR",
                   help="also serve voice chat (/v1/chat/completions, /v1/audio/transcriptions) with this Step1 chat "
                        f"model folder (Step-Audio-Chat, or a smaller stand-in); `--chat` or `--chat {TINY_CHAT}`: a "
                        "tiny random-weight one")
    v.add_argument("--chat-tensor-parallel-size", type=_positive_int, default=None,
                   help="GPUs the chat model is split over (default 1)")
    v.add_argument("--chat-memory-fraction", type=_fraction, default=None,
                   help=f"of each GPU for the chat engine (default {CHAT_MEMORY_FRACTION})")
    v.add_argument("--tts-memory-fraction", type=_fraction, default=None,
                   help=f"of the GPU for the TTS engine (default {TTS_MEMORY_FRACTION}); the two together at most "
                        f"{MAX_MEMORY_FRACTION}")
    v.add_argument("--no-asr", action="store_true", help="with --chat: no speech recognition (saves the ASR decoder's "
                                                          "memory; /v1/audio/transcriptions answers 404)")
    v.add_argument("--served-chat-model-name", help="the chat model's id in /v1/models (default: the --chat folder's "
                                                    "name)")
    v.set_defaults(func=cmd_serve)
    c = sub.add_parser("chat", help="talk to a running stepvox server (text or audio in, text and speech out)")
    c.add_argument("text", nargs="?", help="what to say (default: each line of stdin is a turn, the history kept)")
    c.add_argument("--audio", help="an audio file to send (.wav .mp3 .flac .ogg; .pcm: 24 kHz 16-bit mono)")
    c.add_argument("--out", help="write the spoken answer to this file (.wav .mp3 .flac .ogg .pcm); later turns to "
                                 "FILE-2.ext, ...")
    c.add_argument("--format", choices=sorted(set(CHAT_OUT_FORMATS.values())), default=None,
                   help="of --out (default: from its extension)")
    c.add_argument("--voice", help="the voice that speaks the answer (default: the server's)")
    c.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    c.add_argument("--api-key", help="sent as Authorization: Bearer KEY (default: $STEPVOX_API_KEY)")
    c.add_argument("--model", help="the chat model to ask for (default: the server's)")
    c.add_argument("--system", help="a system prompt")
    c.add_argument("--max-tokens", type=_positive_int, default=None, help="answer tokens at most")
    c.add_argument("--speech-max-tokens", type=_positive_int, default=None,
                   help="speech tokens per spoken sentence at most (default: by its length)")
    c.add_argument("--temperature", type=float, default=None)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--timeout", type=_positive_float, default=300.0, help="seconds to wait for the server")
    c.set_defaults(func=cmd_chat)
    g = sub.add_parser("generate", help="generate from a Step1 model folder")
    g.add_argument("--model", help="Step1 folder (config.json, safetensors, tokenizer.model)")
    g.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    g.add_argument("--batch", type=_positive_int, default=1, help="number of requests (prompts repeated)")
    g.add_argument("--max-tokens", type=_positive_int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto")
    g.add_argument("--tp", type=_positive_int, default=1, help="tensor-parallel size")
    g.add_argument("--max-model-len", type=_positive_int, default=None)
    g.add_argument("--eager", action="store_true", help="no CUDA graphs")
    g.add_argument("--kernels", choices=BACKENDS, default="auto",
                   help="kernel implementation: Triton on GPUs (auto), or force triton / reference")
    _add_precision_options(g, "the model")
    g.set_defaults(func=cmd_generate)
    q = sub.add_parser("quantize", help="write an FP8 copy of a Step1 folder (W8A16, per-channel scales)")
    q.add_argument("src", help="a Step1 folder as released (bf16 safetensors)")
    q.add_argument("dst", help="the new folder (must not exist)")
    q.add_argument("--lm-head", action="store_true", help="quantize the LM head too")
    q.add_argument("--device", default="auto", help="where the scales are computed (auto: cuda if available)")
    q.set_defaults(func=cmd_quantize)
    p = sub.add_parser("plan", help="tensor-parallel plan: weights per rank, KV tokens, ms/token floor")
    p.add_argument("--model", help="model folder (its config.json); default: the 130B chat shape")
    p.add_argument("--tp", type=_positive_int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--gpu-mem-gib", type=_positive_float, default=80.0)
    p.add_argument("--bandwidth-tbs", type=_positive_float, default=3.35)
    p.add_argument("--gpu-memory-utilization", type=_fraction, default=0.9)
    p.add_argument("--formats", nargs="+", choices=("bf16", "fp8", "fp8+kv8"), default=None,
                   help="weight formats to plan (default: all; fp8+kv8 adds the one-byte KV cache, --kv-cache-dtype fp8)")
    p.set_defaults(func=cmd_plan)
    b = sub.add_parser("bench", help="benchmarks: `stepvox bench kernels` checks and times single kernel ops")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    k = bsub.add_parser("kernels", help="check each kernel against its reference and time it (GPU): TF/s, GB/s, "
                                        "fraction of the card's measured peaks, power and clock (NVML); NVTX ranges "
                                        "stepvox.<op> for nsys/ncu")
    k.add_argument("--op", action="append", help="an op to run (repeatable; default: all; --list names them)")
    k.add_argument("--shape", help="the op's shape parameters, e.g. batch=16,context=8192 (with one --op)")
    k.add_argument("--dtype", choices=sorted(kernel_bench.DTYPES), default="bf16",
                   help="activations' dtype (an op without it runs in its first; CPU: use fp32 or fp16)")
    k.add_argument("--small", action="store_true", help="the small test shapes (always on the CPU)")
    k.add_argument("--device", default="auto", help="auto: cuda if available (on the CPU set TRITON_INTERPRET=1 "
                                                     "before starting: the check runs under the interpreter)")
    k.add_argument("--json", help="write the rows and the peaks to this file")
    k.add_argument("--list", action="store_true", help="list the ops with their default shapes")
    k.set_defaults(func=cmd_bench_kernels)
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv = ["generate"] + argv                 # `stepvox --model DIR` means generate
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except StepvoxError as exc:
        sys.stderr.write(f"stepvox: error: {_one_line(exc)}\n")
        return 2 if isinstance(exc, USER_ERRORS) else 1
    except KeyboardInterrupt:
        sys.stderr.write("stepvox: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
