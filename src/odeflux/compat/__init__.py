"""Other libraries' APIs on odeflux: ``odeflux.compat.torchdiffeq``."""
