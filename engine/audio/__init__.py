"""stepvox.engine.audio: audio front ends and audio I/O helpers for the tokenizers and the speech decoder."""
