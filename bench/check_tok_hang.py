"""GPU check of the audio tokenizer's graph-replay hang (released-size folder; bench/RESULTS.md,
2026-12-06). Each mode runs in its own process with a watchdog: base (the committed code: S3 graphs
joined before the Paraformer's), serial (forces that join), ownstream (each capture on its own
stream, hence its own cuBLAS workspace), only (one model per call), nows (no cuBLAS workspace), bf16,
prof (the fp32 GEMM kernels' names). Expected after the fix: every mode OK.

    python bench/check_tok_hang.py
"""
import os, sys, time, threading, subprocess
ROOT, MODE = "/tmp/tokfull", (sys.argv[1] if len(sys.argv) > 1 else None)
if MODE is None:
    from stepvox.testing.tokenizer import FULL, write_tokenizer_dir
    write_tokenizer_dir(ROOT, FULL, seed=0)
    for m in ("base", "serial", "ownstream", "only", "nows", "bf16", "prof"):
        env = dict(os.environ, **({"CUBLAS_WORKSPACE_CONFIG": ":0:0", "CUBLASLT_WORKSPACE_SIZE": "0"} if m == "nows" else {}))
        try: r = subprocess.run([sys.executable, __file__, m], env=env, timeout=240, capture_output=True, text=True); out = r.stdout + r.stderr[-600:]
        except subprocess.TimeoutExpired: out = "TIMEOUT (killed)"
        print(f"===== {m}\n{out}", flush=True)
    sys.exit()
import numpy as np, torch
import stepvox.engine.device.graphs as G
from stepvox.engine.audio.tokenizer import AudioTokenizer
from stepvox.engine.models.s3tokenizer import SemanticTokenizer
phase = ["load", time.time()]
def watchdog():                                   # replays take ms: 25 s without progress = hung GPU
    while time.sleep(1) or True:
        if time.time() - phase[1] > (240 if phase[0] in ("load", "call1") else 25): print("HANG in", phase[0], flush=True); os._exit(3)
threading.Thread(target=watchdog, daemon=True).start()
if MODE == "serial":                              # S3 replays finish before the Paraformer replay starts
    launch = SemanticTokenizer.launch; SemanticTokenizer.launch = lambda s, mels, wait=True, **k: launch(s, mels, True, **k)
if MODE == "ownstream":                           # every capture on its own stream -> its own cuBLAS workspace
    capture, held = G.capture_graph, []
    def own(*a):
        held.append(torch.cuda.Stream()); torch.cuda.graph.default_capture_stream = held[-1]; return capture(*a)
    G.capture_graph = own
sr = 22050; t = np.arange(3 * sr) / sr
wav = (0.3 * np.sin(2 * np.pi * (150 + 40 * np.sin(3 * t)) * t) * np.abs(np.sin(4 * t)) + 0.01 * np.random.default_rng(0).standard_normal(t.size)).astype(np.float32)
tok = AudioTokenizer.from_pretrained(ROOT, device="cuda", dtype=torch.bfloat16 if MODE == "bf16" else torch.float32, use_cuda_graphs=MODE != "prof")
if MODE == "prof":                                # which cuBLAS kernels the fp32 GEMMs use (look for split-K / stream-K)
    tok.encode(wav, sr, trim=True)
    with torch.profiler.profile() as p: tok.encode(wav, sr, trim=True); torch.cuda.synchronize()
    print("\n".join(sorted({e.name[:140] for e in p.events() if e.device_type.name == "CUDA" and any(s in e.name.lower() for s in ("gemm", "split", "xmma", "cutlass"))}))); sys.exit()
x = torch.from_numpy(wav[:48000])
for i in range(1, 5):
    phase[:] = [f"call{i}", time.time()]
    n = len(tok.vq02_codes([x])[0]) + len(tok.vq06_codes([x])[0]) if MODE == "only" else len(tok.encode(wav, sr, trim=True))
    print(MODE, phase[0], n, "codes/ids", f"{time.time() - phase[1]:.3f} s", flush=True)
print("OK", MODE, "capture streams:", len({s.cuda_stream for s in held}) if MODE == "ownstream" else "-")
