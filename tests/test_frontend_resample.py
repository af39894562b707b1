"""Band-limited resampling (engine/frontend/resample.py)."""
from __future__ import annotations

import pytest
import torch
import torchaudio

from stepvox.engine.frontend.resample import StreamingResampler, resample


# ---------------------------------------------------------------- offline resample (speech decoder side:
# prompt mel at 22.05 kHz, CAM++ at 16 kHz; ported from test_speech_decoder_audio.py)
@pytest.mark.parametrize("orig,new", [(22050, 16000), (16000, 22050), (44100, 22050), (24000, 16000), (8000, 22050)])
def test_resample_matches_torchaudio(orig, new):
    x = torch.randn(2, 3000, generator=torch.Generator().manual_seed(orig)) * 0.1
    torch.testing.assert_close(resample(x, orig, new), torchaudio.transforms.Resample(orig, new)(x), atol=1e-6, rtol=1e-5)
    assert resample(x, orig, orig) is x


# ---------------------------------------------------------------- streaming resampler (audio tokenizer side:
# live input to 16 kHz; ported from test_audio_tokenizer.py)
def test_streaming_resampler_matches_offline():
    g = torch.Generator().manual_seed(0)
    x = 0.1 * torch.randn(44100, generator=g)
    rs = StreamingResampler(44100, 16000)
    pieces, i = [], 0
    for n in [1, 7, 1000, 5000, 13, 20000, 30000]:
        pieces.append(rs.push(x[i:i + n]))
        i += n
    pieces.append(rs.finish())
    torch.testing.assert_close(torch.cat(pieces), resample(x, 44100, 16000), atol=1e-6, rtol=0)
