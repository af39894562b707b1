"""stepvox.engine.models: the networks (Step1 LM, the two audio tokenizers' encoders, the speech
decoder's flow and vocoder) with their configs and loaders (one strict weight loader, one YAML
reader, ONNX initializers as data)."""
