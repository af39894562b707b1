"""stepvox.engine.models: the networks (Step1 LM, audio tokenizers, speech decoder)."""
