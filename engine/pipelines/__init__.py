"""stepvox.engine.pipelines: what users run, composed of the engines and audio front ends (no
kernels, no model code): text to speech (`tts.TTS`)."""
