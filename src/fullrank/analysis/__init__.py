"""Instruments for the Fira paper's evidence: the scaling-factor probe and its
analyses (Fig. 3, Tables 7/8, rebuttal r1/r2/r6/r7), loss-spike records (Figs. 2, 4, 9, 10) and
the early-training variance of φ (Appendix A.1, Theorem 1, Fig. 8).

A training loop carries the probes through two hooks, ``before_step(step)`` (gradients final,
before ``optimizer.step()``) and ``after_step(step[, loss])``; ``python -m fullrank.analysis``
analyses their records.
"""
from .harness import Probes, make_probes, train_steps
from .scaling_probe import PROBE_FILE, ScalingProbe, projected_weights, read_probe
from .spikes import SPIKES_FILE, SpikeLogger, find_spikes, read_spikes, spike_summary

__all__ = [
           "PROBE_FILE",
           "SPIKES_FILE",
           "Probes",
           "ScalingProbe",
           "SpikeLogger",
           "find_spikes",
           "make_probes",
           "projected_weights",
           "read_probe",
           "read_spikes",
           "spike_summary",
           "train_steps",
]
