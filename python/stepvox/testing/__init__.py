"""stepvox.testing: random-weight model folders in the released formats (Step1, the
Step-Audio-Tokenizer, CosyVoice) and real speech from espeak-ng, for the CLI's embedded default,
the benchmarks and the tests. Nothing here is needed to serve a real model."""
