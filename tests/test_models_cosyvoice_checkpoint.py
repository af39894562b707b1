"""flow.pt / hift.pt (engine/models/cosyvoice_checkpoint.py): released key layout at full size (meta
device), strict loading through the one loader, typed errors."""
from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

from stepvox.engine.audio.decoder import SpeechDecoder
from stepvox.engine.errors import CheckpointError, MissingTensorsError, TensorShapeError, UnexpectedTensorsError
from stepvox.engine.models.cosyvoice_checkpoint import checkpoint_layout, fold_weight_norm, load_weights
from stepvox.engine.models.cosyvoice_config import config_from_data
from stepvox.engine.models.flow import FlowModel
from stepvox.engine.models.hift import HiFTGenerator
from stepvox.engine.models.yaml_reader import parse_inert_yaml
from stepvox.testing.cosyvoice import (FULL_SIZES, TINY_SIZES, random_state_dict, spec_flow_layout, spec_hift_layout,
                                       write_cosyvoice_dir, yaml_text)


def test_full_size_layout_matches_released_files():
    cfg = config_from_data(parse_inert_yaml(yaml_text(FULL_SIZES)))
    with torch.device("meta"):
        flow, hift = FlowModel(cfg.flow), HiFTGenerator(cfg.hift)
    flow_layout, hift_layout = checkpoint_layout(flow), checkpoint_layout(hift)
    assert len(flow_layout) == 1185 and len(hift_layout) == 227              # SPEC §3.3 / §3.4 key counts
    assert flow_layout == spec_flow_layout(FULL_SIZES)
    assert hift_layout == spec_hift_layout(FULL_SIZES)
    # parameter totals that match the released file sizes (422 MB / 81.9 MB of fp32)
    assert sum(math.prod(s) for s in flow_layout.values()) == 105_399_040
    assert sum(math.prod(s) for s in hift_layout.values()) == 20_460_591


def _copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_unexpected_and_misshaped_tensors(cosyvoice_dir, tmp_path, reference_kernels):
    flow_sd = torch.load(os.path.join(cosyvoice_dir, "flow.pt"))
    cases = []
    sd = dict(flow_sd); del sd["encoder.after_norm.bias"]
    cases.append((sd, MissingTensorsError, r"flow.pt: 1 tensors the model needs are missing: encoder.after_norm.bias"))
    sd = dict(flow_sd); sd["encoder.extra.weight"] = torch.zeros(3)
    cases.append((sd, UnexpectedTensorsError, r"flow.pt: 1 tensors the model does not have: encoder.extra.weight"))
    sd = dict(flow_sd); sd["input_embedding.weight"] = torch.zeros(4096, TINY_SIZES["in_dim"])
    cases.append((sd, TensorShapeError, r"1 tensors have the wrong shape: input_embedding.weight: file \[4096, 16\], "
                                        r"model \[5120, 16\] \(flow.vocab_size x flow.input_size\)"))
    sd = dict(flow_sd); sd["encoder_proj.bias"] = torch.full((80,), float("nan"))
    cases.append((sd, CheckpointError, "NaN.*encoder_proj.bias"))
    for i, (sd, err, msg) in enumerate(cases):
        d = _copy_dir(cosyvoice_dir, str(tmp_path / f"case{i}"))
        torch.save(sd, os.path.join(d, "flow.pt"))
        with pytest.raises(err, match=msg):
            SpeechDecoder.from_pretrained(d, device="cpu", kernels=reference_kernels)


def test_bad_files(cosyvoice_dir, tmp_path, reference_kernels):
    d = _copy_dir(cosyvoice_dir, str(tmp_path / "m"))
    marker = tmp_path / "pwned"

    class Gadget:          # a pickle that would run code on load: weights_only refuses it
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Gadget()}, os.path.join(d, "hift.pt"))
    with pytest.raises(CheckpointError, match=rf"hift.pt: refused: the file asks to build `{os.system.__module__}.system`"):
        SpeechDecoder.from_pretrained(d, device="cpu", kernels=reference_kernels)
    assert not marker.exists()
    with open(os.path.join(d, "hift.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable tensor state dict"):
        SpeechDecoder.from_pretrained(d, device="cpu", kernels=reference_kernels)
    torch.save([torch.zeros(2)], os.path.join(d, "hift.pt"))
    with pytest.raises(CheckpointError, match="state dict"):
        SpeechDecoder.from_pretrained(d, device="cpu", kernels=reference_kernels)
    os.remove(os.path.join(d, "hift.pt"))
    with pytest.raises(CheckpointError, match="not found"):
        SpeechDecoder.from_pretrained(d, device="cpu", kernels=reference_kernels)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_weight_norm_is_folded_like_torch():
    conv = torch.nn.utils.weight_norm(torch.nn.ConvTranspose1d(6, 4, 5))
    with torch.no_grad():
        conv.weight_g.uniform_(0.5, 2.0)
    ref = conv.weight_g * conv.weight_v / torch.linalg.vector_norm(conv.weight_v.flatten(1), dim=1).view(-1, 1, 1)
    assert conv.weight_g.shape == (6, 1, 1)                  # dim 0 of a transposed conv is the input axis
    torch.testing.assert_close(fold_weight_norm(conv.weight_g, conv.weight_v), ref)
    x = torch.randn(2, 6, 9)
    plain = torch.nn.ConvTranspose1d(6, 4, 5)
    with torch.no_grad():
        plain.weight.copy_(fold_weight_norm(conv.weight_g, conv.weight_v))
        plain.bias.copy_(conv.bias)
    torch.testing.assert_close(plain(x), conv(x))


def test_parametrizations_key_style_and_music_folder(cosyvoice_dir, tmp_path, reference_kernels):
    """Newer weight-norm key names load the same; a second (Music) folder loads the same way."""
    hift_sd = torch.load(os.path.join(cosyvoice_dir, "hift.pt"))
    renamed = {k.replace(".weight_g", ".parametrizations.weight.original0").replace(
        ".weight_v", ".parametrizations.weight.original1"): v for k, v in hift_sd.items()}
    cfg = config_from_data(parse_inert_yaml(yaml_text(TINY_SIZES)))
    d = str(tmp_path / "p")
    os.makedirs(d)
    torch.save(renamed, os.path.join(d, "hift.pt"))
    torch.save(hift_sd, os.path.join(d, "hift_old.pt"))
    with torch.device("meta"):
        a, b = HiFTGenerator(cfg.hift), HiFTGenerator(cfg.hift)
    a = load_weights(a, os.path.join(d, "hift.pt"), "cpu", torch.float32)
    b = load_weights(b, os.path.join(d, "hift_old.pt"), "cpu", torch.float32)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    music = write_cosyvoice_dir(str(tmp_path / "CosyVoice-300M-25Hz-Music"), seed=7, campplus=False)
    dec = SpeechDecoder.from_pretrained(music, device="cpu", kernels=reference_kernels)
    assert dec.campplus is None
    other = torch.load(os.path.join(music, "flow.pt"))["encoder_proj.weight"]
    torch.testing.assert_close(dec.flow.encoder_proj.weight, other)


def test_random_fixture_uses_spec_layout():
    sd = random_state_dict(spec_hift_layout(TINY_SIZES), seed=0)
    assert len(sd) == 227 and all(v.dtype == torch.float32 for v in sd.values())
