"""Scoring a synthetic set: fidelity, diversity, utility and memorisation (``fedsynth evaluate``)."""
