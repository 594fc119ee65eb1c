"""Expert names, in step order: the high-noise expert runs the early (noisy) steps of a
two-expert (MoE) model, the low-noise expert the rest; a dense model has one transformer."""

HIGH, LOW, DENSE = "high_noise", "low_noise", "dense"

#: Every expert name, in step order.
EXPERT_ORDER = (HIGH, DENSE, LOW)
