"""The Lux MNIST tutorial's model written with odeflux's peers, for the benchmarks.

- :mod:`.torchdiffeq_tutorial`: torchdiffeq's ``odeint_adjoint`` / ``odeint`` (dopri5).
- :mod:`.torchode_tutorial`: torchode's Tsit5 with its ``AutoDiffAdjoint`` and backsolve adjoints.
- :mod:`.diffrax_tutorial`: diffrax/JAX (Tsit5, ``RecursiveCheckpointAdjoint``), run in its own
  process so that JAX and torch don't share threads; imports neither torch nor odeflux.

The torch peers build the very same initial weights as ``odeflux.mnist.model.create_model``
(Lux's Glorot-uniform from one seeded generator, in layer order) and train on the same batches,
without importing odeflux, so a process timing of a peer does not pay for odeflux's imports.
Each module runs as a script with the tutorial's command line and progress lines.
"""
