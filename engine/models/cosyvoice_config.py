"""The speech decoder's config: a released `cosyvoice.yaml` (SPEC.md §3.1–3.2) read as inert data
(models/yaml_reader.py, nothing executed), then its flow, HiFT and mel-feature sections as frozen
dataclasses, omitted arguments filled with the defaults of the official classes. Models this
engine does not implement are refused with a ConfigError."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from ..errors import ConfigError
from ..frontend.mel import MelConfig
from .yaml_reader import read_yaml

CONFIG_NAME = "cosyvoice.yaml"


# ----------------------------------------------------------------------------- typed config
@dataclass(frozen=True)
class EncoderConfig:
    input_size: int
    output_size: int
    attention_heads: int
    linear_units: int
    num_blocks: int


@dataclass(frozen=True)
class RegulatorConfig:
    channels: int
    out_channels: int
    num_convs: int          # len(sampling_ratios): Conv1d k3 + GroupNorm + Mish each
    groups: int


@dataclass(frozen=True)
class EstimatorConfig:
    in_channels: int
    out_channels: int
    channels: tuple
    attention_head_dim: int
    n_blocks: int
    num_mid_blocks: int
    num_heads: int


@dataclass(frozen=True)
class CFMConfig:
    in_channels: int
    spk_emb_dim: int
    t_scheduler: str
    inference_cfg_rate: float
    n_timesteps: int = 10   # fixed in MaskedDiffWithXvec.inference


@dataclass(frozen=True)
class FlowConfig:
    input_size: int
    output_size: int
    spk_embed_dim: int
    vocab_size: int
    input_frame_rate: float
    mel_sampling_rate: int     # flow.mel_feat_conf: sets mel frames per token
    mel_hop_size: int
    encoder: EncoderConfig
    regulator: RegulatorConfig
    cfm: CFMConfig
    estimator: EstimatorConfig

    def mel_frames(self, num_tokens: int) -> int:
        """Target mel length for `num_tokens` tokens, the official float formula."""
        return int(num_tokens / self.input_frame_rate * self.mel_sampling_rate / self.mel_hop_size)


@dataclass(frozen=True)
class HiftConfig:
    in_channels: int
    base_channels: int
    nb_harmonics: int
    sampling_rate: int
    nsf_alpha: float
    nsf_sigma: float
    nsf_voiced_threshold: float
    upsample_rates: tuple
    upsample_kernel_sizes: tuple
    n_fft: int
    hop_len: int
    resblock_kernel_sizes: tuple
    resblock_dilation_sizes: tuple
    source_resblock_kernel_sizes: tuple
    source_resblock_dilation_sizes: tuple
    lrelu_slope: float
    audio_limit: float
    f0_in_channels: int
    f0_cond_channels: int

    @property
    def samples_per_frame(self) -> int:
        return math.prod(self.upsample_rates) * self.hop_len


@dataclass(frozen=True)
class CosyVoiceConfig:
    sample_rate: int
    flow: FlowConfig
    hift: HiftConfig
    mel: MelConfig


# Defaults of the official constructors (GH cosyvoice/*), used where the yaml omits an argument.
_FLOW_DEFAULTS = dict(input_size=512, output_size=80, spk_embed_dim=192, output_type="mel",
                      vocab_size=4096, input_frame_rate=50)
_FLOW_MEL_DEFAULTS = dict(sampling_rate=22050, hop_size=256)
_ENCODER_DEFAULTS = dict(output_size=256, attention_heads=4, linear_units=2048, num_blocks=6,
                         input_layer="conv2d", pos_enc_layer_type="rel_pos", normalize_before=True,
                         macaron_style=True, selfattention_layer_type="rel_selfattn",
                         activation_type="swish", use_cnn_module=True, key_bias=True,
                         static_chunk_size=0, use_dynamic_chunk=False, global_cmvn=None)
_ESTIMATOR_DEFAULTS = dict(channels=[256, 256], attention_head_dim=64, n_blocks=1, num_mid_blocks=2,
                           num_heads=4, act_fn="snake")
_CFM_DEFAULTS = dict(n_spks=1, spk_emb_dim=64)
_CFM_PARAM_DEFAULTS = dict(solver="euler", t_scheduler="cosine", inference_cfg_rate=0.7)
_HIFT_DEFAULTS = dict(in_channels=80, base_channels=512, nb_harmonics=8, sampling_rate=22050,
                      nsf_alpha=0.1, nsf_sigma=0.003, nsf_voiced_threshold=10,
                      upsample_rates=[8, 8], upsample_kernel_sizes=[16, 16],
                      istft_params={"n_fft": 16, "hop_len": 4},
                      resblock_kernel_sizes=[3, 7, 11],
                      resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
                      source_resblock_kernel_sizes=[7, 11],
                      source_resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
                      lrelu_slope=0.1, audio_limit=0.99)
_F0_DEFAULTS = dict(num_class=1, in_channels=80, cond_channels=512)


def _class_is(node, name: str, where: str, unsupported: dict | None = None) -> dict:
    if not isinstance(node, dict) or "__class__" not in node:
        raise ConfigError(f"{CONFIG_NAME}: `{where}` must be a `!new:...{name}` entry")
    cls = str(node["__class__"]).rsplit(".", 1)[-1]
    if cls != name:
        hint = (unsupported or {}).get(cls, "")
        raise ConfigError(f"{CONFIG_NAME}: `{where}` is {node['__class__']}, this engine runs {name}"
                          + (f" ({hint})" if hint else ""))
    return node


def _get(node: dict, key: str, defaults: dict, where: str):
    value = node.get(key, defaults.get(key, dataclasses.MISSING))
    if value is dataclasses.MISSING:
        raise ConfigError(f"{CONFIG_NAME}: `{where}.{key}` is required")
    return value


def _int(node, key, defaults, where, minimum=1) -> int:
    value = _get(node, key, defaults, where)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{CONFIG_NAME}: `{where}.{key}` must be an integer >= {minimum}, got {value!r}")
    return value


def _float(node, key, defaults, where) -> float:
    value = _get(node, key, defaults, where)
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{CONFIG_NAME}: `{where}.{key}` must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(out):
        raise ConfigError(f"{CONFIG_NAME}: `{where}.{key}` must be a finite number, got {value!r}")
    return out


def _int_list(node, key, defaults, where, nested=False) -> tuple:
    value = _get(node, key, defaults, where)
    ok = isinstance(value, (list, tuple)) and len(value) > 0
    if ok and nested:
        ok = all(isinstance(v, (list, tuple)) and v and all(isinstance(i, int) and i > 0 for i in v)
                 for v in value)
        value = tuple(tuple(v) for v in value) if ok else value
    elif ok:
        ok = all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in value)
        value = tuple(value) if ok else value
    if not ok:
        raise ConfigError(f"{CONFIG_NAME}: `{where}.{key}` must be a non-empty list of positive integers, "
                          f"got {value!r}")
    return value


def _expect(node, key, defaults, where, allowed):
    value = _get(node, key, defaults, where)
    if value not in allowed:
        raise ConfigError(f"{CONFIG_NAME}: `{where}.{key}` = {value!r} is not supported (expected "
                          f"{' or '.join(repr(a) for a in allowed)})")
    return value


def _parse_encoder(node) -> EncoderConfig:
    w = "flow.encoder"
    _class_is(node, "ConformerEncoder", w, {"TransformerEncoder": "no rel-pos conformer"})
    d = _ENCODER_DEFAULTS
    _expect(node, "input_layer", d, w, ("linear",))
    _expect(node, "pos_enc_layer_type", d, w, ("rel_pos_espnet",))
    _expect(node, "selfattention_layer_type", d, w, ("rel_selfattn",))
    _expect(node, "activation_type", d, w, ("swish",))
    _expect(node, "normalize_before", d, w, (True,))
    _expect(node, "macaron_style", d, w, (False,))
    _expect(node, "use_cnn_module", d, w, (False,))
    _expect(node, "key_bias", d, w, (True,))
    _expect(node, "static_chunk_size", d, w, (0,))
    _expect(node, "use_dynamic_chunk", d, w, (False,))
    _expect(node, "global_cmvn", d, w, (None,))
    cfg = EncoderConfig(input_size=_int(node, "input_size", d, w), output_size=_int(node, "output_size", d, w),
                        attention_heads=_int(node, "attention_heads", d, w),
                        linear_units=_int(node, "linear_units", d, w), num_blocks=_int(node, "num_blocks", d, w))
    if cfg.output_size % cfg.attention_heads:
        raise ConfigError(f"{CONFIG_NAME}: flow.encoder.output_size {cfg.output_size} is not divisible by "
                          f"attention_heads {cfg.attention_heads}")
    return cfg


def _parse_regulator(node) -> RegulatorConfig:
    w = "flow.length_regulator"
    _class_is(node, "InterpolateRegulator", w)
    channels = _int(node, "channels", {}, w)
    ratios = node.get("sampling_ratios", [])
    if not isinstance(ratios, (list, tuple)):
        raise ConfigError(f"{CONFIG_NAME}: `{w}.sampling_ratios` must be a list")
    out = node.get("out_channels") or channels
    return RegulatorConfig(channels=channels, out_channels=int(out), num_convs=len(ratios),
                           groups=_int(node, "groups", {"groups": 1}, w))


def _parse_estimator(node) -> EstimatorConfig:
    w = "flow.decoder.estimator"
    _class_is(node, "ConditionalDecoder", w, {"CausalConditionalDecoder": "CosyVoice2 causal flow"})
    d = _ESTIMATOR_DEFAULTS
    _expect(node, "act_fn", d, w, ("gelu",))
    channels = _int_list(node, "channels", d, w)
    for c in channels:
        if c % 8:
            raise ConfigError(f"{CONFIG_NAME}: `{w}.channels` must be multiples of 8 (GroupNorm(8)), got {channels}")
    return EstimatorConfig(in_channels=_int(node, "in_channels", {}, w), out_channels=_int(node, "out_channels", {}, w),
                           channels=channels, attention_head_dim=_int(node, "attention_head_dim", d, w),
                           n_blocks=_int(node, "n_blocks", d, w), num_mid_blocks=_int(node, "num_mid_blocks", d, w, 0),
                           num_heads=_int(node, "num_heads", d, w))


def _parse_cfm(node) -> tuple[CFMConfig, EstimatorConfig]:
    w = "flow.decoder"
    _class_is(node, "ConditionalCFM", w, {"CausalConditionalCFM": "CosyVoice2 causal flow"})
    params = node.get("cfm_params", {})
    if isinstance(params, dict) and "content" in params and "__class__" in params:
        params = params["content"]          # !new:omegaconf.DictConfig {content: {...}}
    if not isinstance(params, dict):
        raise ConfigError(f"{CONFIG_NAME}: `{w}.cfm_params` must be a mapping")
    pw = w + ".cfm_params"
    _expect(params, "solver", _CFM_PARAM_DEFAULTS, pw, ("euler",))
    sched = _expect(params, "t_scheduler", _CFM_PARAM_DEFAULTS, pw, ("cosine", "linear"))
    if "estimator" not in node:
        raise ConfigError(f"{CONFIG_NAME}: `{w}.estimator` is required")
    cfm = CFMConfig(in_channels=_int(node, "in_channels", {}, w),
                    spk_emb_dim=_int(node, "spk_emb_dim", _CFM_DEFAULTS, w),
                    t_scheduler=sched,
                    inference_cfg_rate=_float(params, "inference_cfg_rate", _CFM_PARAM_DEFAULTS, pw))
    if _int(node, "n_spks", _CFM_DEFAULTS, w, 0) != 1:
        raise ConfigError(f"{CONFIG_NAME}: `{w}.n_spks` must be 1 (speaker embedding conditioning)")
    return cfm, _parse_estimator(node["estimator"])


def _parse_flow(node) -> FlowConfig:
    w = "flow"
    _class_is(node, "MaskedDiffWithXvec", w, {"CausalMaskedDiffWithXvec": "CosyVoice2/3 causal flow"})
    d = _FLOW_DEFAULTS
    _expect(node, "output_type", d, w, ("mel",))
    for key in ("encoder", "length_regulator", "decoder"):
        if key not in node:
            raise ConfigError(f"{CONFIG_NAME}: `flow.{key}` is required")
    mel_conf = node.get("mel_feat_conf", {})
    if not isinstance(mel_conf, dict):
        raise ConfigError(f"{CONFIG_NAME}: `flow.mel_feat_conf` must be a mapping")
    cfm, est = _parse_cfm(node["decoder"])
    cfg = FlowConfig(input_size=_int(node, "input_size", d, w), output_size=_int(node, "output_size", d, w),
                     spk_embed_dim=_int(node, "spk_embed_dim", d, w), vocab_size=_int(node, "vocab_size", d, w),
                     input_frame_rate=_float(node, "input_frame_rate", d, w),
                     mel_sampling_rate=_int(mel_conf, "sampling_rate", _FLOW_MEL_DEFAULTS, "flow.mel_feat_conf"),
                     mel_hop_size=_int(mel_conf, "hop_size", _FLOW_MEL_DEFAULTS, "flow.mel_feat_conf"),
                     encoder=_parse_encoder(node["encoder"]), regulator=_parse_regulator(node["length_regulator"]),
                     cfm=cfm, estimator=est)
    _check_flow(cfg)
    return cfg


def _check_flow(cfg: FlowConfig) -> None:
    def need(cond, msg):
        if not cond:
            raise ConfigError(f"{CONFIG_NAME}: inconsistent flow config: {msg}")
    need(cfg.input_frame_rate > 0, "input_frame_rate must be > 0")
    need(cfg.encoder.input_size == cfg.input_size,
         f"encoder.input_size {cfg.encoder.input_size} != flow.input_size {cfg.input_size}")
    need(cfg.regulator.channels == cfg.output_size and cfg.regulator.out_channels == cfg.output_size,
         f"length_regulator channels {cfg.regulator.channels}/{cfg.regulator.out_channels} "
         f"!= output_size {cfg.output_size}")
    need(cfg.cfm.spk_emb_dim == cfg.output_size,
         f"decoder.spk_emb_dim {cfg.cfm.spk_emb_dim} != output_size {cfg.output_size}")
    need(cfg.estimator.in_channels == 4 * cfg.output_size,
         f"estimator.in_channels {cfg.estimator.in_channels} != 4 * output_size (x, mu, spks, cond)")
    need(cfg.estimator.out_channels == cfg.output_size,
         f"estimator.out_channels {cfg.estimator.out_channels} != output_size {cfg.output_size}")


def _parse_hift(node) -> HiftConfig:
    w = "hift"
    _class_is(node, "HiFTGenerator", w)
    d = _HIFT_DEFAULTS
    istft = _get(node, "istft_params", d, w)
    if not isinstance(istft, dict):
        raise ConfigError(f"{CONFIG_NAME}: `hift.istft_params` must be a mapping")
    f0 = node.get("f0_predictor")
    if f0 is None:
        raise ConfigError(f"{CONFIG_NAME}: `hift.f0_predictor` is required")
    _class_is(f0, "ConvRNNF0Predictor", "hift.f0_predictor")
    if _int(f0, "num_class", _F0_DEFAULTS, "hift.f0_predictor") != 1:
        raise ConfigError(f"{CONFIG_NAME}: `hift.f0_predictor.num_class` must be 1")
    cfg = HiftConfig(
        in_channels=_int(node, "in_channels", d, w), base_channels=_int(node, "base_channels", d, w),
        nb_harmonics=_int(node, "nb_harmonics", d, w, 0), sampling_rate=_int(node, "sampling_rate", d, w),
        nsf_alpha=_float(node, "nsf_alpha", d, w), nsf_sigma=_float(node, "nsf_sigma", d, w),
        nsf_voiced_threshold=_float(node, "nsf_voiced_threshold", d, w),
        upsample_rates=_int_list(node, "upsample_rates", d, w),
        upsample_kernel_sizes=_int_list(node, "upsample_kernel_sizes", d, w),
        n_fft=_int(istft, "n_fft", d["istft_params"], "hift.istft_params"),
        hop_len=_int(istft, "hop_len", d["istft_params"], "hift.istft_params"),
        resblock_kernel_sizes=_int_list(node, "resblock_kernel_sizes", d, w),
        resblock_dilation_sizes=_int_list(node, "resblock_dilation_sizes", d, w, nested=True),
        source_resblock_kernel_sizes=_int_list(node, "source_resblock_kernel_sizes", d, w),
        source_resblock_dilation_sizes=_int_list(node, "source_resblock_dilation_sizes", d, w, nested=True),
        lrelu_slope=_float(node, "lrelu_slope", d, w), audio_limit=_float(node, "audio_limit", d, w),
        f0_in_channels=_int(f0, "in_channels", _F0_DEFAULTS, "hift.f0_predictor"),
        f0_cond_channels=_int(f0, "cond_channels", _F0_DEFAULTS, "hift.f0_predictor"))
    if len(cfg.upsample_rates) != len(cfg.upsample_kernel_sizes):
        raise ConfigError(f"{CONFIG_NAME}: hift upsample_rates and upsample_kernel_sizes differ in length")
    if len(cfg.resblock_kernel_sizes) != len(cfg.resblock_dilation_sizes):
        raise ConfigError(f"{CONFIG_NAME}: hift resblock kernel and dilation lists differ in length")
    if len(cfg.source_resblock_kernel_sizes) != len(cfg.upsample_rates) or \
            len(cfg.source_resblock_dilation_sizes) != len(cfg.upsample_rates):
        raise ConfigError(f"{CONFIG_NAME}: hift needs one source resblock per upsampling stage")
    if cfg.base_channels % (2 ** len(cfg.upsample_rates)):
        raise ConfigError(f"{CONFIG_NAME}: hift.base_channels must halve {len(cfg.upsample_rates)} times")
    if cfg.n_fft % 2 or cfg.n_fft < 2 * cfg.hop_len:
        raise ConfigError(f"{CONFIG_NAME}: hift istft n_fft must be even and >= 2*hop_len")
    if cfg.f0_in_channels != cfg.in_channels:
        raise ConfigError(f"{CONFIG_NAME}: hift.f0_predictor.in_channels != hift.in_channels")
    return cfg


def _parse_mel(node, sample_rate) -> MelConfig:
    if node is None:
        return MelConfig(sampling_rate=sample_rate)
    w = "feat_extractor"
    if not isinstance(node, dict) or "__function__" not in node:
        raise ConfigError(f"{CONFIG_NAME}: `feat_extractor` must be a `!name:...mel_spectrogram` entry")
    if str(node["__function__"]).rsplit(".", 1)[-1] != "mel_spectrogram":
        raise ConfigError(f"{CONFIG_NAME}: `feat_extractor` is {node['__function__']}, expected mel_spectrogram")
    d = dataclasses.asdict(MelConfig(sampling_rate=sample_rate))
    fmax = node.get("fmax", d["fmax"])
    cfg = MelConfig(n_fft=_int(node, "n_fft", d, w), num_mels=_int(node, "num_mels", d, w),
                    sampling_rate=_int(node, "sampling_rate", d, w), hop_size=_int(node, "hop_size", d, w),
                    win_size=_int(node, "win_size", d, w), fmin=_float(node, "fmin", d, w),
                    fmax=None if fmax is None else _float(node, "fmax", d, w),
                    center=bool(node.get("center", False)))
    if cfg.win_size > cfg.n_fft:
        raise ConfigError(f"{CONFIG_NAME}: feat_extractor.win_size > n_fft")
    return cfg


def config_from_data(data: dict) -> CosyVoiceConfig:
    """Typed config from parsed (inert) yaml data."""
    for key in ("flow", "hift"):
        if key not in data:
            raise ConfigError(f"{CONFIG_NAME}: top-level `{key}` is required")
    sample_rate = data.get("sample_rate", 22050)
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ConfigError(f"{CONFIG_NAME}: `sample_rate` must be a positive integer, got {sample_rate!r}")
    flow = _parse_flow(data["flow"])
    hift = _parse_hift(data["hift"])
    mel = _parse_mel(data.get("feat_extractor"), sample_rate)
    problems = []
    if hift.in_channels != flow.output_size:
        problems.append(f"hift.in_channels {hift.in_channels} != flow.output_size {flow.output_size}")
    if mel.num_mels != flow.output_size:
        problems.append(f"feat_extractor.num_mels {mel.num_mels} != flow.output_size {flow.output_size}")
    if hift.sampling_rate != sample_rate or mel.sampling_rate != sample_rate:
        problems.append(f"sample rates differ: sample_rate {sample_rate}, hift {hift.sampling_rate}, "
                        f"feat_extractor {mel.sampling_rate}")
    if hift.samples_per_frame != mel.hop_size or flow.mel_hop_size != mel.hop_size:
        problems.append(f"hop sizes differ: hift {hift.samples_per_frame} samples/frame, feat_extractor "
                        f"{mel.hop_size}, flow.mel_feat_conf {flow.mel_hop_size}")
    if problems:
        raise ConfigError(f"{CONFIG_NAME}: " + "; ".join(problems))
    return CosyVoiceConfig(sample_rate=sample_rate, flow=flow, hift=hift, mel=mel)


def load_cosyvoice_config(model_dir: str) -> CosyVoiceConfig:
    """Parse `<model_dir>/cosyvoice.yaml` into a CosyVoiceConfig (ConfigError when it can't)."""
    path = os.path.join(model_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: not found (a CosyVoice folder holds cosyvoice.yaml, flow.pt, hift.pt)")
    return config_from_data(read_yaml(path))
