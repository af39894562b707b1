"""cosyvoice.yaml (engine/models/cosyvoice_config.py) is read as inert data (the YAML reader's own
tests: test_models_yaml_reader.py) and checked: unsupported or inconsistent configs give ConfigError."""
from __future__ import annotations

import pytest

from stepvox.engine.errors import ConfigError
from stepvox.engine.models.cosyvoice_config import config_from_data, load_cosyvoice_config
from stepvox.engine.models.yaml_reader import parse_inert_yaml
from stepvox.testing.cosyvoice import FULL_SIZES, TINY_SIZES, yaml_text


def test_full_config_values():
    cfg = config_from_data(parse_inert_yaml(yaml_text(FULL_SIZES)))
    assert cfg.sample_rate == 22050
    assert cfg.flow.vocab_size == 5120 and cfg.flow.input_frame_rate == pytest.approx(41.667)
    assert cfg.flow.spk_embed_dim == 192          # through !ref <spk_embed_dim>
    assert (cfg.flow.encoder.output_size, cfg.flow.encoder.attention_heads, cfg.flow.encoder.num_blocks) == (512, 8, 6)
    est = cfg.flow.estimator
    assert (est.in_channels, est.channels, est.n_blocks, est.num_mid_blocks, est.num_heads) == (320, (256, 256), 4, 12, 8)
    assert cfg.flow.cfm.inference_cfg_rate == 0.7 and cfg.flow.cfm.t_scheduler == "cosine"
    assert cfg.hift.samples_per_frame == 256 and cfg.hift.sampling_rate == 22050
    assert cfg.mel.fmax == 8000 and cfg.mel.hop_size == 256
    # 10 s of tokens (417) -> the official mel length formula
    assert cfg.flow.mel_frames(417) == int(417 / 41.667 * 22050 / 256) == 862


@pytest.mark.parametrize("old,new,message", [
    ("cosyvoice.flow.flow.MaskedDiffWithXvec", "cosyvoice.flow.flow.CausalMaskedDiffWithXvec", "causal"),
    ("pos_enc_layer_type: 'rel_pos_espnet'", "pos_enc_layer_type: 'rel_pos'", "pos_enc_layer_type"),
    ("use_cnn_module: False", "use_cnn_module: True", "use_cnn_module"),
    ("act_fn: 'gelu'", "act_fn: 'snake'", "act_fn"),
    ("solver: 'euler'", "solver: 'dopri'", "solver"),
    ("    in_channels: 80\n    base_channels", "    in_channels: 100\n    base_channels", "hift.in_channels"),
    ("in_channels: 320", "in_channels: 240", "estimator.in_channels"),
    ("upsample_rates: [8, 8]", "upsample_rates: [8, 4]", "hop"),
    ("vocab_size: 5120", "vocab_size: -3", "vocab_size"),
    ("input_frame_rate: 41.667", "input_frame_rate: fast", "input_frame_rate"),
])
def test_unsupported_or_inconsistent_config(old, new, message):
    text = yaml_text(FULL_SIZES)
    assert old in text
    with pytest.raises(ConfigError, match=message):
        config_from_data(parse_inert_yaml(text.replace(old, new, 1)))


def test_missing_sections_and_files(tmp_path):
    text = yaml_text(TINY_SIZES)
    cut = text[:text.index("hift:")]
    with pytest.raises(ConfigError, match="hift"):
        config_from_data(parse_inert_yaml(cut))
    with pytest.raises(ConfigError, match="estimator"):
        config_from_data(parse_inert_yaml(text.replace("        estimator: !new:", "        not_estimator: !new:")))
    with pytest.raises(ConfigError, match="not found"):
        load_cosyvoice_config(str(tmp_path))
    (tmp_path / "cosyvoice.yaml").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="cosyvoice.yaml: cannot read"):
        load_cosyvoice_config(str(tmp_path))
    assert issubclass(ConfigError, ValueError)


def test_defaults_of_official_classes_fill_omitted_arguments():
    text = yaml_text(TINY_SIZES).replace("        n_spks: 1\n", "").replace("    nsf_alpha: 0.1\n", "")
    cfg = config_from_data(parse_inert_yaml(text))
    assert cfg.hift.nsf_alpha == 0.1
    # the encoder defaults to a macaron conformer with a conv module, which this engine rejects
    no_flags = yaml_text(TINY_SIZES).replace("        use_cnn_module: False\n", "")
    with pytest.raises(ConfigError, match="use_cnn_module"):
        config_from_data(parse_inert_yaml(no_flags))


def test_load_from_folder(cosyvoice_dir):
    cfg = load_cosyvoice_config(cosyvoice_dir)
    assert cfg == config_from_data(parse_inert_yaml(yaml_text(TINY_SIZES)))
    assert cfg.flow.estimator.channels == (32, 32) and cfg.hift.base_channels == 32
