"""stepvox.engine.frontend: signal processing shared by the audio front ends (engine/audio/) and
the audio models: audio input checks, WAV files, resampling, Kaldi fbank, the Paraformer front
end, Whisper's and matcha's mel spectrograms. Pure functions and small stream objects on tensors;
nothing here knows about models or engines."""
