"""stepvox.engine.audio: the audio front-end classes: AudioTokenizer (waveform -> interleaved
speech codes, offline and streaming) and SpeechDecoder (speech codes -> waveform, offline,
batched and streaming). They drive the audio models (engine/models/) on the signal processing of
engine/frontend/."""
