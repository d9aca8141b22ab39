"""What the MNIST-family tasks (``lenet5``, ``mlp2``) share about their embedded-data defaults."""

EMBEDDED_PRIOR_N = 60000
"""MARS's N on the embedded digits: full MNIST's training-set size, as in MARS's notebooks."""
MARS_PRIOR_WHY = (
    "mars weighs its priors by 1/N, and with the true N=4,000 they are 15x stronger than on full MNIST: "
    "the embedded data uses full MNIST's N=60,000 (prior_n)"
)
