"""stepvox: an inference engine for the Step-Audio speech-dialogue models."""
__version__ = "0.1.0"
