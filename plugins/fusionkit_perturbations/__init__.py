"""Built-in perturbations for robustness tests: temporal shift and jitter, dropped frames,
additive noise at a given SNR, whole-modality dropout and dropout of spans of frames."""
