"""stepvox.testing: random-weight model folders in the released formats (Step1, the
Step-Audio-Tokenizer, CosyVoice) and real speech from espeak-ng, for the CLI's embedded default,
the benchmarks and the tests. Nothing here is needed to serve a real model."""

# Bumped whenever a writer here writes something new (2: the tokenizer's model.pt holds the
# Paraformer's predictor and decoder, with tokens.json): folders written by an older stepvox are
# written again rather than reused.
FIXTURES_VERSION = "2"
