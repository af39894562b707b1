"""The `stepvox` command end to end, as the README runs it: no model given -> a tiny random
checkpoint is written, generation runs and throughput is reported; `stepvox tts` writes the tiny
TTS folders, speaks and writes the file in the format asked for, reporting latency and RTF;
`stepvox plan` prints the table. User errors are one line on stderr and exit code 2; the default
checkpoint appears atomically (issue 14, item 7)."""
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest
import soundfile as sf
import torch

import stepvox
from stepvox import cli
from stepvox.testing import FIXTURES_VERSION
from stepvox.cli import COMPLETE_MARKER, DEFAULT_MODEL, DEFAULT_TTS, STALE_PARTIAL_S, default_model, main
from stepvox.engine.config import Step1Config
from stepvox.engine.models.step1_checkpoint import CheckpointReader
from stepvox.engine.tokenizer import Step1Tokenizer
from stepvox.testing.step1 import config_dict, write_random_step1
from stepvox.testing.tts import SPEAKERS


def _run(args, tmp_path):
    # a fresh shell has no TRITON_INTERPRET (conftest sets it for this process): "auto" picks the
    # reference kernels on the CPU, as on a machine without a GPU
    env = dict(os.environ, TMPDIR=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "stepvox.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_generate_on_the_embedded_default(tmp_path):
    proc = _run(["generate", "--device", "cpu", "--max-tokens", "6", "--batch", "2", "--ignore-eos"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "tiny random-weight Step1 checkpoint written to" in out
    assert os.path.isfile(tmp_path / "stepvox-tiny-step1" / "model.safetensors.index.json")
    assert out.count("-> 6 tokens (length)") == 2
    rate = re.search(r"([\d.]+) generated tokens/s", out)
    assert rate and float(rate.group(1)) > 0


def test_plan_prints_the_chat_model_table(tmp_path):
    proc = _run(["plan", "--tp", "4", "8"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "| 4 | bf16 | 61.4 GiB |" in proc.stdout and "| 8 | bf16 | 30.7 GiB |" in proc.stdout
    assert "| 4 | fp8 | 31.2 GiB |" in proc.stdout and "| 8 | fp8+kv8 | 15.6 GiB |" in proc.stdout
    only = _run(["plan", "--tp", "1", "--formats", "fp8", "--gpu-mem-gib", "139"], tmp_path)
    assert only.returncode == 0 and "| 1 | fp8 | 124.6 GiB |" in only.stdout and "| bf16 |" not in only.stdout


# ---------------------------------------------------------------- user errors: one line, exit 2
def _main(argv, capsys):
    """stepvox.cli.main in this process: (exit code, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exc:                      # argparse errors and --version exit from the parser
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def bad_config_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-config")
    (folder / "config.json").write_text(json.dumps(config_dict(hidden_size="64")))
    return folder


@pytest.mark.parametrize("argv, says", [
    (["generate", "--model", "/nonexistent"], "--model /nonexistent: no such folder"),
    (["--model", "/nonexistent"], "--model /nonexistent: no such folder"),          # generate is the default
    (["generate", "--max-tokens", "0"], "argument --max-tokens: expected a positive integer, got '0'"),
    (["generate", "--max-tokens", "2.5"], "argument --max-tokens: expected a positive integer, got '2.5'"),
    (["generate", "--batch", "0"], "argument --batch: expected a positive integer, got '0'"),
    (["generate", "--tp", "-1"], "argument --tp: expected a positive integer, got '-1'"),
    (["generate", "--device", "banana"], "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'banana'"),
    (["generate", "--dtype", "int8"], "dtype must be 'auto' or one of"),
    (["generate", "--temperature", "nan"], r"temperature must be a finite number in \[0, 10000\], got nan"),
    (["generate", "--top-p", "0"], r"top_p must be a finite number in \(0, 1\], got 0.0"),
    (["generate", "--top-k", "2.5"], "argument --top-k: invalid int value: '2.5'"),
    (["generate", "--seed", str(2**63)], r"seed must be an integer in \[0, 9223372036854775807\]"),
    (["generate", "--kernels", "cuda"], "argument --kernels: invalid choice: 'cuda'"),
    (["generate", "--bogus"], "unrecognized arguments: --bogus"),
    (["plan", "--tp", "0"], "argument --tp: expected a positive integer, got '0'"),
    (["plan", "--tp", "4", "-2"], "argument --tp: expected a positive integer, got '-2'"),
    (["plan", "--bandwidth-tbs", "0"], "argument --bandwidth-tbs: expected a positive number, got '0'"),
    (["plan", "--bandwidth-tbs", "inf"], "argument --bandwidth-tbs: expected a positive number, got 'inf'"),
    (["plan", "--gpu-mem-gib", "0"], "argument --gpu-mem-gib: expected a positive number, got '0'"),
    (["plan", "--gpu-memory-utilization", "1.5"], "argument --gpu-memory-utilization: expected a fraction"),
    (["plan", "--model", "/nonexistent"], "/nonexistent has no config.json"),
])
def test_user_errors_are_one_line_and_exit_2(argv, says, capsys):
    code, out, err = _main(argv, capsys)
    assert code == 2, err
    assert re.fullmatch(rf"stepvox: error: .*{says}.*\n", err), err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("command", ["generate", "plan"])
def test_a_folder_with_a_bad_config_json(command, bad_config_folder, capsys):
    code, out, err = _main([command, "--model", str(bad_config_folder)], capsys)
    assert code == 2
    assert err == f"stepvox: error: {bad_config_folder}/config.json: hidden_size must be an integer, got '64'\n"


def test_no_cuda_device_is_a_user_error(capsys, tiny_model):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    code, out, err = _main(["generate", "--model", tiny_model, "--device", "cuda"], capsys)
    assert code == 2 and err == "stepvox: error: device 'cuda' requested but no CUDA device is available\n"


def test_version(capsys):
    code, out, err = _main(["--version"], capsys)
    assert code == 0 and out == f"stepvox {stepvox.__version__}\n"


def test_user_errors_in_a_fresh_process(tmp_path):
    """The same through the installed entry point's module: exit status 2, one line, no traceback."""
    for args in (["generate", "--model", "/nonexistent"], ["generate", "--device", "banana"], ["plan", "--tp", "0"],
                 ["tts", "", "--out", str(tmp_path / "a.wav")],
                 ["tts", "hi", "--out", str(tmp_path / "a.wav"), "--clone-wav", str(tmp_path / "a.wav")]):
        proc = _run(args, tmp_path)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith("stepvox: error: ") and proc.stdout == ""
    proc = _run(["--version"], tmp_path)
    assert proc.returncode == 0 and proc.stdout == f"stepvox {stepvox.__version__}\n"


# ---------------------------------------------------------------- the embedded default checkpoint
def _is_complete(folder) -> bool:
    cfg = Step1Config.from_folder(str(folder))
    with CheckpointReader(str(folder), cfg):
        pass
    Step1Tokenizer.from_folder(str(folder), cfg.vocab_size)
    return (folder / COMPLETE_MARKER).is_file()


def _partials(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{DEFAULT_MODEL}.partial-"))


def test_default_checkpoint_appears_atomically(tmp_path, monkeypatch):
    final = tmp_path / DEFAULT_MODEL
    seen = []

    def writer(folder, **kwargs):
        seen.append((folder, final.exists()))
        return write_random_step1(folder, **kwargs)

    monkeypatch.setattr(cli, "write_random_step1", writer)
    assert default_model(str(tmp_path)) == str(final)
    [(written, final_existed)] = seen
    assert written != str(final) and os.path.dirname(written) == str(tmp_path)   # a sibling, renamed into place
    assert not final_existed and _is_complete(final) and _partials(tmp_path) == []
    assert default_model(str(tmp_path)) == str(final) and len(seen) == 1          # reused, not rewritten


def test_an_interrupted_writer_leaves_nothing_that_is_reused(tmp_path, monkeypatch):
    """Ctrl-C while writing once left a folder with a config.json that every later run took for a
    checkpoint and failed on."""
    def interrupted(folder, **kwargs):
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config_dict(), f)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "write_random_step1", interrupted)
    with pytest.raises(KeyboardInterrupt):
        default_model(str(tmp_path))
    assert not (tmp_path / DEFAULT_MODEL).exists() and _partials(tmp_path) == []
    monkeypatch.undo()
    assert _is_complete(pathlib.Path(default_model(str(tmp_path))))


def test_partial_folders_of_killed_or_older_writers_are_not_reused(tmp_path):
    final = tmp_path / DEFAULT_MODEL
    final.mkdir()                                   # an older writer's: config.json, one shard, no marker
    (final / "config.json").write_text(json.dumps(config_dict()))
    (final / "model-00001.safetensors").write_bytes(b"partial")
    killed = tmp_path / f".{DEFAULT_MODEL}.partial-killed"      # a writer killed mid-way (SIGKILL: no cleanup)
    killed.mkdir()
    (killed / "config.json").write_text(json.dumps(config_dict()))
    stale = tmp_path / f".{DEFAULT_MODEL}.partial-stale"
    stale.mkdir()
    os.utime(stale, (time.time() - 2 * STALE_PARTIAL_S,) * 2)
    assert default_model(str(tmp_path)) == str(final)
    assert _is_complete(final)
    assert _partials(tmp_path) == [killed.name]     # a recent one may be a live writer's: left alone, unused


def test_folders_of_an_older_fixtures_version_are_written_again(tmp_path):
    """A default folder from an older stepvox (its tokenizer without the ASR weights) once made
    `serve --chat` fail; its marker names another version, so it is replaced."""
    final = pathlib.Path(default_model(str(tmp_path)))
    marker = final / COMPLETE_MARKER
    assert marker.read_text() == FIXTURES_VERSION
    marker.write_text("1")
    (final / "stale-file").write_text("from an older writer")
    assert default_model(str(tmp_path)) == str(final)
    assert marker.read_text() == FIXTURES_VERSION and not (final / "stale-file").exists() and _is_complete(final)


def test_generate_after_an_interrupted_default_write(tmp_path):
    """End to end: the partial folder an interrupted writer leaves does not stop a fresh run."""
    final = tmp_path / DEFAULT_MODEL
    final.mkdir()
    (final / "config.json").write_text(json.dumps(config_dict()))
    proc = _run(["generate", "--device", "cpu", "--max-tokens", "2", "--ignore-eos"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "-> 2 tokens (length)" in proc.stdout and (final / COMPLETE_MARKER).is_file()


# ---------------------------------------------------------------- stepvox tts
TTS_RUN = ["--device", "cpu", "--max-tokens", "20", "--seed", "1"]     # ~0.5 s of speech: short CPU runs


@pytest.fixture(scope="module")
def tts_home(tmp_path_factory):
    """The TMPDIR the tts runs share: the first run writes the tiny default folders, later ones reuse
    them. Returns (that folder, the first run's process, the file it wrote)."""
    home = tmp_path_factory.mktemp("tts-home")
    out = home / "hello.wav"
    return home, _run(["tts", "你好。", "--out", str(out), *TTS_RUN], home), out


def _tts_report(stdout: str) -> dict:
    m = re.search(r"wrote (\S+): (\w+) at (\d+) Hz, ([\d.]+) s of audio \((\d+) chunks(, streamed)?\); load [\d.]+ s; "
                  r"first audio ([\d.]+) ms; total [\d.]+ s; RTF ([\d.]+)", stdout)
    assert m, stdout
    return dict(path=m.group(1), format=m.group(2), rate=int(m.group(3)), seconds=float(m.group(4)),
                chunks=int(m.group(5)), streamed=bool(m.group(6)), first_ms=float(m.group(7)), rtf=float(m.group(8)))


def test_tts_on_the_embedded_default(tts_home):
    home, proc, out = tts_home
    assert proc.returncode == 0, proc.stderr
    assert "no --model given: using tiny random-weight folders" in proc.stdout
    root = home / DEFAULT_TTS
    assert f"written under {root}" in proc.stdout and (root / COMPLETE_MARKER).is_file()
    for sub in ("Step-Audio-TTS-3B/CosyVoice-300M-25Hz", "Step-Audio-TTS-3B/CosyVoice-300M-25Hz-Music",
                "Step-Audio-Tokenizer", "speakers"):
        assert (root / sub).is_dir(), sub
    assert sorted(p.name for p in home.iterdir() if p.name.startswith(f".{DEFAULT_TTS}.partial-")) == []
    report = _tts_report(proc.stdout)
    assert report["path"] == str(out) and report["format"] == "wav" and report["rate"] == 22050
    assert report["first_ms"] > 0 and report["rtf"] > 0 and report["seconds"] > 0 and not report["streamed"]
    samples, rate = sf.read(out, dtype="float32")
    assert rate == 22050 and samples.ndim == 1 and samples.size > 0
    assert abs(samples.size / rate - report["seconds"]) < 0.01
    assert proc.stderr.count("Traceback") == 0


def test_tts_streams_mp3_at_another_rate_reusing_the_default(tts_home):
    home, first, _ = tts_home
    assert first.returncode == 0, first.stderr
    marker = home / DEFAULT_TTS / COMPLETE_MARKER
    written = marker.stat().st_mtime_ns
    out = home / "hello.mp3"
    proc = _run(["tts", "Hello there.", "--out", str(out), "--stream", "--sample-rate", "24000", *TTS_RUN], home)
    assert proc.returncode == 0, proc.stderr
    assert marker.stat().st_mtime_ns == written                     # the folders are reused, not rewritten
    report = _tts_report(proc.stdout)
    assert report["format"] == "mp3" and report["rate"] == 24000 and report["streamed"]
    chunks = re.findall(r"^chunk (\d+): ([\d.]+) s of audio at ([\d.]+) ms$", proc.stdout, re.MULTILINE)
    assert [int(c[0]) for c in chunks] == list(range(1, report["chunks"] + 1))
    assert float(chunks[0][2]) == report["first_ms"]
    assert abs(sum(float(c[1]) for c in chunks) - report["seconds"]) < 0.01 * len(chunks)
    samples, rate = sf.read(out, dtype="float32")
    assert rate == 24000 and samples.size > 0
    assert abs(samples.size / rate - report["seconds"]) < 0.1                # MP3 pads a little


def test_tts_stream_window_reaches_the_decoder(tts_home):
    """--stream-window 5+5 cuts the same speech into more, shorter windows than the default 15+20."""
    home, first, _ = tts_home
    assert first.returncode == 0, first.stderr
    reports = {}
    for window in ("15+20", "5+5"):
        out = home / f"window-{window}.wav"
        proc = _run(["tts", "Hello there.", "--out", str(out), "--stream", "--stream-window", window,
                     "--device", "cpu", "--max-tokens", "60", "--seed", "1"], home)
        assert proc.returncode == 0, proc.stderr
        reports[window] = _tts_report(proc.stdout)
    assert reports["5+5"]["chunks"] > reports["15+20"]["chunks"]
    assert reports["5+5"]["seconds"] == pytest.approx(reports["15+20"]["seconds"], abs=0.01)


def test_tts_unknown_voice_lists_the_known_ones(tts_home):
    home, first, _ = tts_home
    assert first.returncode == 0, first.stderr
    out = home / "nobody.wav"
    proc = _run(["tts", "hi", "--out", str(out), "--voice", "Nobody", *TTS_RUN], home)
    assert proc.returncode == 2
    known = ", ".join(repr(v) for v in sorted(SPEAKERS))
    assert proc.stderr == f"stepvox: error: unknown voice 'Nobody'; known voices: [{known}]\n"
    assert not out.exists()


@pytest.mark.parametrize("argv, says", [
    (["", "--out", "a.wav"], "the text to speak is empty"),
    (["  \n ", "--out", "a.wav"], "the text to speak is empty"),
    (["hi", "--out", "a.wav", "--clone-wav", "ref.wav"], "--clone-wav and --clone-text go together"),
    (["hi", "--out", "a.wav", "--clone-text", "words"], "--clone-wav and --clone-text go together"),
    (["hi", "--out", "a.wav", "--clone-wav", "/nonexistent.wav", "--clone-text", "w"],
     "--clone-wav /nonexistent.wav: no such file"),
    (["hi", "--out", "a.xyz"], "--out a.xyz: cannot tell the format from the extension; pass --format"),
    (["hi", "--out", "/nonexistent/a.wav"], "--out /nonexistent/a.wav: no such folder /nonexistent"),
    (["hi", "--out", "a.ogg", "--sample-rate", "22050"], r"Opus codes \(16000, 24000, 48000\) Hz only"),
    (["hi", "--out", "a.wav", "--sample-rate", "8000"], "argument --sample-rate: invalid choice: 8000"),
    (["hi", "--out", "a.wav", "--volume", "nan"], r"volume must be a finite number in \[0, 4\], got nan"),
    (["hi", "--out", "a.wav", "--speed-factor", "3"], r"speed_factor must be a finite number in \[0.5, 2\]"),
    (["hi", "--out", "a.wav", "--temperature", "-1"], r"temperature must be a finite number in \[0, 10000\]"),
    (["hi", "--out", "a.wav", "--seed", "-1"], r"seed must be an integer in \[0, 9223372036854775807\]"),
    (["hi", "--out", "a.wav", "--max-tokens", "0"], "argument --max-tokens: expected a positive integer, got '0'"),
    (["hi", "--out", "a.wav", "--emotion", "(高兴1)"], "emotion must be a tag word without parentheses"),
    (["hi", "--out", "a.wav", "--mode", "opera"], "argument --mode: invalid choice: 'opera'"),
    (["hi", "--out", "a.wav", "--model", "/nonexistent"], "--model and --tokenizer go together"),
    (["hi", "--out", "a.wav", "--speakers", "/nonexistent"], "--speakers /nonexistent: no such folder"),
    (["hi", "--out", "a.wav", "--device", "banana"], "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (["hi"], "the following arguments are required: --out"),
    (["hi", "--out", "a.wav", "--stream-window", "7+5"], "first_hop_tokens must be a positive multiple of 5, got 7"),
    (["hi", "--out", "a.wav", "--stream-window", "5"], "expected HOP\\+OVERLAP, e.g. 5\\+5, got '5'"),
    (["hi", "--out", "a.wav", "--stream-window", "a+b"], "expected HOP\\+OVERLAP"),
])
def test_tts_user_errors_come_before_anything_is_written_or_loaded(argv, says, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "default_tts_folders", lambda *a: pytest.fail("the default folders were written"))
    monkeypatch.setattr(cli.TTS, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    code, out, err = _main(["tts", *argv], capsys)
    assert code == 2, err
    assert re.fullmatch(rf"stepvox: error: .*{says}.*\n", err), err
    assert err.count("\n") == 1 and out == "" and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- stepvox chat (against a server: test_server_chat.py)
@pytest.mark.parametrize("argv, says", [
    (["hi", "--url", "ftp://host"], "--url ftp://host: give the server's address as http://HOST:PORT"),
    (["hi", "--voice", "Tingting"], "--voice and --format go with --out"),
    (["hi", "--out", "a.xyz"], "--out a.xyz: cannot tell the format from the extension"),
    (["hi", "--out", "/nonexistent/a.wav"], "--out /nonexistent/a.wav: no such folder /nonexistent"),
    (["--audio", "/nonexistent.wav"], "--audio /nonexistent.wav: No such file or directory"),
    (["--audio", "question.txt"], "--audio question.txt: cannot tell the format from the extension"),
    (["  "], "the text to send is empty"),
    (["hi", "--max-tokens", "0"], "argument --max-tokens: expected a positive integer, got '0'"),
    (["hi", "--out", "a.wav", "--format", "aac"], "argument --format: invalid choice: 'aac'"),
])
def test_chat_user_errors_come_before_anything_is_sent(argv, says, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "stream_chat", lambda *a, **k: pytest.fail("a request was sent"))
    code, out, err = _main(["chat", *argv], capsys)
    assert code == 2, err
    assert re.fullmatch(rf"stepvox: error: .*{says}.*\n", err), err
    assert err.count("\n") == 1 and out == "" and list(tmp_path.iterdir()) == []
