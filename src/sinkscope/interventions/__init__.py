"""Interventions on the sink circuit: ablation, the conditional sink-neuron patch, the cluster attack."""
